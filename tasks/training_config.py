"""How long and how to train, apart from `tasks.training` so that a pipeline config is checked
(`tasks.config`) without loading torch: a mistyped value fails in a second. The methods that
hand the settings to the engine import it when called."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, PrivateAttr, model_validator

from tasks.settings import Settings
from tasks.stage import resolve_device

if TYPE_CHECKING:
    import torch

    from model.perf import Precision
    from model.trainer import TrainConfig


# Micro-batches of one optimizer step, which the trainer holds at once: a batch_tokens set by a
# few orders of magnitude too high would otherwise fill memory before the first step ends.
MAX_GRAD_ACCUM = 4096


class TrainingConfig(Settings):
    """How long and how to train; the same form for pretraining and fine-tuning."""

    # the section of the pipeline config this is, as messages name its settings (`tasks.config`)
    _section: str = PrivateAttr("training")

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
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="bf16 autocast (fp32 master weights), fp32, or auto: whichever this device's matmuls "
        "measure faster in (bf16 on a GPU with it and on a CPU with AMX; on some CPUs fp32)."
    )
    compile: bool = Field(False, description="Compile the model with torch.compile.")
    eval_every: int = Field(100, ge=1, description="Validate every N steps (and at the end).")
    eval_batches: int = Field(8, ge=1, description="Validation batches per evaluation.")
    checkpoint_every: int = Field(100, ge=1, description="Checkpoint every N steps (and at the end).")
    keep_last: int = Field(2, ge=1, description="Checkpoints to keep.")
    seed: int = Field(0, ge=0, lt=2**63, description="Seed for initialisation and data order (0 to 2**63 - 1).")
    length_window: int = Field(
        1, ge=1, description="Fine-tuning: regroup each run of this many shuffled batches by example length "
        "(less padding, but a batch holds fewer kinds of example; 1: batches as shuffled). Pretraining windows "
        "are all one length."
    )
    devices: int = Field(1, ge=1, description="Processes to train with (torchrun DDP when > 1).")
    threads: int = Field(0, ge=0, le=1024, description="CPU threads for torch (0: torch's default).")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where to train.")
    init_from: str | None = Field(
        None, description="Model directory to continue from instead of random weights (pretraining only)."
    )

    @model_validator(mode="after")
    def _schedule(self) -> TrainingConfig:
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr={self.min_lr:g} is above lr={self.lr:g}: the schedule decays from lr to min_lr, "
                             "so lower min_lr (or raise lr)")
        if (passes := self.grad_accum(self.devices)) > MAX_GRAD_ACCUM:
            raise ValueError(f"batch_tokens={self.batch_tokens} takes {passes:,} passes of "
                             f"micro_batch x seq_len x devices a step, more than {MAX_GRAD_ACCUM:,}: lower batch_tokens "
                             "or raise micro_batch")
        return self

    def schedule_notes(self) -> list[str]:
        """Settings the schedule cannot follow as given, said before training: a warm-up as long
        as the run takes all its steps; a wsd decay too short to lower the learning rate at any
        step leaves lr as it is (`model.schedule`: the decay starts after the warm-up, and
        reaches min_lr at `steps`, after the last step, so its first step is still at lr)."""
        if self.warmup_steps >= self.steps:
            return [f"warmup_steps={self.warmup_steps} is not less than steps={self.steps}: "
                    "the learning rate warms up over the whole run"]
        decay_steps = round(self.decay_fraction * self.steps)
        if self.schedule != "wsd" or self.steps - max(self.steps - decay_steps, self.warmup_steps) >= 2:
            return []
        if decay_steps >= 2:
            fix = f"lower warmup_steps to {self.steps - decay_steps} or less"
        elif self.steps >= 2:
            fix = f"raise decay_fraction to {2 / self.steps:.3g} or more"
        else:
            fix = "a run of one step has none to decay"
        return [f"decay_fraction={self.decay_fraction:g} of {self.steps} steps after warmup_steps={self.warmup_steps} "
                f"leaves no step to decay: the learning rate stays at lr; {fix}"]

    def batch_notes(self) -> list[str]:
        """A batch_tokens that whole passes of every process cannot make, said before training:
        each step takes the nearest whole number of them (at least one)."""
        per_pass = self.micro_batch * self.seq_len * self.devices
        trained = per_pass * self.grad_accum(self.devices)
        if trained == self.batch_tokens:
            return []
        return [f"batch_tokens={self.batch_tokens} is trained as {trained} tokens a step: whole passes of "
                f"micro_batch x seq_len x devices = {per_pass} tokens; set a multiple of {per_pass} to train "
                "the batch you mean"]

    def grad_accum(self, world: int = 1) -> int:
        per_pass = self.micro_batch * self.seq_len * world
        return max(1, round(self.batch_tokens / per_pass))

    def engine(self, world: int = 1) -> TrainConfig:
        from model.trainer import TrainConfig

        return TrainConfig(
            steps=self.steps, micro_batch=self.micro_batch, grad_accum=self.grad_accum(world), lr=self.lr,
            min_lr=self.min_lr, warmup_steps=min(self.warmup_steps, self.steps), schedule=self.schedule,
            decay_fraction=self.decay_fraction, weight_decay=self.weight_decay, grad_clip=self.grad_clip,
            optimizer=self.optimizer, mtp_lambda=self.mtp_lambda, precision=self.resolved_precision().name,
            compile=self.compile,
            eval_every=self.eval_every, eval_batches=self.eval_batches, checkpoint_every=self.checkpoint_every,
            keep_last=self.keep_last, seed=self.seed,
        )

    def torch_device(self) -> torch.device:
        return resolve_device(self.device, f"{self._section}.device", "'auto' or 'cpu'")

    def resolved_precision(self) -> Precision:
        """The precision training runs in: `auto` as `model.perf.fast_precision` finds it for
        this device (measured once per process)."""
        from model.perf import Precision, fast_precision

        if self.precision == "auto":
            return fast_precision(self.torch_device())
        return Precision(self.precision, "as configured")

    def identity(self, *ignored: str) -> dict[str, Any]:
        """The settings that decide what a run computes, for its fingerprint. Left out: how it
        runs (threads, how often it checkpoints and how many it keeps) and the process count, whose
        ranks share each step's batch: it counts through the sequences of one optimizer step
        (`global_batch`, which grows with it when batch_tokens is less than one pass of every
        rank). The device and the precision count as they resolve (`auto` on a machine without a
        GPU is `cpu`; a precision of `auto`, the one it measures faster here), and so do the
        batch, the warm-up and the schedule's settings (`engine` trains them the same)."""
        values = self.model_dump(exclude={"devices", "threads", "checkpoint_every", "keep_last", *ignored})
        engine = self.engine(self.devices)
        values["device"] = self.torch_device().type
        values["precision"] = engine.precision
        values["global_batch"] = engine.micro_batch * engine.grad_accum * self.devices
        # settings that train the same run count as one: the batch as whole passes make it, the
        # warm-up as the engine clamps it, and what the schedule does not read as its default
        same = {"batch_tokens": values["global_batch"] * self.seq_len, "warmup_steps": engine.warmup_steps}
        unread = {"cosine": ("decay_fraction",), "wsd": (), "constant": ("decay_fraction", "min_lr")}[self.schedule]
        if engine.warmup_steps >= self.steps:  # all warm-up: the schedule after it is never reached
            unread = ("schedule", "decay_fraction", "min_lr")
        elif self.schedule == "wsd":  # as the decay's first step: fractions that round to it decay alike
            decay_start = max(self.steps - round(self.decay_fraction * self.steps), engine.warmup_steps)
            same["decay_fraction"] = (self.steps - decay_start) / self.steps
        same.update({name: type(self).model_fields[name].default for name in unread})
        values.update({name: value for name, value in same.items() if name in values})
        return values

    def apply_threads(self) -> None:
        if self.threads:
            import torch

            torch.set_num_threads(self.threads)
