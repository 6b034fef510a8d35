"""Muon whose Newton-Schulz iterations run on all matrices of one shape at once.

`torch.optim.Muon` orthogonalises each matrix on its own: five iterations of three small
bf16 matmuls per parameter. A transformer repeats the same few shapes in every layer (the
demo model's 35 Muon matrices have 6 shapes once the tall ones are transposed), so here
each shape's matrices are stacked and iterated as one batched matmul. Each matrix goes
through the same arithmetic as in torch's loop, and on a CPU the updates are bit-identical
to `torch.optim.Muon`'s (tests/model/test_muon.py; elsewhere a batched matmul may round
differently from single ones); the state (one momentum buffer per parameter) and the
options are torch's too.

The iterations run in bf16, as torch's, unless told to run in fp32 (`ns_dtype`): a model
that trains in fp32 orthogonalises in fp32 too (`model.trainer`), and precision `auto`
picks fp32 where bf16 matmuls are the slow ones. There the iterations (11.3 GFLOP per step
of the demo model's fine-tuning) should take about 0.4x their bf16 time, estimated from
the matmul rates of an Intel Xeon without AMX (BENCHMARKS.md, "Muon in the training
precision").
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch.optim._muon import _adjust_lr


def orthogonalise(matrices: list[torch.Tensor], coefficients: tuple[float, float, float], steps: int,
                  eps: float, use_addmm: bool = True, dtype: torch.dtype = torch.bfloat16) -> list[torch.Tensor]:
    """Newton-Schulz orthogonalisation of each matrix in `dtype` (bf16 as torch's
    `_zeropower_via_newtonschulz`), batched over the matrices of one shape. `use_addmm`
    picks between torch's two forms of the polynomial (fused multiply-adds, or separate
    products and sums): the same values up to rounding; torch releases that have the
    option call it `use_addmm`, the others use the fused form."""
    a, b, c = coefficients
    tall = [m.shape[0] > m.shape[1] for m in matrices]
    wide = [m.to(dtype).mT if t else m.to(dtype) for m, t in zip(matrices, tall)]
    by_shape: dict[torch.Size, list[int]] = defaultdict(list)
    for i, m in enumerate(wide):
        by_shape[m.shape].append(i)
    result: dict[int, torch.Tensor] = {}
    for indices in by_shape.values():
        # scaled so that the spectral norm is at most 1, each by its own Frobenius norm
        x = torch.stack([wide[i] / wide[i].norm().clamp(min=eps) for i in indices])
        for _ in range(steps):
            gram = x @ x.mT
            if use_addmm:
                x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
            else:
                x = a * x + (b * gram + c * gram @ gram) @ x
        for i, m in zip(indices, x.unbind()):
            result[i] = m.mT if tall[i] else m
    return [result[i] for i in range(len(matrices))]


class GroupedMuon(torch.optim.Muon):
    """`torch.optim.Muon` with the orthogonalisation batched by shape (`orthogonalise`) and
    run in `ns_dtype` (bf16, torch's, or fp32); its step is torch's otherwise: Nesterov
    momentum, decoupled weight decay, the update scaled by `adjust_lr_fn`."""

    def __init__(self, params, *args, ns_dtype: torch.dtype = torch.bfloat16, **kwargs):
        super().__init__(params, *args, **kwargs)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params: list[torch.Tensor] = []
            grads: list[torch.Tensor] = []
            buffers: list[torch.Tensor] = []
            self._init_group(group, params, grads, buffers)
            momentum = group["momentum"]
            updates = []
            for grad, buffer in zip(grads, buffers):
                buffer.lerp_(grad, 1 - momentum)
                updates.append(grad.lerp(buffer, momentum) if group["nesterov"] else buffer)
            updates = orthogonalise(updates, group["ns_coefficients"], group["ns_steps"], group["eps"],
                                    group.get("use_addmm", True), self.ns_dtype)
            lr = group["lr"]
            for param, update in zip(params, updates):
                param.mul_(1 - lr * group["weight_decay"])
                param.add_(update, alpha=-_adjust_lr(lr, group["adjust_lr_fn"], param.shape))
        return loss
