"""The training engine shared by pretraining and fine-tuning.

One loop: gradient accumulation to a global batch, bf16 autocast over fp32 master
weights, clipping, the scheduled learning rate, the aux-loss-free router bias update
after every optimizer step (with expert loads summed over micro-batches and ranks),
periodic validation, and atomic checkpoints from which a killed run resumes exactly.
Metrics leave through a plain callback, so this module knows nothing of MLflow or
Prefect. Under `torchrun` (DDP) every rank runs the same loop; rank 0 reports and
writes checkpoints.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Protocol

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from model.checkpoint import load_latest, restore_rng, save_checkpoint
from model.data import Batch
from model.optim import build_optimizer
from model.perf import matmul_peak_flops
from model.schedule import lr_at
from model.transformer import Transformer, step_flops

Callback = Callable[[int, dict[str, float]], None]


class NonFiniteLoss(RuntimeError):
    """The loss or the gradient became NaN or infinite; nothing from that step was applied or saved."""


class Batches(Protocol):
    def next_batch(self) -> Batch: ...
    def state_dict(self) -> dict[str, int]: ...
    def load_state_dict(self, state: dict[str, int]) -> None: ...


@dataclass
class TrainConfig:
    steps: int = 200
    micro_batch: int = 8
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 20
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    decay_fraction: float = 0.2
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    optimizer: Literal["adamw", "muon"] = "adamw"
    mtp_lambda: float = 0.3
    precision: Literal["bf16", "fp32"] = "bf16"
    compile: bool = False
    eval_every: int = 50
    eval_batches: int = 8
    checkpoint_every: int = 50
    keep_last: int = 2
    log_every: int = 1
    seed: int = 0


def matmul_dtype(precision: str) -> torch.dtype:
    """The dtype a step of `precision` multiplies in: autocast's, Muon's iterations' and that of
    the matmul peak its MFU is measured against."""
    return torch.bfloat16 if precision == "bf16" else torch.float32


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=matmul_dtype(precision))
    return contextlib.nullcontext()


def distributed() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class Trainer:
    def __init__(
        self,
        model: Transformer,
        config: TrainConfig,
        train: Batches,
        checkpoint_dir: str | Path,
        *,
        validation: Callable[[], Iterable[Batch]] | None = None,
        bytes_per_token: float | None = None,
    ):
        self.model = model
        self.config = config
        self.train = train
        self.validation = validation
        self.bytes_per_token = bytes_per_token
        self.checkpoint_dir = Path(checkpoint_dir)
        # what the caller sets to see each step's metrics and the warnings of resuming
        self.callback: Callback = lambda step, metrics: None
        self.warn: Callable[[str], None] = lambda message: None
        # called after every step, its checkpoint included: where the caller stops a run
        # whose stop request was lost on the way (`tasks.interrupts`)
        self.after_step: Callable[[], None] = lambda: None
        self.device = next(model.parameters()).device
        self.rank, self.world = distributed()
        # MTP depths without loss weight are not run, and frozen: neither the optimizer nor
        # DDP waits for gradients they will never get
        self.use_mtp = config.mtp_lambda > 0
        if not self.use_mtp:
            model.mtp.requires_grad_(False)
        self.optimizer = build_optimizer(
            model, lr=config.lr, weight_decay=config.weight_decay, betas=config.betas, kind=config.optimizer,
            muon_dtype=matmul_dtype(config.precision),
        )
        self.step = 0
        self.saved_step = 0  # the step of the newest checkpoint written or resumed from (0: none)
        self.net = DistributedDataParallel(model) if self.world > 1 else model
        if config.compile:
            self.net = torch.compile(self.net)
        self.peak_flops = matmul_peak_flops(self.device, matmul_dtype(config.precision))

    # ---- checkpoints -------------------------------------------------------------------

    def resume(self) -> bool:
        """Continue from the newest good checkpoint, if any."""
        checkpoint = load_latest(self.checkpoint_dir, on_warning=self.warn)
        if checkpoint is None:
            return False
        self.model.load_state_dict(checkpoint.model_state)
        self.optimizer.load_state_dict(checkpoint.optimizer_state)
        self.train.load_state_dict(checkpoint.extra["loader"])
        restore_rng(checkpoint.rng)
        self.step = self.saved_step = checkpoint.step
        return True

    def save(self) -> None:
        self.saved_step = self.step
        if self.rank != 0:
            return
        save_checkpoint(
            self.checkpoint_dir,
            self.step,
            model_state=self.model.state_dict(),
            optimizer_state=self.optimizer.state_dict(),
            extra={"loader": self.train.state_dict(), "train_config": asdict(self.config),
                   "model_config": self.model.config.to_dict()},
            keep_last=self.config.keep_last,
        )

    # ---- the loop ----------------------------------------------------------------------

    def _micro_step(self, inputs: torch.Tensor, targets: torch.Tensor, last: bool,
                    weight: float) -> dict[str, torch.Tensor]:
        """Forward and backward of one micro-batch, its mean losses scaled by `weight` (its share
        of the step's scored tokens) and the balance loss by 1/grad_accum; those scaled losses."""
        sync = contextlib.nullcontext() if last or self.world == 1 else self.net.no_sync()
        with sync, autocast(self.device, self.config.precision):
            out = self.net(inputs.to(self.device), targets.to(self.device), mtp=self.use_mtp)
            losses = {"loss": out.loss * weight, "mtp_loss": out.mtp_loss * weight,
                      "balance_loss": out.aux_loss / self.config.grad_accum}
            (losses["loss"] + self.config.mtp_lambda * losses["mtp_loss"] + losses["balance_loss"]).backward()
        return {key: value.detach() for key, value in losses.items()}

    def _token_shares(self, counts: list[int]) -> list[float]:
        """Each micro-batch's weight: its scored tokens (`counts`) over the mean a rank scores in
        the step. Fine-tuning's micro-batches hold different numbers of answer tokens; so weighted,
        the step's loss and gradient are the mean over all its tokens however the batch is split
        into micro-batches and ranks (DDP averages the ranks' gradients: hence the mean)."""
        total = torch.tensor(float(sum(counts)), device=self.device)
        if self.world > 1:
            dist.all_reduce(total)
        per_rank = max(float(total), 1.0) / self.world
        return [count / per_rank for count in counts]

    def _balance_routers(self) -> list[float]:
        if self.world > 1:
            for moe in self.model.moe_layers(self.use_mtp):
                dist.all_reduce(moe.expert_load)
        return self.model.update_router_bias(self.use_mtp)

    def _divergence(self, metrics: dict[str, float]) -> str:
        """What stopped training: the losses (all three shown) or the gradient norm that are not
        finite, and the checkpoint a resumed run would start from."""
        names = {"loss": "loss", "mtp_loss": "MTP loss", "balance_loss": "balance loss", "grad_norm": "gradient norm"}
        shown = [key for key in names if key in metrics]
        bad = [names[key] for key in shown if not math.isfinite(metrics[key])]
        values = ", ".join(f"{names[key]} {metrics[key]:.4g}" for key in shown)
        kept = (f"the checkpoint of step {self.saved_step} is kept" if self.saved_step
                else "no checkpoint was written before it")
        return (f"training stopped at step {self.step + 1}: the {' and '.join(bad)} {'is' if len(bad) == 1 else 'are'} "
                f"not finite ({values}); {kept}. Lower the learning rate or check the data.")

    def train_step(self) -> dict[str, float]:
        cfg = self.config
        started = time.perf_counter()
        lr = lr_at(self.step, max_lr=cfg.lr, min_lr=cfg.min_lr, warmup_steps=cfg.warmup_steps,
                   total_steps=cfg.steps, kind=cfg.schedule, decay_fraction=cfg.decay_fraction)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        sums: dict[str, torch.Tensor] = {}
        batches = [self.train.next_batch() for _ in range(cfg.grad_accum)]
        counts = [int((targets != -100).sum()) for _, targets in batches]  # positions with a target
        shares = self._token_shares(counts)
        positions, scored = sum(inputs.numel() for inputs, _ in batches), sum(counts)  # (padding included)
        for micro, ((inputs, targets), share) in enumerate(zip(batches, shares)):
            for key, value in self._micro_step(inputs, targets, micro == cfg.grad_accum - 1, share).items():
                sums[key] = sums.get(key, 0) + value
        if self.world > 1:
            stacked = torch.stack([sums[k] for k in sorted(sums)])
            dist.all_reduce(stacked, op=dist.ReduceOp.AVG)
            sums = dict(zip(sorted(sums), stacked))
        metrics = {key: float(value) for key, value in sums.items()}
        if not all(math.isfinite(v) for v in metrics.values()):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLoss(self._divergence(metrics))
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip))
        if not math.isfinite(grad_norm):  # finite losses can still overflow their gradients
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLoss(self._divergence({**metrics, "grad_norm": grad_norm}))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        max_vio = self._balance_routers()
        self.step += 1
        seconds = time.perf_counter() - started
        metrics.update(
            lr=lr,
            grad_norm=grad_norm,
            tokens_per_s=positions * self.world / seconds,
            mfu=step_flops(self.model, inputs.shape[1], positions, scored) / seconds / self.peak_flops,
        )
        for layer, value in enumerate(max_vio):
            metrics[f"max_vio/moe_{layer}"] = value
        if max_vio:
            metrics["max_vio"] = max(max_vio)
        return metrics

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean validation loss per token, and bits per byte when bytes/token is known."""
        self.model.eval()
        total, count = 0.0, 0
        try:
            for inputs, targets in self.validation():
                with autocast(self.device, self.config.precision):
                    logits = self.model(inputs.to(self.device)).logits
                losses = torch.nn.functional.cross_entropy(
                    logits.flatten(0, 1).float(), targets.to(self.device).flatten(), ignore_index=-100, reduction="sum"
                )
                total += float(losses)
                count += int((targets != -100).sum())
        finally:
            self.model.train()
        if count == 0:
            return {}
        loss = total / count
        metrics = {"val_loss": loss}
        if self.bytes_per_token:
            metrics["val_bpb"] = loss / math.log(2) / self.bytes_per_token
        return metrics

    def fit(self) -> dict[str, float]:
        """Train to `config.steps` (continuing a resumed run) and return the last metrics."""
        cfg = self.config
        self.model.train()
        last: dict[str, float] = {}
        while self.step < cfg.steps:
            metrics = self.train_step()
            final = self.step == cfg.steps
            if self.validation and (self.step % cfg.eval_every == 0 or final):
                metrics.update(self.evaluate())
            if self.rank == 0 and (self.step % cfg.log_every == 0 or final):
                self.callback(self.step, metrics)
            if self.step % cfg.checkpoint_every == 0 or final:
                self.save()
            last.update(metrics)
            self.after_step()
        return last

