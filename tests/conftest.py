"""Shared test setup: offline, quiet, and every test gets its own workspace."""

import os

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# TINYSEEK_TEST_DEVICE=cuda runs the model tests on a GPU: tensors made without a device land there
if os.environ.get("TINYSEEK_TEST_DEVICE"):
    torch.set_default_device(os.environ["TINYSEEK_TEST_DEVICE"])


@pytest.fixture
def ws(tmp_path, monkeypatch):
    """A fresh workspace directory, also exported as TINYSEEK_WORKSPACE."""
    root = tmp_path / "ws"
    root.mkdir()
    monkeypatch.setenv("TINYSEEK_WORKSPACE", str(root))
    return root
