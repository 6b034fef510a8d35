"""RMSNorm, computed in fp32 whatever the activation dtype (as DeepSeek-V3 and HF do).

The arithmetic is HF's: normalise in fp32, round to the input dtype, scale by the gain.
It runs as one autograd function so that backward keeps only the input and one scale
per row (plain autograd would also keep the normalised copy). Under autocast the
output is already in autocast's dtype: every consumer is a matmul that would cast it
anyway, and casting once here means one copy instead of one per consumer.
"""

import torch
from torch import nn

from model.fused import fused


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast runs matmuls in on x's device, or None when autocast is off."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
              out_dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The output and the per-row scale 1/rms, outside autograd."""
    x32 = x.to(torch.promote_types(x.dtype, torch.float32))
    scale = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * (x32 * scale).to(x.dtype)
    return (out if out_dtype is None else out.to(out_dtype)), scale


_fused_rms_norm = fused(_rms_norm)


@fused
def _rms_norm_backward(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                       grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    compute = scale.dtype
    normed = x.to(compute) * scale
    grad = grad.to(compute)
    grad_weight = (grad * normed.to(x.dtype).to(compute)).flatten(0, -2).sum(0)
    grad_normed = grad * weight.to(compute)
    grad_x = scale * (grad_normed - normed * (grad_normed * normed).mean(-1, keepdim=True))
    return grad_x.to(x.dtype), grad_weight.to(weight.dtype)


class RMSNormFunction(torch.autograd.Function):
    """RMSNorm keeping only its input and the row scales for backward; in training both
    directions are fused kernels (`model.fused`)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype | None) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])  # one rank for every caller: fewer compiled variants
        out, scale = _fused_rms_norm(rows, weight, eps, out_dtype)
        ctx.save_for_backward(rows, weight, scale)
        return out.view(x.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None]:
        rows, weight, scale = ctx.saved_tensors
        grad_x, grad_weight = _rms_norm_backward(rows, weight, scale, grad.reshape(rows.shape))
        return grad_x.view(grad.shape), grad_weight, None, None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight  # (a module attribute costs ~0.4 µs a lookup: a decoded token runs 17 norms)
        out_dtype = autocast_dtype(x)
        if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
            return RMSNormFunction.apply(x, weight, self.eps, out_dtype)
        # decoding: no autograd overhead; in fp32, torch's rms_norm does the same arithmetic in fewer calls
        if out_dtype is None and x.dtype == weight.dtype == torch.float32:
            return torch.rms_norm(x, weight.shape, weight, self.eps)
        return _rms_norm(x, weight, self.eps, out_dtype)[0]
