"""What this machine can do: its matmul peak, measured, so MFU is a fraction of what the
hardware actually does here rather than of a datasheet number; which precision trains
faster here; whether torch.compile can build CPU kernels here; and whose CPU it is, which
decides how fast MKL's kernels are."""

from __future__ import annotations

import functools
import math
import os
import shlex
import shutil
import time
from typing import NamedTuple

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


def bf16_speedup(size: int = 512, rounds: int = 40) -> float:
    """How many times faster a CPU square matmul of `size` runs in bf16 than in fp32: the best
    time of each over `rounds` rounds that alternate the two, so a burst of other work on
    the machine slows both alike (timed one after the other, 0.1 s each, a co-tenant busy
    for 0.15 s in 0.3 s made bf16 measure 0.19x fp32 on a CPU where it is 2.2x)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    pairs = [(a.bfloat16(), b.bfloat16()), (a, b)]
    best = [math.inf, math.inf]
    for _ in range(3):  # warm-up: the first products of a dtype set up its kernels
        for x, y in pairs:
            torch.matmul(x, y)
    for _ in range(rounds):
        for index, (x, y) in enumerate(pairs):
            start = time.perf_counter()
            torch.matmul(x, y)
            best[index] = min(best[index], time.perf_counter() - start)
    return best[1] / best[0]


class Precision(NamedTuple):
    name: str  # bf16 or fp32, as training configs spell it
    reason: str  # why, for the log


@functools.cache
def fast_precision(device: torch.device) -> Precision:
    """The precision a training step runs faster in on `device`: bf16 autocast on a GPU that
    has bf16; on a CPU whichever of bf16 and fp32 its matmuls measure faster in here. A CPU
    with bf16 instructions is not always faster in bf16 (BENCHMARKS.md, "Which precision
    trains faster"): with AMX its bf16 matmuls run about 6x its fp32 ones, on an AMD EPYC
    with AVX-512 BF16 2.2x (Zen 4) to 4.3x (Zen 5), on an Intel Xeon with AVX-512 BF16 but
    no AMX 0.5x. Far from 1x either way, and measured in alternation (`bf16_speedup`), so a
    busy machine does not flip the choice, nor the fingerprints of the runs that take it."""
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return Precision("bf16", "this GPU has bf16")
        return Precision("fp32", "this GPU has no bf16")
    ratio = bf16_speedup()
    return Precision("bf16" if ratio > 1 else "fp32", f"bf16 matmuls run at {ratio:.2f}x fp32's on this CPU")


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
