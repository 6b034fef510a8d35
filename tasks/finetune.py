"""Fine-tune stage: the pretrained model learns to answer instructions.

Training data are labeled instructions (the built-in verifiable tasks plus any user
data), rendered in the chat format; only the assistant's tokens carry loss. The held-out
test split is the validation set. Output is laid out like the pretrain stage's, plus the
examples it trained and validated on (`train_examples.parquet`, `test_examples.parquet`: family,
conversation, answer) and the user data rows it could not use (`quarantine.parquet`).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import pandas as pd
from tokenizers import Tokenizer

import tasks.chat
import tasks.files
import tasks.instructions

from model.checkpoint import load_model
from model.data import SFTBatches
from model.trainer import Trainer
from tasks.chat import render
from tasks.config import PipelineConfig
from tasks.instructions import Example, build_examples, user_data_state
from tasks.pretrain import TRAINING_CODE
from tasks.stage import Ref, StageError, code_version, fingerprint, run_stage, workspace
from tasks.training import train_stage, work_dir, work_done
from tasks.training_config import TrainingConfig

QUARANTINE = "quarantine.parquet"
EXAMPLE_FILES = {"train": "train_examples.parquet", "test": "test_examples.parquet"}
Rendered = tuple[list[int], list[int]]  # an example's token ids and loss mask (1: learned)


def finetune_fingerprint(pretrained: Ref, config: PipelineConfig) -> str:
    settings = {
        "instructions": config.instructions.model_dump(mode="json"),
        "user_data": user_data_state(config.instructions),
        "train": config.training_identity("finetune"),
    }
    # the examples are generated and rendered by instructions' and chat's code
    code = code_version(sys.modules[__name__], tasks.instructions, tasks.files, tasks.chat, *TRAINING_CODE)
    return fingerprint("finetune", settings, [pretrained.fingerprint], code)


def tokenizer_dir(pretrained: Ref) -> Path:
    return pretrained.dir


def examples_table(examples: list[Example]) -> pd.DataFrame:
    """Examples as a table for people and MLflow: family, the conversation as JSON, the answer."""
    return pd.DataFrame({
        "family": [ex.family for ex in examples],
        "messages": [json.dumps(ex.messages, ensure_ascii=False) for ex in examples],
        "answer": [ex.answer for ex in examples],
    })


def render_examples(examples: dict[str, list[Example]], tokenizer: Tokenizer) -> dict[str, list[Rendered]]:
    """Each split's examples as (ids, loss mask) pairs in the chat format."""
    return {split: [render(ex.messages, tokenizer) for ex in items] for split, items in examples.items()}


def build_trainer(pretrained: Ref, config: PipelineConfig, checkpoints: Path, rank: int = 0, world: int = 1,
                  rendered: dict[str, list[Rendered]] | None = None) -> Trainer:
    """The fine-tuning trainer; `rendered` are the examples when the stage already has them
    (each torchrun rank renders its own: they are the same for a given config)."""
    cfg = config.finetune
    data = rendered or render_examples(build_examples(config.instructions), _tokenizer(pretrained))
    model = load_model(pretrained.dir, cfg.torch_device()).train()
    limit = model.config.max_position_embeddings
    if cfg.seq_len > limit:
        raise StageError(f"finetune.seq_len={cfg.seq_len} exceeds the model's max_position_embeddings={limit}")
    pad = model.config.pad_token_id
    try:
        train = SFTBatches(data["train"], cfg.seq_len, cfg.micro_batch, pad, seed=cfg.seed, rank=rank,
                           world_size=world, length_window=cfg.length_window)
    except ValueError as exc:
        unlearnable = sum(not any(mask[1 : cfg.seq_len + 1]) for _, mask in data["train"])
        cut = (f"{unlearnable} of {len(data['train'])} are cut before their answer by finetune.seq_len={cfg.seq_len}: "
               "raise it, or " if unlearnable else "")
        raise StageError(f"fine-tuning data: {exc}; {cut}add examples (instructions.train_per_family, your user data) "
                         "or lower finetune.micro_batch") from None
    return Trainer(model, cfg.engine(world), train, checkpoints, validation=_validation(data["test"], cfg, pad))


def _validation(examples: list[Rendered], cfg: TrainingConfig, pad: int) -> Callable | None:
    """The held-out batches, the same ones at every evaluation; narrower than a micro-batch when
    there are fewer held-out examples, None when none has anything to learn within seq_len."""
    try:
        usable = SFTBatches(examples, cfg.seq_len, 1, pad, seed=cfg.seed).examples
    except ValueError:
        return None
    size = min(cfg.micro_batch, usable)

    def validation():
        held_out = SFTBatches(examples, cfg.seq_len, size, pad, seed=cfg.seed)
        return (held_out.next_batch() for _ in range(min(cfg.eval_batches, held_out.batches_per_epoch)))

    return validation


def _tokenizer(pretrained: Ref) -> Tokenizer:
    return tasks.chat.read_tokenizer(pretrained.dir / "tokenizer.json")


def cut_examples(rendered: list[Rendered], seq_len: int) -> int:
    """How many examples are longer than a training window (seq_len inputs and the next
    target): their ends are not learned, and one cut before its answer not at all."""
    return sum(len(ids) > seq_len + 1 for ids, _ in rendered)


def finetune(
    pretrained: Ref,
    config: PipelineConfig,
    root: Path | str | None = None,
    callback: Callable[[int, dict[str, float]], None] | None = None,
    log: Callable[[str], None] = print,
) -> Ref:
    """Fine-tune the pretrained model on instructions and return the Ref of the result."""
    root = workspace(root)
    fp = finetune_fingerprint(pretrained, config)
    cfg = config.finetune

    def build(out: Path) -> dict:
        quarantine: list[dict] = []
        notes: list[str] = []
        examples = build_examples(config.instructions, quarantine=quarantine, notes=notes)
        for note in notes:
            log(note)
        pd.DataFrame(quarantine, columns=["source", "line", "reason"]).to_parquet(out / QUARANTINE)
        for split, name in EXAMPLE_FILES.items():
            examples_table(examples[split]).to_parquet(out / name, index=False)
        rendered = render_examples(examples, _tokenizer(pretrained))
        cut = cut_examples(rendered["train"], cfg.seq_len)
        if cut:
            log(f"finetune: {cut} of {len(rendered['train'])} training examples are longer than finetune.seq_len="
                f"{cfg.seq_len} tokens and are cut there, so their ends are not learned; raise finetune.seq_len "
                "(up to model.max_position_embeddings) to learn them whole")
        fields = train_stage("finetune", {"pretrained": pretrained}, config, out, work_dir(root, "finetune", fp),
                             build_trainer, tokenizer_dir(pretrained), callback, log, rendered=rendered)
        # the summary line shows the first four: what the user's data became first
        fields["counts"] = {"steps": fields["counts"]["steps"], "examples_train": len(rendered["train"]),
                            "examples_cut": cut, "quarantined_rows": len(quarantine),
                            "examples_test": len(rendered["test"]), **fields["counts"]}
        return fields

    return run_stage("finetune", fp, build, root=root, inputs={"pretrained": pretrained.model_dump()},
                     config={"instructions": config.instructions.model_dump(mode="json"), "finetune": cfg.model_dump()},
                     committed=work_done(root, "finetune", fp))
