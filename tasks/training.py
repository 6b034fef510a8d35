"""What pretraining and fine-tuning share: their config form and how a training run
lives inside the stage contract.

A training stage must be resumable, so its checkpoints cannot live in the stage's
temporary build directory (a new attempt gets a new one). They go to a stable work
directory beside it, `<stage>/.<fingerprint>.work/`, and move into the finished
output when training completes, together with the final model and the tokenizer.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from model.checkpoint import save_model
from model.perf import cpp_compiler
from model.trainer import NonFiniteLoss, TrainConfig, Trainer
from model.transformer import parameter_counts
from tasks.stage import StageError, resolve_device

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
HISTORY = "history.jsonl"


class TrainingConfig(BaseModel):
    """How long and how to train; the same form for pretraining and fine-tuning."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(300, ge=1, description="Optimizer steps.")
    seq_len: int = Field(256, ge=8, description="Tokens per training sequence.")
    micro_batch: int = Field(16, ge=1, description="Sequences per forward/backward pass on one device.")
    batch_tokens: int = Field(
        4096, ge=1, description="Target global batch in tokens; gradient accumulation makes up the difference."
    )
    lr: float = Field(3e-3, gt=0, description="Peak learning rate.")
    min_lr: float = Field(3e-4, ge=0, description="Learning rate at the end of the schedule.")
    warmup_steps: int = Field(30, ge=0, description="Linear warmup steps.")
    schedule: Literal["cosine", "wsd", "constant"] = Field(
        "cosine", description="Decay after warmup: cosine, warmup-stable-decay (wsd) or constant."
    )
    decay_fraction: float = Field(0.2, gt=0, le=1, description="For wsd: fraction of steps spent decaying.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay (not on norms, biases, embeddings).")
    grad_clip: float = Field(1.0, gt=0, description="Gradient norm clipping threshold.")
    optimizer: Literal["adamw", "muon"] = Field("adamw", description="AdamW, or Muon for hidden matrices.")
    mtp_lambda: float = Field(
        0.3, ge=0, description="Weight of the multi-token-prediction loss (0: the MTP modules are not run)."
    )
    precision: Literal["bf16", "fp32"] = Field("bf16", description="bf16 autocast (fp32 master weights) or fp32.")
    compile: bool = Field(False, description="Compile the model with torch.compile.")
    eval_every: int = Field(100, ge=1, description="Validate every N steps (and at the end).")
    eval_batches: int = Field(8, ge=1, description="Validation batches per evaluation.")
    checkpoint_every: int = Field(100, ge=1, description="Checkpoint every N steps (and at the end).")
    keep_last: int = Field(2, ge=1, description="Checkpoints to keep.")
    seed: int = Field(0, description="Seed for initialisation and data order.")
    length_window: int = Field(
        1, ge=1, description="Fine-tuning: regroup each run of this many shuffled batches by example length "
        "(less padding, but a batch holds fewer kinds of example; 1: batches as shuffled). Pretraining windows "
        "are all one length."
    )
    devices: int = Field(1, ge=1, description="Processes to train with (torchrun DDP when > 1).")
    threads: int = Field(0, ge=0, description="CPU threads for torch (0: torch's default).")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where to train.")
    init_from: str | None = Field(
        None, description="Model directory to continue from instead of random weights (pretraining only)."
    )

    def grad_accum(self, world: int = 1) -> int:
        per_pass = self.micro_batch * self.seq_len * world
        return max(1, round(self.batch_tokens / per_pass))

    def engine(self, world: int = 1) -> TrainConfig:
        return TrainConfig(
            steps=self.steps, micro_batch=self.micro_batch, grad_accum=self.grad_accum(world), lr=self.lr,
            min_lr=self.min_lr, warmup_steps=min(self.warmup_steps, self.steps), schedule=self.schedule,
            decay_fraction=self.decay_fraction, weight_decay=self.weight_decay, grad_clip=self.grad_clip,
            optimizer=self.optimizer, mtp_lambda=self.mtp_lambda, precision=self.precision, compile=self.compile,
            eval_every=self.eval_every, eval_batches=self.eval_batches, checkpoint_every=self.checkpoint_every,
            keep_last=self.keep_last, seed=self.seed,
        )

    def torch_device(self) -> torch.device:
        return resolve_device(self.device, "training.device", "'auto' or 'cpu'")

    def apply_threads(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)


def copy_tokenizer(source: Path, dest: Path) -> None:
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy2(source / name, dest / name)


def work_dir(root: Path, stage: str, fp: str) -> Path:
    """Stable per-fingerprint directory for checkpoints of an unfinished run."""
    return root / stage / f".{fp}.work"


def train_into(
    out: Path,
    trainer: Trainer,
    tokenizer_dir: Path,
    *,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Resume if possible, train, and write the finished model into `out`; returns manifest fields.

    Every reported step is also appended to `history.jsonl` (kept with the checkpoints, so
    a resumed run keeps the curve of its earlier part), which moves into `out` at the end.
    """
    if trainer.validation is None:
        log("no validation data: this run reports no validation loss (for pretraining, more documents or a "
            "larger clean.val_fraction give the corpus a validation split)")
    if trainer.resume():
        log(f"resuming from step {trainer.step} of {trainer.config.steps}")
    trainer.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    history = trainer.checkpoint_dir / HISTORY
    report = trainer.callback

    def record(step: int, metrics: dict[str, float]) -> None:
        with open(history, "a") as handle:
            handle.write(json.dumps({"step": step, **metrics}) + "\n")
        report(step, metrics)

    trainer.callback = record
    final = trainer.fit()
    save_model(trainer.model, out)
    copy_tokenizer(tokenizer_dir, out)
    shutil.move(str(history), str(out / HISTORY))
    shutil.move(str(trainer.checkpoint_dir), str(out / "checkpoints"))
    counts = parameter_counts(trainer.model)
    return {
        "counts": {"steps": trainer.step, "params_total": counts["total"], "params_activated": counts["activated"]},
        "final_metrics": final,
        "model_config": trainer.model.config.to_dict(),
    }


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
    if settings.compile and settings.torch_device().type == "cpu" and cpp_compiler() is None:
        raise StageError(f"{stage}.compile needs a C++ compiler on a CPU and none was found (g++, clang++ or $CXX): "
                         f"install one, or train eagerly with {stage}.compile=false")
    if settings.devices > 1:
        from tasks import distributed

        return distributed.launch(stage, upstream, config, out, checkpoints, callback, log)
    settings.apply_threads()
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


def read_history(ref_dir: Path) -> list[dict[str, float]]:
    """The per-step metrics of a finished training stage (the last record wins per step)."""
    path = Path(ref_dir) / HISTORY
    if not path.exists():
        return []
    by_step: dict[int, dict[str, float]] = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        by_step[int(record["step"])] = record
    return [by_step[step] for step in sorted(by_step)]
