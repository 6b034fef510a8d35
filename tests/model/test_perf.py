"""The precision `auto` trains in: the faster one as measured here, not as the CPU's flags suggest."""

from types import SimpleNamespace

import pytest
import torch

from model import perf


@pytest.fixture(autouse=True)
def fresh_choice():
    perf.fast_precision.cache_clear()
    yield
    perf.fast_precision.cache_clear()  # later tests measure this machine again


def timed_matmuls(monkeypatch, flops: dict[torch.dtype, float], busy_s: float) -> None:
    """Matmuls running at `flops` by dtype, timed on a clock of perf's own, 10x slower until
    `busy_s` on it, as while another process has the machine."""
    clock = {"now": 0.0}

    def matmul(x, y):
        seconds = 2 * x.shape[0] * x.shape[1] * y.shape[1] / flops[x.dtype]
        clock["now"] += seconds * (10 if clock["now"] < busy_s else 1)

    monkeypatch.setattr(perf.torch, "matmul", matmul)
    monkeypatch.setattr(perf, "time", SimpleNamespace(perf_counter=lambda: clock["now"]))


@pytest.mark.parametrize("bf16, fp32, expected", [
    (2.3e12, 0.38e12, "bf16"),  # a Xeon with AMX
    (0.42e12, 0.18e12, "bf16"),  # an AMD EPYC with AVX-512 BF16
    (0.15e12, 0.29e12, "fp32"),  # a Xeon with AVX-512 BF16 but no AMX
])
@pytest.mark.parametrize("busy_s", [0, 0.15])
def test_a_cpu_trains_in_the_precision_its_matmuls_run_faster_in(monkeypatch, bf16, fp32, expected, busy_s):
    """Even when the machine is busy as the measurement starts: bf16 and fp32 take turns, so
    both are timed while it is busy and both once it is free again."""
    timed_matmuls(monkeypatch, {torch.bfloat16: bf16, torch.float32: fp32}, busy_s)
    choice = perf.fast_precision(torch.device("cpu"))
    assert choice.name == expected
    assert choice.reason == f"bf16 matmuls run at {bf16 / fp32:.2f}x fp32's on this CPU"


@pytest.mark.parametrize("supported, expected", [(True, "bf16"), (False, "fp32")])
def test_a_gpu_trains_in_bf16_where_it_has_bf16(monkeypatch, supported, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: supported)
    monkeypatch.setattr(perf, "bf16_speedup", lambda *_, **__: pytest.fail("a GPU's choice is not measured"))
    assert perf.fast_precision(torch.device("cuda")).name == expected


def test_this_machine_measures_one_of_the_two():
    choice = perf.fast_precision(torch.device("cpu"))
    assert choice.name in ("bf16", "fp32") and "fp32's on this CPU" in choice.reason
    assert perf.fast_precision(torch.device("cpu")) is choice  # measured once per process
