"""Memory that a CPU training step reuses from one step to the next, for its largest tensors.

The demo's logits, 4096 tokens by a 4096-word vocabulary in bf16, are 32 MiB. glibc's
malloc serves a block that large with fresh pages from the kernel (mmap) and gives them
back when it is freed, so every step pays again to fault them in and have them zero-filled:
here the output head's matmul took 13 ms into fresh memory against 3.3 ms into memory it
had written before (BENCHMARKS.md, "The logits' memory, and fewer copies in the MoE").
A `Workspace` keeps such buffers between steps and lends one out again once nothing holds
it any more.

CUDA's caching allocator already reuses memory, so a workspace lends only on a CPU; on
other devices `take` allocates.
"""

from __future__ import annotations

import math

import torch

# buffers a workspace keeps: the output head's logits of the main loss and of an MTP depth
# are alive at once, from the forward pass until their backward
MAX_BUFFERS = 4


def _unused(buffer: torch.Tensor) -> bool:
    """Whether nothing but the workspace holds `buffer`'s memory: no view of it, and no
    autograd graph that saved one. Counts the references to its storage that torch keeps:
    each tensor or view holds one, and so does the storage's Python object, asked for here.
    (A caller that kept that object alone, without a tensor, would not be seen.)"""
    return torch._C._storage_Use_Count(buffer.untyped_storage()._cdata) == 2


class Workspace:
    """Up to MAX_BUFFERS flat buffers, lent out as tensors of any shape that fits.

    A buffer is lent again only when nothing holds it (`_unused`), so a tensor from `take`
    may live as long as its user needs it: a second forward pass before the first one's
    backward gets another buffer. A buffer too small for a request is replaced by one of the
    requested size, so a workspace holds the largest tensors asked of it (fine-tuning's
    supervised rows vary from batch to batch); with MAX_BUFFERS kept, a free buffer of
    another dtype or device makes way too. Under `torch.inference_mode` it lends nothing.
    Its memory is the model's for as long as the model lives; a copy of the model starts
    with an empty workspace.
    """

    def __init__(self) -> None:
        self.buffers: list[torch.Tensor] = []

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """An uninitialised tensor of `shape`: a free buffer's memory on a CPU, otherwise
        newly allocated."""
        if device.type != "cpu" or torch.is_inference_mode_enabled():  # (an inference tensor kept here
            return torch.empty(shape, dtype=dtype, device=device)      # could not be written outside)
        numel = math.prod(shape)
        free = [b for b in self.buffers if _unused(b)]
        alike = [b for b in free if b.dtype == dtype and b.device == device]
        buffer = next((b for b in alike if b.numel() >= numel), None)
        if buffer is None:
            full = len(self.buffers) >= MAX_BUFFERS
            # a free buffer too small makes way for a larger one; when full, any free one does
            spare = alike[0] if alike else free[0] if full and free else None
            if full and spare is None:
                return torch.empty(shape, dtype=dtype, device=device)
            buffer = torch.empty(numel, dtype=dtype, device=device)
            self.buffers = [b for b in self.buffers if b is not spare] + [buffer]
        return buffer[:numel].view(shape)

    def __deepcopy__(self, memo: dict) -> Workspace:
        return Workspace()

    def __getstate__(self) -> dict:
        return {"buffers": []}
