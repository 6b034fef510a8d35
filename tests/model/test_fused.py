"""Fused kernels (`model.fused`): a CPU training step runs them compiled, with the losses and
gradients of the same step op by op; they stay eager where they cannot or need not compile."""

import os
import subprocess
import sys

import torch
from torch._dynamo.utils import counters

from model import fused
from model.transformer import Transformer
from tasks.stage import REPO_ROOT
from tests.model.helpers import config, losses_and_grads


def bf16_step(model: Transformer, inputs: torch.Tensor, targets: torch.Tensor):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        *losses, grads = losses_and_grads(model, inputs, targets)
    return losses, grads


def test_a_bf16_training_step_runs_fused_kernels_with_the_eager_steps_values(monkeypatch):
    torch.manual_seed(0)
    model = Transformer(config("q-lora", seq_aux_loss_alpha=0.01))
    inputs, targets = torch.randint(0, 97, (4, 24)), torch.randint(0, 97, (4, 24))
    monkeypatch.setenv("TINYSEEK_FUSED_KERNELS", "0")
    eager_losses, eager_grads = bf16_step(model, inputs, targets)
    monkeypatch.setenv("TINYSEEK_FUSED_KERNELS", "1")
    torch._dynamo.reset()  # kernels an earlier test of this process compiled would not count
    counters.clear()
    losses, grads = bf16_step(model, inputs, targets)
    # norm, SwiGLU, expert sum and loss, forward and backward: each compiled, none fell back to eager
    assert counters["stats"]["unique_graphs"] >= 8 and not counters["graph_break"]
    torch.testing.assert_close(losses, eager_losses, atol=1e-3, rtol=1e-3)
    for name, grad in grads.items():  # bf16 activations: fused sums round in another order
        torch.testing.assert_close(grad, eager_grads[name], atol=2e-3, rtol=5e-2, msg=name)


def test_fused_functions_run_eagerly_when_switched_off_without_a_compiler_with_grad_or_inside_a_compiled_model(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: calls.append(fn) or fn)
    double, x = fused.fused(lambda x: x * 2), torch.ones(3)
    monkeypatch.setattr(fused, "_has_compiler", lambda: True)
    monkeypatch.setenv("TINYSEEK_FUSED_KERNELS", "1")
    assert torch.equal(double(x), x * 2) and not calls  # grad mode on: a double backward differentiates it
    with torch.no_grad():  # as inside an autograd function
        monkeypatch.setenv("TINYSEEK_FUSED_KERNELS", "0")
        assert torch.equal(double(x), x * 2) and not calls
        monkeypatch.setenv("TINYSEEK_FUSED_KERNELS", "1")
        monkeypatch.setattr(fused, "_has_compiler", lambda: False)
        assert torch.equal(double(x), x * 2) and not calls
        monkeypatch.setattr(fused, "_has_compiler", lambda: True)
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        assert torch.equal(double(x), x * 2) and not calls
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
        assert torch.equal(double(x), x * 2) and len(calls) == 1  # and with none of these, compiled


def test_a_fused_function_compiles_once_on_first_use(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: calls.append(fn) or fn)
    monkeypatch.setattr(fused, "_has_compiler", lambda: True)
    monkeypatch.setenv("TINYSEEK_FUSED_KERNELS", "1")
    double, x = fused.fused(lambda x: x * 2), torch.ones(3)
    assert not calls
    with torch.no_grad():  # as inside an autograd function
        assert torch.equal(double(x), x * 2) and torch.equal(double(x), x * 2)
    assert len(calls) == 1


def test_compiling_afresh_builds_the_next_kernels_for_the_sizes_they_see(monkeypatch):
    """A kernel compiled for one stage's sizes serves the next stage's too, but rounds as tuned for
    the first (the demo's fine-tuning ended on other weights after pretraining in the same process
    than alone): after `compile_afresh` the next call compiles again."""
    monkeypatch.setenv("TINYSEEK_FUSED_KERNELS", "1")
    half = fused.fused(lambda x: (x * 0.5).sum(-1))
    with torch.no_grad():
        half(torch.ones(64, 32))
        graphs = counters["stats"]["unique_graphs"]
        half(torch.ones(50, 32))  # another size: the kernel compiled for the first one serves it
        assert counters["stats"]["unique_graphs"] == graphs
        fused.compile_afresh()
        half(torch.ones(50, 32))
        assert counters["stats"]["unique_graphs"] == graphs + 1


def test_decoding_compiles_no_fused_kernel(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: calls.append(fn) or fn)
    monkeypatch.setenv("TINYSEEK_FUSED_KERNELS", "1")
    model = Transformer(config("grouped")).eval()
    with torch.no_grad():
        model(torch.randint(0, 97, (2, 6)))  # a prefill: norms, experts' sum, SwiGLU without autograd
    assert not calls


# g++ that fails to build a kernel as one without Python's headers does (its other calls pass)
FAILING_COMPILER = """#!/bin/sh
case "$*" in *-shared*) echo "fatal error: Python.h: No such file or directory" >&2; exit 1;; esac
exec g++ "$@"
"""

STEP = """
import torch
from model import fused
from model.transformer import Transformer
from tests.model.helpers import config, losses_and_grads
torch.manual_seed(0)
model = Transformer(config("q-lora"))
inputs, targets = torch.randint(0, 97, (2, 12)), torch.randint(0, 97, (2, 12))
losses = [float(loss) for loss in losses_and_grads(model, inputs, targets)[:-1]]
print("enabled", fused.enabled(), "losses", losses)
"""


def test_a_compiler_that_cannot_build_the_kernels_turns_them_off_with_one_warning(tmp_path):
    """A C++ compiler that fails (here: as one without Python's headers does) costs the fused
    kernels, not the training run: the step goes on op by op, with the eager step's losses."""
    compiler = tmp_path / "g++"
    compiler.write_text(FAILING_COMPILER)
    compiler.chmod(0o755)

    def step(**env: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", STEP], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=300, env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache"), **env})

    failing = step(CXX=str(compiler))
    eager = step(TINYSEEK_FUSED_KERNELS="0")
    assert failing.returncode == 0, failing.stderr[-3000:]
    assert failing.stderr.count("fused CPU kernels are off in this process") == 1, failing.stderr[-3000:]
    assert "Python.h: No such file or directory" in failing.stderr
    assert failing.stdout == eager.stdout  # the same losses, computed op by op
    assert failing.stdout.startswith("enabled False losses [")
