"""What this machine can do: its matmul peak, measured, so MFU is a fraction of what the
hardware actually does here rather than of a datasheet number; whether torch.compile
can build CPU kernels here; and whose CPU it is, which decides how fast MKL's kernels are."""

from __future__ import annotations

import functools
import os
import shlex
import shutil
import time

import torch


@functools.cache
def matmul_peak_flops(device: torch.device, dtype: torch.dtype, size: int = 2048, seconds: float = 0.3) -> float:
    """Best FLOP/s of a square matmul of `size` in `dtype` over about `seconds`."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    torch.matmul(a, b)  # warm-up
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        torch.matmul(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = max(best, 2 * size**3 / (time.perf_counter() - start))
    return best


def cpp_compiler() -> str | None:
    """The C++ compiler torch.compile builds CPU kernels with ($CXX, g++ or clang++), or None."""
    names = [shlex.split(os.environ["CXX"])[0]] if os.environ.get("CXX", "").strip() else []
    return next((path for name in [*names, "g++", "clang++"] if (path := shutil.which(name))), None)


@functools.cache
def cpu_vendor() -> str | None:
    """The CPU's vendor as Linux names it (GenuineIntel, AuthenticAMD, ...), or None where
    /proc/cpuinfo does not say (other systems, other architectures)."""
    try:
        with open("/proc/cpuinfo") as info:
            return next((line.split(":", 1)[1].strip() for line in info if line.startswith("vendor_id")), None)
    except OSError:
        return None
