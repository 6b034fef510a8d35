"""Bias-free linear layers whose one-row products, the whole of batch-1 decoding, read
their weights at the speed of memory.

Decoding one token multiplies a single row by every weight matrix, so each matrix is read
once from memory and used for one multiply-add per element. On the development CPU (AMD
EPYC, torch 2.13's MKL) the BLAS behind `F.linear` streams a matrix that is not in cache
at ~8 GB/s in that case, while torch's own elementwise product and row sum read it at
~20 GB/s: 4096 x 256 fp32 (the demo's output head) takes 515 against 190 us, 768 x 256
97 against 40 us. With the weights in cache (small matrices) the BLAS call is faster, so
the row product is taken from `ROW_PRODUCT_MIN` elements on. It is the same sum in
another order: results differ from `F.linear`'s in the last bits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.norm import autocast_dtype

# weight elements from which one fp32 row is multiplied as an elementwise product and row
# sum (smaller matrices stay in cache, where the BLAS call is faster)
ROW_PRODUCT_MIN = 1 << 16

# weight elements multiplied at once: the product's temporary stays this size (4 MiB)
ROW_PRODUCT_CHUNK = 1 << 20


def _row_product(row: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """weight @ row for one row [in] against weight [out, in], in chunks of output rows."""
    step = max(1, ROW_PRODUCT_CHUNK // weight.shape[1])
    if weight.shape[0] <= step:
        return (weight * row).sum(-1)
    out = row.new_empty(weight.shape[0])
    for start in range(0, weight.shape[0], step):
        torch.sum(weight[start : start + step] * row, -1, out=out[start : start + step])
    return out


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`F.linear(x, weight)` without bias; a single fp32 row on a CPU, outside autograd and
    autocast, against a large enough weight, takes the row product (module docstring)."""
    if (x.numel() == x.shape[-1] and weight.numel() >= ROW_PRODUCT_MIN and x.device.type == "cpu"
            and x.dtype == weight.dtype == torch.float32 and not torch.is_grad_enabled() and autocast_dtype(x) is None):
        return _row_product(x.reshape(-1), weight).view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight)


class Linear(nn.Linear):
    """`nn.Linear` without bias, through `linear`."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)
