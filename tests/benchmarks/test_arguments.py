"""The benchmarks refuse settings that cannot give a meaningful number, in one line."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from benchmarks.arguments import count
from tasks.stage import REPO_ROOT


def test_count_takes_whole_numbers_from_its_minimum():
    assert count(0)("0") == 0 and count(2)("7") == 7
    for parse, text, message in [(count(1), "0", "must be at least 1, got 0"), (count(2), "1", "at least 2"),
                                 (count(1), "-3", "at least 1"), (count(1), "2.5", "'2.5' is not a whole number")]:
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            parse(text)


@pytest.mark.parametrize("arguments, says", [
    (["benchmarks.train_throughput", "--rounds", "0"], "argument --rounds: must be at least 1, got 0"),
    (["benchmarks.mfu", "--device", "cpu", "--seq-len", "100000"], "--seq-len 100000 is over the demo model's context"),
    (["benchmarks.data_pipeline", "--workspace", "tests"], "--workspace tests is not empty"),
    (["benchmarks.data_pipeline", "--workspace", "README.md"], "--workspace README.md is a file"),
])  # fmt: skip
def test_a_setting_that_cannot_work_is_one_error_line(arguments, says):
    result = subprocess.run([sys.executable, "-m", *arguments], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"error: {says}" in result.stderr.strip().splitlines()[-1], result.stderr


def test_the_gpu_script_needs_a_gpu_and_an_interpreter_that_runs(monkeypatch):
    """Without CUDA it stops rather than time gpu-small on the CPU; a PYTHON that cannot run is named."""
    script = str(REPO_ROOT / "benchmarks" / "gpu.sh")
    monkeypatch.setenv("PYTHON", sys.executable)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU, also where there is one
    result = subprocess.run(["bash", script, "--steps", "1"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "error: --device cuda: this torch sees no CUDA GPU" in result.stderr
    monkeypatch.setenv("PYTHON", "/nonexistent/python")
    result = subprocess.run(["bash", script], capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stderr.strip()) == \
        (2, "gpu.sh: PYTHON=/nonexistent/python cannot be run: name an interpreter with torch installed")
