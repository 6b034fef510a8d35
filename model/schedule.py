"""Learning-rate schedules as a pure function of the step.

The trainer sets the learning rate on every parameter group at each step from
`lr_at(step, ...)`, so a schedule has no state of its own: resuming a run only needs
the step number, which the checkpoint already holds.

- cosine: linear warmup to `max_lr`, then half a cosine down to `min_lr` at `total_steps`.
- wsd (warmup-stable-decay): linear warmup, `max_lr` held, then a linear decay to
  `min_lr` over the last `decay_fraction` of the steps. A stable phase makes it cheap to
  branch a longer run from any checkpoint taken before the decay.
- constant: linear warmup, then `max_lr` for ever.

Past `total_steps` the decaying schedules stay at `min_lr`.
"""

from __future__ import annotations

import math
from typing import Literal

ScheduleKind = Literal["cosine", "wsd", "constant"]
KINDS: tuple[str, ...] = ("cosine", "wsd", "constant")


def _check(max_lr: float, min_lr: float, warmup_steps: int, total_steps: int, kind: str, decay_fraction: float) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown schedule kind {kind!r}; expected one of {', '.join(KINDS)}")
    if not 0 <= min_lr <= max_lr:
        raise ValueError(f"need 0 <= min_lr <= max_lr, got min_lr={min_lr}, max_lr={max_lr}")
    if warmup_steps < 0 or total_steps < 1:
        raise ValueError(f"need warmup_steps >= 0 and total_steps >= 1, got {warmup_steps} and {total_steps}")
    if not 0 < decay_fraction <= 1:
        raise ValueError(f"decay_fraction must be in (0, 1], got {decay_fraction}")


def lr_at(
    step: int,
    *,
    max_lr: float,
    min_lr: float,
    warmup_steps: int,
    total_steps: int,
    kind: ScheduleKind = "cosine",
    decay_fraction: float = 0.2,
) -> float:
    """The learning rate for optimizer step `step` (0-based)."""
    _check(max_lr, min_lr, warmup_steps, total_steps, kind, decay_fraction)
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if kind == "constant":
        return max_lr
    if kind == "cosine":
        span = max(total_steps - warmup_steps, 1)
        progress = min((step - warmup_steps) / span, 1.0)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)
    decay_start = max(total_steps - round(decay_fraction * total_steps), warmup_steps)
    if step < decay_start:
        return max_lr
    span = max(total_steps - decay_start, 1)
    progress = min((step - decay_start) / span, 1.0)
    return max_lr - progress * (max_lr - min_lr)
