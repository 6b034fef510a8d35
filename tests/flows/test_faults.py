"""Faults in the middle of a pipeline run: the MLflow server goes away, the worker is killed
or interrupted.

Neither may lose or corrupt what was already finished, and the next run must pick up where
the last one stopped: finished stages are reused, an interrupted training resumes from its
last checkpoint.
"""

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import httpx

from tests.flows.helpers import BIN, TINYSEEK, cli_env, free_port, last_json, mlflow_runs, tinyseek

QUICK = ["--set", "pretrain.steps=4", "--set", "finetune.steps=2", "--set", "evaluate.max_examples_per_family=1"]
DATA_STAGES = ("collect", "clean", "tokenize")
LOG_RECORD = re.compile(r"\d\d:\d\d:\d\d\.\d+ \| ")  # Prefect's log lines, not the command's error
TEMPORARY_SERVER = re.compile(r"Starting temporary server on (http://\S+)")
# Fail fast once the server is gone instead of MLflow's default ~4 minutes of retries.
FAST_FAILING_CLIENT = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}


def wait_for(condition, what: str, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        assert proc.poll() is None, f"{what}: the process exited with {proc.returncode} first"
        time.sleep(0.2)
    raise TimeoutError(what)


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
    proc.wait(timeout=60)


def wait_exit(proc: subprocess.Popen, timeout: float, logs: Path) -> None:
    """Wait for `tinyseek` to exit; past `timeout`, fail with the end of its stderr and the
    stacks of its threads (`kill -USR1`), which show what it does instead of stopping."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGUSR1)
        time.sleep(2)
        stderr = logs.with_suffix(".err").read_text()
        raise AssertionError(f"still running {timeout} s later; its stderr ends:\n{stderr[-6000:]}") from None


def start_mlflow(store: Path, port: int) -> subprocess.Popen:
    server = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
         "--artifacts-destination", str(store / "artifacts"), "--serve-artifacts"],
        env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def answers() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(answers, "the MLflow server answers", server, timeout=120)
    return server


def run_in_background(*args: str, logs: Path, **env: str) -> subprocess.Popen:
    """`tinyseek ARGS` in its own process group, its output in `logs`.out and `logs`.err."""
    with open(logs.with_suffix(".out"), "w") as out, open(logs.with_suffix(".err"), "w") as err:
        return subprocess.Popen([TINYSEEK, *args], env=cli_env(**env), stdout=out, stderr=err, start_new_session=True)


def finished_outputs(ws: Path, stage: str) -> dict[str, dict]:
    """Every finished output of `stage` (a directory with a manifest), its manifest parsed."""
    return {out.name: json.loads((out / "manifest.json").read_text())
            for out in (ws / stage).glob("*") if (out / "manifest.json").is_file()}


def test_mlflow_outage_fails_the_run_cleanly_and_the_rerun_reuses_finished_stages(ws, tmp_path):
    store, port = tmp_path / "mlflow", free_port()
    env = {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}", **FAST_FAILING_CLIENT}
    server = start_mlflow(store, port)
    run = run_in_background("run", "--preset", "tiny", "--workspace", str(ws), *QUICK, logs=tmp_path / "outage", **env)
    try:
        wait_for(lambda: (ws / "pretrain").is_dir(), "the pretrain stage starts", run)
        kill_group(server)
        wait_exit(run, 300, tmp_path / "outage")
    finally:
        kill_group(server)
        kill_group(run)
    stderr = (tmp_path / "outage.err").read_text()

    assert run.returncode != 0
    final_error = [line for line in stderr.splitlines() if line.strip() and not LOG_RECORD.match(line)][-1]
    assert final_error.startswith("error: MLflow tracking at"), stderr[-3000:]
    assert f"127.0.0.1:{port}" in final_error, stderr[-3000:]
    before = {}
    for stage in DATA_STAGES:
        outputs = finished_outputs(ws, stage)
        assert len(outputs) == 1, (stage, outputs)
        [(fp, manifest)] = outputs.items()
        assert manifest["fingerprint"] == fp and manifest["counts"]
        before[stage] = fp
    for stage_dir in ws.iterdir():
        assert not list(stage_dir.glob(".*.tmp-*")), f"half-written output left in {stage_dir}"

    server = start_mlflow(store, port)
    try:
        rerun = tinyseek("run", "--preset", "tiny", "--workspace", str(ws), *QUICK, "--json", **env)
    finally:
        kill_group(server, signal.SIGTERM)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = last_json(rerun.stdout)
    for stage in DATA_STAGES:
        assert summary["stages"][stage]["cached"], stage
        assert Path(summary["stages"][stage]["path"]).name == before[stage]
    assert not summary["stages"]["finetune"]["cached"]
    assert summary["version"] is not None


def temporary_server(logs: Path) -> str:
    """The address of the temporary Prefect server a run started, from its log."""
    [address] = TEMPORARY_SERVER.findall(logs.with_suffix(".err").read_text())
    return address


def answers(address: str) -> bool:
    try:
        return httpx.get(f"{address}/api/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_killed_worker_resumes_pretraining_from_the_last_checkpoint(ws, tmp_path):
    settings = ["--preset", "tiny", "--workspace", str(ws),
                "--set", "pretrain.steps=20", "--set", "pretrain.checkpoint_every=5"]
    run = run_in_background("run", *settings, logs=tmp_path / "killed")
    try:
        wait_for(lambda: any((ws / "pretrain").glob(".*.work/step-*")), "a pretraining checkpoint", run)
    finally:
        kill_group(run)
    assert run.returncode == -signal.SIGKILL
    server = temporary_server(tmp_path / "killed")
    deadline = time.time() + 30
    while answers(server) and time.time() < deadline:  # the server goes with the process that started it
        time.sleep(0.2)
    assert not answers(server), f"the temporary Prefect server at {server} outlived its run"
    assert not finished_outputs(ws, "pretrain"), "the killed pretraining looks finished"
    [work] = (ws / "pretrain").glob(".*.work")
    last_checkpoint = max(int(step.name.removeprefix("step-")) for step in work.glob("step-*"))

    rerun = tinyseek("pretrain", *settings, "--json")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    # said in the flow run's log (the Prefect UI keeps it), which the CLI prints
    resumed = re.findall(r"Task run 'pretrain-\w+' - resuming from step (\d+) of 20", rerun.stdout + rerun.stderr)
    assert resumed, rerun.stdout[-3000:]
    assert int(resumed[0]) == last_checkpoint < 20, resumed
    summary = last_json(rerun.stdout)
    pretrain = summary["stages"]["pretrain"]
    assert not pretrain["cached"] and pretrain["counts"]["steps"] == 20
    history = [json.loads(line)["step"] for line in (Path(pretrain["path"]) / "history.jsonl").read_text().splitlines()]
    assert history[0] < last_checkpoint and history[-1] == 20, history  # the curve before the kill is kept
    assert all(summary["stages"][stage]["cached"] for stage in DATA_STAGES)


def test_ctrl_c_stops_the_run_at_once_and_marks_it_interrupted(ws, tmp_path):
    """A terminal's Ctrl-C reaches the whole process group: the run, and not the temporary
    Prefect server, must stop, so that the interruption is recorded without retries.
    Before it, `kill -USR1` shows where the run is and leaves it running."""
    settings = ["--preset", "tiny", "--workspace", str(ws), "--set", "pretrain.steps=100000"]
    run = run_in_background("run", *settings, logs=tmp_path / "interrupted")
    try:
        wait_for(lambda: any((ws / "pretrain").glob(".*.work/step-*")), "a pretraining checkpoint", run)
        os.kill(run.pid, signal.SIGUSR1)
        wait_for(lambda: "most recent call last" in (tmp_path / "interrupted.err").read_text(),
                 "the stacks of the run's threads", run, timeout=30)
        os.killpg(run.pid, signal.SIGINT)
        wait_exit(run, 120, tmp_path / "interrupted")
    finally:
        kill_group(run)
    stderr = (tmp_path / "interrupted.err").read_text()

    assert run.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "Connection refused" not in stderr, stderr[-3000:]
    assert "`tinyseek up` starts Prefect's and MLflow's servers" in stderr and "prefect.io" not in stderr
    assert re.search(r"Flow run '[^']+' - Finished in state Crashed\('Execution was aborted by an interrupt", stderr)
    final = [line for line in stderr.splitlines() if line.strip() and not LOG_RECORD.match(line)][-1]
    assert final.startswith("interrupted; finished stages and training checkpoints are kept"), stderr[-3000:]
    assert not answers(temporary_server(tmp_path / "interrupted"))
    runs = {r.info.run_name: r.info.status for r in mlflow_runs(ws)}
    assert runs == {"build-llm": "KILLED", "pretrain": "KILLED", **dict.fromkeys(DATA_STAGES, "FINISHED")}, runs


def test_run_logs_keep_tracebacks_for_bugs_only():
    """An interrupted or cancelled run, like an error whose message says what to fix, is
    logged without the engine's traceback; anything else keeps it."""
    import logging
    import sys

    from prefect.exceptions import ParameterTypeError, TerminationSignal

    from flows.pipeline import NoParameterDump, TracebackOnlyForBugs
    from tasks.stage import StageError

    def logged(exc: BaseException) -> logging.LogRecord:
        try:
            raise exc
        except BaseException:
            record = logging.LogRecord("prefect.flow_runs", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
        TracebackOnlyForBugs().filter(record)
        return record

    assert logged(ValueError("a bug")).exc_info is not None
    invalid = ParameterTypeError(" - config.preset: unknown preset 'tnyi'; did you mean tiny?")
    for expected in (KeyboardInterrupt(), TerminationSignal(signal.SIGTERM), StageError("set pretrain.steps"), invalid):
        assert logged(expected).exc_info is None, expected
    # the line that replaces the traceback says why the run failed
    assert logged(invalid).getMessage() == "failed:  - config.preset: unknown preset 'tnyi'; did you mean tiny?"
    dump = logging.LogRecord("prefect.flows", logging.ERROR, __file__, 1,
                             "Parameter validation failed for flow 'data': [{'type': 'value_error'}]", (), None)
    assert not NoParameterDump().filter(dump)
