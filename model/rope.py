"""Rotary position embedding for MLA's decoupled rope slice, with optional YaRN.

Only `qk_rope_head_dim` of each query/key head is rotated; the rest ("nope") carries
no position, which is what lets MLA cache a compressed latent. Layout is
rotate-half (first half pairs with second half), matching HF with rope_interleave=False.
"""

from __future__ import annotations

import math

import torch

from model.config import ModelConfig, yarn_mscale


def inv_frequencies(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and the cos/sin scale (1.0 unless YaRN says otherwise)."""
    dim, base = config.qk_rope_head_dim, config.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    scaling = config.rope_scaling
    if not scaling:
        return inv_freq, 1.0
    factor = float(scaling["factor"])
    original = int(scaling["original_max_position_embeddings"])
    beta_fast, beta_slow = scaling.get("beta_fast", 32), scaling.get("beta_slow", 1)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    # ramp 0: keep the original frequency (extrapolate); 1: divide by factor (interpolate)
    inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
    mscale, mscale_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if mscale and mscale_all:
        attention = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all)
    else:
        attention = yarn_mscale(factor)
    return inv_freq, attention


def rope_cache(config: ModelConfig, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin tables of shape [length, qk_rope_head_dim]: the sin table's first
    half negated, the sign that rotate-half gives the second half of x (see `apply_rope`)."""
    inv_freq, attention = inv_frequencies(config)
    freqs = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * attention, torch.cat((-freqs, freqs), dim=-1).sin() * attention


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [..., T, d] by the tables of `rope_cache` [T, d] (broadcast over leading
    dims): x * cos + rotate_half(x) * sin, where rotate_half(x) = (-x2, x1) for x's halves
    (x1, x2). With the sign in the table, (x2, x1) * signed_sin is x's halves swapped (one
    `roll`) times the table: the same products, bit for bit, in two ops fewer."""
    if cos.dtype != x.dtype:  # (a cast that changes nothing still costs a call: a decoded token runs 8 ropes)
        cos, signed_sin = cos.to(x.dtype), signed_sin.to(x.dtype)
    return x * cos + x.roll(x.shape[-1] // 2, -1) * signed_sin
