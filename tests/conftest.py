"""Shared test setup: offline, quiet, and every test gets its own workspace."""

import os

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402


@pytest.fixture
def ws(tmp_path, monkeypatch):
    """A fresh workspace directory, also exported as TINYSEEK_WORKSPACE."""
    root = tmp_path / "ws"
    root.mkdir()
    monkeypatch.setenv("TINYSEEK_WORKSPACE", str(root))
    return root
