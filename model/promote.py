"""Adding tensors of two dtypes on a CPU, as the residual stream does under autocast.

Under autocast the residual stream stays fp32 while attention and the MLPs return bf16
(the routed experts' sum is fp32 again). torch adds two dtypes on a CPU in a per-element
casting loop: on an AMD EPYC of the Zen 4 family 3.1 ms for the demo's [16, 256, 256]
fp32 + bf16, against 0.4 ms to cast first and add. Elsewhere the two are about even: 0.41
against 0.46 ms on an Intel Xeon without AMX (which trains in fp32 unless told otherwise),
0.15-0.18 against 0.16-0.17 ms on a Zen 5 EPYC. The values are the same: the narrower
dtype widens exactly.
"""

import torch


def add_promoted(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x + y in the dtype torch's type promotion gives their sum; on a CPU each is cast to it
    first (a GPU adds two dtypes in one kernel, where the casts would be two more)."""
    if x.dtype == y.dtype or not x.is_cpu:
        return x + y
    dtype = torch.promote_types(x.dtype, y.dtype)
    return x.to(dtype) + y.to(dtype)
