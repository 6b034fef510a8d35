"""Multi-device training: the training stages launch `torchrun` when `devices > 1`.

The parent writes a JSON spec, runs `torchrun -m tasks.train_worker SPEC` (DDP: gloo on
CPU, NCCL on CUDA) and follows the metrics file that rank 0 appends to, so the same
callback (MLflow, progress) sees the run as if it were in-process. A rank that stops on an
error the user can fix (a diverged loss, bad settings) writes its message to the error
file; the stage then fails with that message alone, instead of torchrun's report and a
traceback per rank.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tasks.children import ending_with_parent
from tasks.stage import Ref, StageError, held_locks

SPEC = "ddp-spec.json"
METRICS = "ddp-metrics.jsonl"
RESULT = "ddp-result.json"
ERROR = "ddp-error.txt"
STDERR = "ddp-stderr.log"
STOP_SECONDS = 30  # for torchrun to stop its ranks on SIGTERM before it is killed


def _follow(path: Path, offset: int, callback: Callable[[int, dict[str, float]], None] | None) -> int:
    if not path.exists():
        return offset
    with open(path) as handle:
        handle.seek(offset)
        for line in handle:
            if not line.endswith("\n"):
                break
            offset += len(line)
            if callback:
                record = json.loads(line)
                callback(record["step"], record["metrics"])
    return offset


def _stop(proc: subprocess.Popen) -> None:
    """End torchrun, which passes SIGTERM on to its ranks; kill it if it has not ended in time."""
    proc.terminate()
    try:
        proc.wait(STOP_SECONDS)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def launch(
    stage: str,
    refs: dict[str, Ref],
    config: Any,
    out: Path,
    checkpoints: Path,
    callback: Callable[[int, dict[str, float]], None] | None,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Run the stage's training under torchrun and return the manifest fields rank 0 wrote."""
    devices = getattr(config, stage).devices
    checkpoints.mkdir(parents=True, exist_ok=True)
    spec = {
        "stage": stage,
        "refs": {name: ref.model_dump(mode="json") for name, ref in refs.items()},
        "config": config.model_dump(mode="json"),
        "out": str(out),
        "checkpoints": str(checkpoints),
        "metrics": str(out / METRICS),
        "result": str(out / RESULT),
        "error": str(out / ERROR),
    }
    (out / SPEC).write_text(json.dumps(spec))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={devices}",
               "-m", "tasks.train_worker", str(out / SPEC)]
    log(f"launching {devices} training processes: {' '.join(command[2:])}")
    with open(out / STDERR, "w+") as stderr:
        # torchrun ends with this process: were it killed (SIGKILL), the ranks, in sessions of their own,
        # would go on training unseen while the stage's lock is free and `tinyseek prune` removes their files.
        # It also holds the stage's lock until it has stopped them (up to STOP_SECONDS).
        proc = subprocess.Popen(command, stderr=stderr, preexec_fn=ending_with_parent(), pass_fds=held_locks())
        try:
            offset = 0
            while proc.poll() is None:
                offset = _follow(out / METRICS, offset, callback)
                time.sleep(0.5)
            _follow(out / METRICS, offset, callback)
        except BaseException:
            _stop(proc)  # cancelled, or the callback failed: no rank goes on training unseen
            raise
        if proc.returncode != 0 and (out / ERROR).exists():
            raise StageError((out / ERROR).read_text())
        stderr.seek(0)
        shutil.copyfileobj(stderr, sys.stderr)  # warnings, and the traceback of a crash
    if proc.returncode != 0:
        raise StageError(f"distributed {stage} failed (torchrun exit code {proc.returncode}); see the log above")
    result = json.loads((out / RESULT).read_text())
    for name in (SPEC, METRICS, RESULT, STDERR):
        (out / name).unlink(missing_ok=True)
    return result
