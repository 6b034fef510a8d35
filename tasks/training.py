"""What pretraining and fine-tuning share: how a training run lives inside the stage
contract (their config form is `tasks.training_config`).

A training stage must be resumable, so its checkpoints cannot live in the stage's
temporary build directory (a new attempt gets a new one). They go to a stable work
directory beside it, `<stage>/.<fingerprint>.work/`. When training completes they are
linked into the finished output, beside the final model and the tokenizer, and the work
directory goes once that output is in place (`work_done`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from model import fused
from model.checkpoint import save_model
from model.perf import cpp_compiler
from model.trainer import NonFiniteLoss, Trainer
from model.transformer import parameter_counts
from tasks.interrupts import interrupts_counted
from tasks.stage import StageError
from tasks.training_config import TrainingConfig

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
HISTORY = "history.jsonl"


def copy_tokenizer(source: Path, dest: Path) -> None:
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy2(source / name, dest / name)


def work_dir(root: Path, stage: str, fp: str) -> Path:
    """Stable per-fingerprint directory for checkpoints of an unfinished run."""
    return root / stage / f".{fp}.work"


def work_done(root: Path, stage: str, fp: str) -> Callable[[], None]:
    """What `run_stage` calls once a trained output is in place: the run's work folder goes."""
    return lambda: shutil.rmtree(work_dir(root, stage, fp), ignore_errors=True)


def train_into(
    out: Path,
    trainer: Trainer,
    tokenizer_dir: Path,
    *,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Resume if possible, train, and write the finished model into `out`; returns manifest fields.

    Every reported step is also appended to `history.jsonl` (kept with the checkpoints, so
    a resumed run keeps the curve of its earlier part), linked into `out` at the end.
    """
    if trainer.validation is None:
        log("no validation data: this run reports no validation loss (for pretraining, more documents or a "
            "larger clean.val_fraction give the corpus a validation split)")
    if trainer.resume():
        log(f"resuming from step {trainer.step} of {trainer.config.steps}")
    trainer.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    history = trainer.checkpoint_dir / HISTORY
    _cut_torn_line(history)
    report = trainer.callback

    def record(step: int, metrics: dict[str, float]) -> None:
        with open(history, "a") as handle:
            handle.write(json.dumps({"step": step, **metrics}) + "\n")
        report(step, metrics)

    trainer.callback = record
    with interrupts_counted() as interrupts:
        trainer.after_step = interrupts.raise_if_dropped
        final = trainer.fit()
    if not final and trainer.step:  # resumed at its last step, saved before the output was: its record
        records = read_history(trainer.checkpoint_dir)
        final = {key: value for key, value in records[-1].items() if key != "step"} if records else {}
    save_model(trainer.model, out)
    copy_tokenizer(tokenizer_dir, out)
    # linked, not moved: until the output is in place (`run_stage`), the work folder must stay
    # whole, so an interruption now still resumes from the last checkpoint
    if history.exists():
        _link_or_copy(history, out / HISTORY)
    shutil.copytree(trainer.checkpoint_dir, out / "checkpoints", copy_function=_link_or_copy,
                    ignore=shutil.ignore_patterns(HISTORY))
    counts = parameter_counts(trainer.model)
    return {
        "counts": {"steps": trainer.step, "params_total": counts["total"], "params_activated": counts["activated"]},
        "final_metrics": final,
        "model_config": trainer.model.config.to_dict(),
        "precision": trainer.config.precision,
    }


def _link_or_copy(source: str | Path, target: str | Path) -> None:
    """A second name for a file (instant, no space), or a copy where links cannot be made."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def train_stage(
    stage: str,
    upstream: dict[str, Any],
    config: Any,
    out: Path,
    checkpoints: Path,
    build_trainer: Callable[..., Trainer],
    tokenizer_dir: Path,
    callback: Callable[[int, dict[str, float]], None] | None,
    log: Callable[[str], None],
    **trainer_options: Any,
) -> dict[str, Any]:
    """Train in this process, or under torchrun when the stage's `devices` > 1."""
    settings: TrainingConfig = getattr(config, stage)
    if settings.precision == "auto":  # resolved once, here: every torchrun rank trains in the same one
        precision = settings.resolved_precision()
        log(f"{stage}: training in {precision.name} ({stage}.precision auto: {precision.reason})")
        settings = settings.model_copy(update={"precision": precision.name})
        config = config.model_copy(update={stage: settings})
    if settings.compile and settings.torch_device().type == "cpu" and cpp_compiler() is None:
        raise StageError(f"{stage}.compile needs a C++ compiler on a CPU and none was found (g++, clang++ or $CXX): "
                         f"install one, or train eagerly with {stage}.compile=false")
    for note in [*settings.batch_notes(), *settings.schedule_notes()]:
        log(f"{stage}: {note}")
    if settings.compile:
        log(f"{stage}: compiling the model with torch.compile first; its first step takes a minute or more")
    elif settings.torch_device().type == "cpu" and fused.enabled():
        log(f"{stage}: its first step compiles the fused CPU kernels (5-10 s; about half a minute where "
            "torch's kernel cache does not hold them yet)")
    if settings.devices > 1:
        from tasks import distributed

        if settings.torch_device().type == "cuda" and settings.devices > (gpus := torch.cuda.device_count()):
            raise StageError(f"{stage}.devices={settings.devices}: this machine has {gpus} GPU(s); lower "
                             f"{stage}.devices, or train on the CPU with {stage}.device=cpu")

        return distributed.launch(stage, upstream, config, out, checkpoints, callback, log)
    settings.apply_threads()
    fused.compile_afresh()
    trainer = build_trainer(**upstream, config=config, checkpoints=checkpoints, **trainer_options)
    trainer.callback = callback or trainer.callback
    trainer.warn = log
    with diverged_as_stage_error(stage):
        return train_into(out, trainer, tokenizer_dir, log=log)


@contextlib.contextmanager
def diverged_as_stage_error(stage: str) -> Iterator[None]:
    """A run whose loss stopped being finite fails the stage with the trainer's message, naming
    the stage (in this process, and on each torchrun rank)."""
    try:
        yield
    except NonFiniteLoss as exc:
        raise StageError(f"{stage}: {exc}") from None


def _cut_torn_line(history: Path) -> None:
    """Drop a last record that a killed run left half-written (power cut, full disk), so the
    resumed run's records start on a line of their own."""
    if not history.exists():
        return
    data = history.read_bytes()
    if data and not data.endswith(b"\n"):
        history.write_bytes(data[: data.rfind(b"\n") + 1])


def read_history(ref_dir: Path) -> list[dict[str, float]]:
    """The per-step metrics of a finished training stage (the last record wins per step; a line
    that is not a whole record, as a killed run could leave, is skipped)."""
    path = Path(ref_dir) / HISTORY
    if not path.exists():
        return []
    by_step: dict[int, dict[str, float]] = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
            by_step[int(record["step"])] = record
        except (ValueError, KeyError, TypeError):
            continue
    return [by_step[step] for step in sorted(by_step)]
