"""Pretrain stage: a DeepSeek-V3-style model learns next-token prediction on the token shards.

Output (`pretrain/<fingerprint>/`): the finished model (`model.safetensors`,
`model_config.json`), the tokenizer beside it, and the checkpoints of the run. A run
that is killed resumes from its last good checkpoint when started again.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch

import model.attention
import model.config
import model.data
import model.fused
import model.linear
import model.moe
import model.muon
import model.norm
import model.optim
import model.promote
import model.rope
import model.schedule
import model.trainer
import model.transformer
import model.workspace
import tasks.training
import tasks.training_config
from model.checkpoint import MODEL_CONFIG_FILE, MODEL_FILE, load_model
from model.data import TokenWindows, eval_batches
from model.trainer import Trainer
from model.transformer import Transformer
from tasks.config import PipelineConfig
from tasks.files import content_digest
from tasks.stage import Ref, StageError, code_version, fingerprint, run_stage, workspace
from tasks.tokenize import TokenData
from tasks.training import train_stage, work_dir, work_done

# every module whose code decides what training computes: editing one retrains
TRAINING_CODE = (model.attention, model.config, model.data, model.fused, model.linear, model.moe, model.muon, model.norm,
              model.optim, model.promote, model.rope, model.schedule, model.trainer, model.transformer,
              model.workspace, tasks.training, tasks.training_config)


def pretrain_fingerprint(tokens: Ref, config: PipelineConfig) -> str:
    # length_window regroups fine-tuning examples; pretraining windows are all one length
    train = config.training_identity("pretrain", "length_window")
    if train["init_from"]:  # the model it starts from, by content: not how its path is written
        train["init_from"] = {"model": _model_digest(Path(train["init_from"]))}
    settings = {"model": config.model_identity(), "train": train}
    return fingerprint("pretrain", settings, [tokens.fingerprint], code_version(sys.modules[__name__], *TRAINING_CODE))


def _model_digest(directory: Path) -> str | None:
    """A hash of a model directory's weights and config (None where it has none: the stage then
    says what is wrong with the directory). A model trained again or exported anew at the same
    path changes it."""
    try:
        return content_digest([directory / MODEL_FILE, directory / MODEL_CONFIG_FILE])
    except OSError:
        return None


def tokenizer_dir(tokens: Ref) -> Path:
    return TokenData(tokens).tokenizer_dir


def continue_from(net: Transformer, directory: Path, data: TokenData) -> None:
    """Start from an earlier model's weights; it must share this run's tokenizer and shape."""
    if not (directory / "tokenizer.json").is_file():
        raise StageError(f"pretrain.init_from={directory} is not a model directory (it has no tokenizer.json): "
                         "give a finished pretrain or finetune output, or null to train from scratch")
    same_tokenizer = (directory / "tokenizer.json").read_bytes() == (data.tokenizer_dir / "tokenizer.json").read_bytes()
    if not same_tokenizer:
        raise StageError(
            f"cannot continue from {directory}: the corpus produced a different tokenizer; "
            "train from scratch (pretrain.init_from: null) or keep the tokenizer's corpus unchanged"
        )
    previous = load_model(directory)
    if previous.config != net.config:
        raise StageError(f"cannot continue from {directory}: its model config differs from model: in this config")
    net.load_state_dict(previous.state_dict())


def build_trainer(tokens: Ref, config: PipelineConfig, checkpoints: Path, rank: int = 0, world: int = 1) -> Trainer:
    """The model, data and engine of a pretraining run (the same on every DDP rank)."""
    data = TokenData(tokens)
    train_cfg = config.pretrain
    model_cfg = config.model_for(data.vocab_size, data.special_ids)
    torch.manual_seed(train_cfg.seed)
    device = train_cfg.torch_device()
    net = Transformer(model_cfg)
    if train_cfg.init_from:
        continue_from(net, Path(train_cfg.init_from), data)
    net = net.to(device)
    try:
        train = TokenWindows(data.files("train"), data.dtype, train_cfg.seq_len, data.bos_id,
                             train_cfg.micro_batch, seed=train_cfg.seed, rank=rank, world_size=world)
    except ValueError as exc:
        raise StageError(f"pretraining data: {exc}; collect more text, or lower pretrain.seq_len or "
                         "pretrain.micro_batch") from None
    val_files = data.files("validation")
    return Trainer(
        net,
        train_cfg.engine(world),
        train,
        checkpoints,
        validation=(lambda: eval_batches(val_files, data.dtype, train_cfg.seq_len, train_cfg.micro_batch,
                                         train_cfg.eval_batches)) if val_files else None,
        bytes_per_token=data.bytes_per_token("validation"),
    )


def pretrain(
    tokens: Ref,
    config: PipelineConfig,
    root: Path | str | None = None,
    callback: Callable[[int, dict[str, float]], None] | None = None,
    log: Callable[[str], None] = print,
) -> Ref:
    """Train a model on `tokens` (the tokenize stage's output) and return its Ref."""
    root = workspace(root)
    fp = pretrain_fingerprint(tokens, config)

    def build(out: Path) -> dict:
        return train_stage("pretrain", {"tokens": tokens}, config, out, work_dir(root, "pretrain", fp),
                           build_trainer, tokenizer_dir(tokens), callback, log)

    return run_stage("pretrain", fp, build, root=root, inputs={"tokens": tokens.model_dump()},
                     config={"model": config.model, "pretrain": config.pretrain.model_dump()},
                     committed=work_done(root, "pretrain", fp))
