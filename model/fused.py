"""Elementwise stretches of a CPU training step, fused into single kernels by torch.compile.

Run eagerly, each torch op reads and writes whole tensors: an RMSNorm's backward is about
a dozen passes over [tokens, hidden], the loss's several over [tokens, vocab]. On a CPU
whose bf16 matmuls are fast (AMX), those passes, not the matmuls, take most of a training
step. Inductor compiles each function marked `@fused` into one or two C++ loops that read
their inputs once (BENCHMARKS.md: the demo step 1.2x faster). Compiling the whole model
does not pay on a CPU; these few functions compile once per process, with dynamic shapes
(5-10 s in all with torch's kernel cache filled, 20-35 s without).

A fused function runs compiled when its first tensor argument is on the CPU, grad mode is
off (as inside an autograd function), a C++ compiler exists (`model.perf.cpp_compiler`),
`TINYSEEK_FUSED_KERNELS` is not `0`, and no torch.compile is already tracing it (a
compiled model fuses it itself). Otherwise it runs as written, op by op: the same
arithmetic, rounded as eager torch rounds it. Decoding does not use them. Should the
compiler fail to build a kernel (a C++ compiler without Python's headers, say), the
process warns once and goes on op by op.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Callable, TypeVar

import torch

from model.perf import cpp_compiler

F = TypeVar("F", bound=Callable)

RECOMPILE_LIMIT = 64  # compiled variants per fused function

log = logging.getLogger(__name__)
# why the compiler could not build a fused kernel in this process; None while it can
_failure: str | None = None


def enabled() -> bool:
    """Whether fused kernels may be used at all here (see the module docstring)."""
    return os.environ.get("TINYSEEK_FUSED_KERNELS", "1") != "0" and _failure is None and _has_compiler()


def active(tensor: torch.Tensor) -> bool:
    """Whether a fused function given `tensor` first runs compiled. Fused functions run inside
    autograd functions' forward and backward, where grad mode is off; with it on (a backward
    with create_graph=True) they run op by op, so that their result can be differentiated."""
    return (tensor.device.type == "cpu" and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and enabled())


@functools.cache
def _has_compiler() -> bool:
    return cpp_compiler() is not None


def fused(fn: F) -> F:
    """`fn` compiled on first use for CPU tensors (see the module docstring), eager otherwise."""
    compiled = None

    @functools.wraps(fn)
    def call(*args):
        nonlocal compiled
        if not active(args[0]):
            return fn(*args)
        if compiled is None:
            # not fullgraph: should a variant ever exceed the recompile limit, it runs eagerly
            compiled = torch.compile(fn, dynamic=True)
        # detached, the arguments are plain tensors: dynamo compiles one variant whether or not they
        # require grad, and for every size (a parameter's would be static); writes reach them all the
        # same. Dtypes, strides and views still make variants (a dozen in a test session that trains in
        # fp32, bf16 and fp64): more than dynamo's default limit of 8 per function.
        try:
            with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
                return compiled(*(arg.detach() if isinstance(arg, torch.Tensor) else arg for arg in args))
        except torch._dynamo.exc.BackendCompilerFailed as exc:  # raised before the kernel ran: run again op by op
            _give_up(exc)
            return fn(*args)

    return call  # type: ignore[return-value]


def compile_afresh() -> None:
    """Forget every kernel torch.compile built in this process, fused or a compiled model's.
    One built for dynamic shapes serves every later size but keeps the code tuned to the sizes
    it first saw, and its reductions round accordingly: a stage that took over the kernels of
    the stage before it in one process (the pipeline pretrains, fine-tunes and evaluates in
    one) computed other values than the same stage run alone. Each such stage calls this first;
    the kernels come back from torch's on-disk cache in seconds."""
    torch._dynamo.reset()


def _give_up(exc: Exception) -> None:
    """Turn fused kernels off for the rest of the process, saying why once."""
    global _failure
    text = str(exc).strip()
    # the first line names the error; a failed compile's output follows its command
    output = text.partition("\nOutput:\n")[2].splitlines()
    said = [text.splitlines()[0] if text else type(exc).__name__,
            *[line.strip() for line in output if "error" in line][:1]]
    _failure = ": ".join(said)[:300]
    log.warning(f"fused CPU kernels are off in this process: torch.compile could not build them ({_failure}). "
                "Training goes on op by op, about 1.2x slower. Install a working C++ compiler and Python's "
                "headers, or set TINYSEEK_FUSED_KERNELS=0 not to try.")
