"""Bias-free linear layers that multiply a single row (batch-1 decoding) by a large weight
as an elementwise product and row sum instead of a BLAS call, on CPUs where that is faster.

Decoding one token multiplies one row by each weight matrix, so each matrix is read once
from memory for one multiply-add per element. How fast torch's BLAS, MKL, does that
depends on whose CPU it runs on: MKL picks its optimised kernels for Intel's CPUs.
- On an AMD EPYC (the MKL in torch 2.13's wheel), `F.linear` multiplies one row by a 4 MB
  fp32 matrix that is not in cache in ~470 us (~9 GB/s), while torch's own
  `(weight * row).sum(-1)` takes ~170 us (and a plain `sum` reads the matrix at 27-32
  GB/s); 768 x 256 takes 112 against 52 us.
- On an Intel Xeon the same `F.linear` takes ~125 us, and the row product is 1.5-4.3x
  slower than it on every demo shape: decoding a demo token took 2.7 ms with row products
  and 1.9 ms without.
So a single row takes the row product only where MKL runs on a CPU that is not Intel's
(`ROW_PRODUCT`; `python -m benchmarks.row_product` measures both, tables in BENCHMARKS.md).
Below `ROW_PRODUCT_MIN` weight elements the row product is no faster from memory (the
demo's 96 x 256, 128 x 256 and 256 x 128 took 0.82-2.6x `F.linear`'s time in two runs,
with two threads, on the AMD CPU) and slower from cache. It is the same sum in another
order: results differ from `F.linear`'s in the last bits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.perf import cpu_vendor



def row_product_pays(vendor: str | None, mkl: bool) -> bool:
    """Whether one fp32 row goes faster as a row product than through torch's BLAS, on a CPU
    of `vendor` (`model.perf.cpu_vendor`) with torch built on MKL or not (module docstring).
    Without MKL, or where the vendor is unknown, there is no measurement: the BLAS it is."""
    return mkl and vendor is not None and vendor != "GenuineIntel"


# whether single fp32 rows take the row product on this machine
ROW_PRODUCT = row_product_pays(cpu_vendor(), torch.backends.mkl.is_available())

# weight elements from which one fp32 row is multiplied as an elementwise product and row sum
ROW_PRODUCT_MIN = 1 << 16

# weight elements multiplied at once: the product's temporary stays this size (4 MiB)
ROW_PRODUCT_CHUNK = 1 << 20


def _row_product(row: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The `out` products weight @ row for one row [..., in] (leading sizes 1) against weight
    [out, in], in chunks of output rows; their leading shape follows broadcasting (one chunk)
    or is none (several): the caller views them."""
    step = max(1, ROW_PRODUCT_CHUNK // weight.shape[1])
    if weight.shape[0] <= step:
        return (weight * row).sum(-1)
    row = row.reshape(-1)
    out = row.new_empty(weight.shape[0])
    for start in range(0, weight.shape[0], step):
        torch.sum(weight[start : start + step] * row, -1, out=out[start : start + step])
    return out


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`F.linear(x, weight)` without bias; where `ROW_PRODUCT` holds, a single fp32 row on a
    CPU, outside autograd and autocast, against a weight of at least `ROW_PRODUCT_MIN`
    elements, takes the row product (module docstring)."""
    # cheap checks and no reshape of x: a demo token runs this 41 times (`x.device.type` would
    # cost 0.3 µs, a reshape 0.75 µs; these checks ~1 µs in all)
    if (ROW_PRODUCT and not torch.is_grad_enabled() and x.is_cpu and x.dtype == weight.dtype == torch.float32
            and x.numel() == x.shape[-1] == weight.shape[1] and weight.numel() >= ROW_PRODUCT_MIN
            and not torch.is_autocast_enabled("cpu")):
        return _row_product(x, weight).view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight)


class Linear(nn.Linear):
    """`nn.Linear` without bias, through `linear`."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)
