"""Running the real `tinyseek` command in tests (real Prefect, real MLflow)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import mlflow

BIN = Path(sys.executable).parent
TINYSEEK = str(BIN / "tinyseek")


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_TRACKING"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["TINYSEEK_SYSTEM_METRICS_INTERVAL"] = "1"
    env.update(extra)
    return env


def tinyseek(*args: str, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([TINYSEEK, *args], capture_output=True, text=True, timeout=timeout, env=cli_env(**env))


def last_json(output: str) -> dict:
    return json.loads(output.strip().splitlines()[-1])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def mlflow_runs(workspace: Path, filter_string: str = "") -> list:
    """The runs of the pipeline's experiment in a workspace's MLflow store."""
    client = mlflow.MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tinyseek").experiment_id
    return client.search_runs([experiment], filter_string=filter_string)
