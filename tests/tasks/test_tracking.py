"""MLflow tracking helpers against a real SQLite store: runs, params, metrics, tables,
datasets, system metrics and the trainer's metrics callback, read back through MlflowClient."""

from __future__ import annotations

import copy
import gc
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
from mlflow.telemetry.client import get_telemetry_client
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_GIT_COMMIT, MLFLOW_PARENT_RUN_ID
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH
from prefect.exceptions import TerminationSignal
from pydantic import BaseModel
from sqlalchemy.engine.default import DefaultDialect

from tasks.tracking import (
    DB_FILE,
    MetricsCallback,
    Tracker,
    artifact_location,
    flatten,
    git_commit,
    quiet_mlflow,
    run_tags,
    store_lock,
    system_metrics,
    tracking_uri,
)
from tests.processes import dead_pid


@pytest.fixture(autouse=True)
def local_store(monkeypatch):
    """Every test writes to its own workspace store, whatever the caller's environment says."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="module")
def tracker(tmp_path_factory) -> Tracker:
    """One store for the module's tests: creating a SQLite store runs all of MLflow's migrations."""
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        return Tracker(tmp_path_factory.mktemp("ws"))


def reader(tracker: Tracker) -> MlflowClient:
    """A client of its own, so reads go to the store, not through the tracker under test."""
    return MlflowClient(tracker.uri)


class Optim(BaseModel):
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)


class Config(BaseModel):
    steps: int = 10
    optim: Optim = Optim()


def test_tracking_uri_defaults_to_sqlite_in_the_workspace(ws, monkeypatch):
    assert tracking_uri(ws) == f"sqlite:///{ws.resolve() / DB_FILE}"
    assert artifact_location(tracking_uri(ws)) == (ws.resolve() / "mlartifacts").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking_uri(ws) == "http://127.0.0.1:5000"
    assert artifact_location("http://127.0.0.1:5000") is None


def test_store_and_artifacts_live_in_the_workspace(ws):
    tracker = Tracker(ws)
    run_id = tracker.start_run("stage")
    tracker.log_text(run_id, "hello", "notes/hello.txt")
    assert tracker.uri == tracking_uri(ws)
    assert (ws / DB_FILE).is_file()
    assert list((ws / "mlartifacts").rglob("hello.txt"))
    assert Tracker(ws).experiment_id == tracker.experiment_id  # found, not created again


def test_flatten_nested_configs():
    assert flatten({"a": {"b": 1, "c": {"d": "x"}}, "e": [1, 2]}) == {"a.b": 1, "a.c.d": "x", "e": [1, 2]}
    assert flatten(Config()) == {"steps": 10, "optim.lr": 3e-4, "optim.betas": [0.9, 0.95]}


def test_run_tags_carry_commit_preset_data_and_prefect_run():
    tags = run_tags("tiny", "fp123", flow_run_id="abc", flow_run_url="http://prefect/runs/abc")
    assert tags == {
        MLFLOW_GIT_COMMIT: git_commit(),
        "preset": "tiny",
        "data_fingerprint": "fp123",
        "prefect.flow_run_id": "abc",
        "prefect.flow_run_url": "http://prefect/runs/abc",
        "tinyseek.process": f"{socket.gethostname()}:{os.getpid()}",
    }
    assert git_commit() == "unknown" or len(git_commit()) == 40
    assert "prefect.flow_run_id" not in run_tags("tiny", "fp123")


def test_parent_and_child_runs_with_tags_params_and_metrics(tracker):
    tags = run_tags("tiny", "fp123", flow_run_id="flow-1")
    many = {f"p{i:03d}": i for i in range(150)}  # more than one log_batch of params
    parent = tracker.start_run("pipeline", tags=tags, params={"preset": "tiny", "long": "x" * 7000, **many})
    child = tracker.start_run("pretrain", parent_id=parent, tags=tags, params=Config())
    tracker.log_metrics(child, {"loss": 2.5, "lr": 1e-3}, step=1)
    tracker.log_metrics(child, {"loss": 2.0}, step=2)
    tracker.log_metrics(child, {f"m{i}": float(i) for i in range(1200)})  # more than one batch of metrics
    tracker.set_tags(child, {"stage_fingerprint": "abcd"})
    tracker.end_run(child)
    tracker.end_run(parent, "FAILED")

    client = reader(tracker)
    parent_run, child_run = client.get_run(parent), client.get_run(child)
    assert child_run.data.tags[MLFLOW_PARENT_RUN_ID] == parent
    assert MLFLOW_PARENT_RUN_ID not in parent_run.data.tags
    for run in (parent_run, child_run):
        assert run.data.tags["preset"] == "tiny"
        assert run.data.tags["data_fingerprint"] == "fp123"
        assert run.data.tags["prefect.flow_run_id"] == "flow-1"
        assert run.data.tags[MLFLOW_GIT_COMMIT] == git_commit()
    assert child_run.info.run_name == "pretrain"
    assert child_run.data.tags["stage_fingerprint"] == "abcd"
    assert parent_run.data.params["long"] == "x" * MAX_PARAM_VAL_LENGTH
    assert parent_run.data.params["p149"] == "149"
    assert child_run.data.params == {"steps": "10", "optim.lr": "0.0003", "optim.betas": "[0.9, 0.95]"}
    assert [(m.step, m.value) for m in client.get_metric_history(child, "loss")] == [(1, 2.5), (2, 2.0)]
    assert child_run.data.metrics["m1199"] == 1199.0
    assert (child_run.info.status, parent_run.info.status) == ("FINISHED", "FAILED")


def test_runs_a_killed_process_left_running_end_as_killed(tmp_path):
    """A process killed outright cannot end its runs: the next pipeline run ends those of
    processes of this machine that are gone, and leaves live or other machines' runs alone."""
    tracker = Tracker(tmp_path)
    gone = dead_pid()
    # killed, its status not yet collected by its parent (a zombie): gone too
    uncollected = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        uncollected.kill()
        os.waitid(os.P_PID, uncollected.pid, os.WEXITED | os.WNOWAIT)  # until it has exited, not collecting it
        host = socket.gethostname()
        runs = {name: tracker.start_run(name, tags={"tinyseek.process": process}) for name, process in
                [("killed", f"{host}:{gone}"), ("uncollected", f"{host}:{uncollected.pid}"),
                 ("live", f"{host}:{os.getpid()}"), ("elsewhere", f"not-{host}:{gone}"),
                 ("untagged", None)]}
        assert sorted(tracker.end_orphaned_runs()) == sorted([runs["killed"], runs["uncollected"]])
    finally:
        uncollected.wait()
    status = {name: tracker.client.get_run(run_id).info.status for name, run_id in runs.items()}
    assert status == {"killed": "KILLED", "uncollected": "KILLED", "live": "RUNNING", "elsewhere": "RUNNING",
                      "untagged": "RUNNING"}


def test_run_context_ends_finished_or_failed(tracker):
    with tracker.run("ok") as ok:
        tracker.log_metrics(ok, {"docs": 3})
    with pytest.raises(ValueError), tracker.run("broken") as broken:
        raise ValueError("bad input")
    client = reader(tracker)
    assert client.get_run(ok).info.status == "FINISHED"
    assert client.get_run(broken).info.status == "FAILED"


def test_a_run_whose_params_or_end_fail_is_not_left_running_nor_hides_the_error(tracker, monkeypatch):
    client = reader(tracker)
    runs = lambda: {r.info.run_name: r.info.status for r in client.search_runs([tracker.experiment_id])}  # noqa: E731
    def fail(*args):
        raise OSError("store gone")

    monkeypatch.setattr(tracker, "log_params", fail)
    with pytest.raises(OSError, match="store gone"):
        tracker.start_run("no-params", params={"a": 1})
    assert runs()["no-params"] == "FAILED"
    monkeypatch.setattr(tracker, "end_run", fail)
    with pytest.raises(ValueError, match="the real cause"), tracker.run("ending-fails"):
        raise ValueError("the real cause")


def test_metrics_callback_logs_what_it_holds_when_its_block_fails(tracker):
    run_id = tracker.start_run("diverged")
    with pytest.raises(ValueError), MetricsCallback(tracker, run_id, every=10) as callback:
        callback(1, {"loss": 2.0})
        raise ValueError("not finite")
    assert [m.value for m in reader(tracker).get_metric_history(run_id, "loss")] == [2.0]


def test_tables_dicts_texts_and_artifacts(tracker, tmp_path):
    run_id = tracker.start_run("clean")
    drops = pd.DataFrame({"reason": ["too_short", "duplicate"], "docs": [3, 5]})
    tracker.log_table(run_id, drops, "drops.json")
    tracker.log_dict(run_id, {"docs_in": 10}, "counts.json")
    tracker.log_text(run_id, "line one", "report.txt")
    (tmp_path / "one.txt").write_text("1")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "two.txt").write_text("2")
    tracker.log_artifact(run_id, tmp_path / "one.txt", "files")
    tracker.log_artifacts(run_id, tmp_path / "dir", "more")

    client = reader(tracker)
    table = pd.read_json(client.download_artifacts(run_id, "drops.json", str(tmp_path)), orient="split")
    assert table.to_dict("list") == drops.to_dict("list")
    logged = json.loads(client.get_run(run_id).data.tags["mlflow.loggedArtifacts"])
    assert {"path": "drops.json", "type": "table"} in logged
    names = {f.path for f in client.list_artifacts(run_id)}
    assert {"drops.json", "counts.json", "report.txt", "files", "more"} <= names
    assert json.loads(Path(client.download_artifacts(run_id, "counts.json", str(tmp_path))).read_text()) == {
        "docs_in": 10
    }
    assert [f.path for f in client.list_artifacts(run_id, "more")] == ["more/two.txt"]


def test_datasets_from_frames_parquet_and_other_paths(tracker, tmp_path):
    shards = tmp_path / "clean"
    shards.mkdir()
    for i in range(2):
        pq.write_table(pa.table({"text": [f"doc {i}-{j}" for j in range(3)]}), shards / f"shard-{i}.parquet")
    # a stage's quarantine beside its shards, here with nothing in it (columns of type null)
    pq.write_table(pa.table({"reason": pa.nulls(0)}), shards / "quarantine.parquet")
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    (tokens / "train.bin").write_bytes(b"\x00" * 8)

    run_id = tracker.start_run("pretrain")
    sample = pd.DataFrame({"text": ["a", "b"], "chars": [1, 1]})
    tracker.log_dataset(run_id, "sample", str(shards), sample, "training", digest="fp123")
    tracker.log_dataset(run_id, "clean", str(shards), shards, "training")
    tracker.log_dataset(run_id, "tokens", str(tokens), tokens, "eval", digest="fp456")

    inputs = {d.dataset.name: d for d in reader(tracker).get_run(run_id).inputs.dataset_inputs}
    assert set(inputs) == {"sample", "clean", "tokens"}
    assert inputs["sample"].dataset.digest == "fp123"
    assert {c["name"] for c in json.loads(inputs["sample"].dataset.schema)["mlflow_colspec"]} == {"text", "chars"}
    assert json.loads(inputs["clean"].dataset.profile)["num_rows"] == 6
    assert {c["name"] for c in json.loads(inputs["clean"].dataset.schema)["mlflow_colspec"]} == {"text"}
    assert json.loads(inputs["clean"].dataset.source)["uri"] == str(shards)
    assert inputs["tokens"].dataset.digest == "fp456"
    assert inputs["tokens"].dataset.schema is None
    contexts = {name: {t.key: t.value for t in d.tags}[MLFLOW_DATASET_CONTEXT] for name, d in inputs.items()}
    assert contexts == {"sample": "training", "clean": "training", "tokens": "eval"}


def test_metrics_callback_buffers_and_flushes(tracker):
    run_id = tracker.start_run("pretrain")
    client = reader(tracker)
    callback = MetricsCallback(tracker, run_id, every=3)
    for step in range(1, 6):
        callback(step, {"loss": 10.0 - step, "lr": 0.1})
        if step == 2:
            assert client.get_metric_history(run_id, "loss") == []  # still buffered
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2, 3]
    callback.close()
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [
        (1, 9.0), (2, 8.0), (3, 7.0), (4, 6.0), (5, 5.0)
    ]
    assert len(client.get_metric_history(run_id, "lr")) == 5
    with pytest.raises(ValueError):
        MetricsCallback(tracker, run_id, every=0)


def test_a_ctrl_c_during_a_store_write_takes_effect_after_it(tracker, monkeypatch):
    """Raised inside a SQLite write, KeyboardInterrupt left the database locked, and marking
    the interrupted run KILLED then failed; the write now finishes first."""
    run_id = tracker.start_run("pretrain")
    write = SqlAlchemyStore.log_batch

    def write_during_ctrl_c(self, *args, **kwargs):
        signal.raise_signal(signal.SIGINT)
        return write(self, *args, **kwargs)

    monkeypatch.setattr(SqlAlchemyStore, "log_batch", write_during_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        tracker.log_metrics(run_id, {"loss": 2.5}, step=7)
    monkeypatch.undo()
    tracker.end_run(run_id, "KILLED")
    run = reader(tracker).get_run(run_id)
    assert run.data.metrics == {"loss": 2.5} and run.info.status == "KILLED"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert copy.copy(tracker.client).get_run(run_id).info.status == "KILLED"  # the wrapper copies like a client


@pytest.mark.parametrize("ctrl_c_first", [False, True], ids=["cancelled", "ctrl-c-then-cancelled"])
def test_a_cancellation_inside_a_store_call_leaves_the_database_unlocked(tracker, ctrl_c_first, monkeypatch):
    """Prefect cancels a served flow run with SIGTERM, raised as TerminationSignal wherever the
    flow is. Raised inside a store call, the frames it passed through kept the call's SQLite
    connection in its transaction: marking the run KILLED, as the pipeline does while handling
    the interruption, waited 20 s and failed with "database is locked". Here it comes after
    each statement of a `log_batch` in turn, alone and after a Ctrl-C the call holds."""
    statements = []
    execute = DefaultDialect.do_execute

    def execute_then_cancel(self, cursor, statement, *args):
        result = execute(self, cursor, statement, *args)
        statements.append(statement.split()[0])
        if ctrl_c_first and len(statements) == 1:
            signal.raise_signal(signal.SIGINT)  # held until the call ends
        if len(statements) == cut:
            raise TerminationSignal(signal.SIGTERM)  # where Prefect's SIGTERM handler raises it
        return result

    # clearing the frames is what releases the store here: the full collection after it (about a
    # second in a process this size) is there for what they may hold in a reference cycle
    collections = []
    monkeypatch.setattr(gc, "collect", lambda: collections.append(1))
    cut_at, interruptions = [], 0
    for cut in range(1, 30):
        run_id = tracker.start_run("pretrain")
        statements.clear()
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(DefaultDialect, "do_execute", execute_then_cancel)
            try:
                tracker.log_metrics(run_id, {"loss": 2.5}, step=7)
            except (TerminationSignal, KeyboardInterrupt) as exc:
                interruptions += 1
                patch.undo()
                started = time.monotonic()
                tracker.end_run(run_id, "KILLED")
                assert time.monotonic() - started < 5, f"the store stayed locked after a cut at statement {cut}"
                assert isinstance(exc, KeyboardInterrupt) == ctrl_c_first
        if len(statements) < cut:  # the call ran to its end
            break
        cut_at.append(statements[-1])
    assert "SELECT" in cut_at and "INSERT" in cut_at  # reads and writes of the call were cut
    assert len(collections) == interruptions  # one per interruption
    assert reader(tracker).get_run(run_id).data.metrics == {"loss": 2.5}  # and an uncut call still writes


def test_system_metrics_for_an_explicit_run(tracker):
    run_id = tracker.start_run("pretrain")
    client = reader(tracker)
    assert mlflow.active_run() is None
    with system_metrics(tracker, run_id, interval=0.05):
        deadline = time.monotonic() + 60
        while not any(k.startswith("system/") for k in client.get_run(run_id).data.metrics):
            assert time.monotonic() < deadline, "no system metric was logged"
            time.sleep(0.05)
    metrics = client.get_run(run_id).data.metrics
    assert "system/cpu_utilization_percentage" in metrics
    assert "system/system_memory_usage_megabytes" in metrics
    assert not any(t.name == "SystemMetricsMonitor" for t in threading.enumerate())


def test_quiet_mlflow_sets_defaults_and_keeps_user_choices(monkeypatch):
    monkeypatch.delenv("MLFLOW_DISABLE_TELEMETRY", raising=False)
    monkeypatch.setenv("GIT_PYTHON_REFRESH", "warn")
    quiet_mlflow()
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"
    assert os.environ["GIT_PYTHON_REFRESH"] == "warn"
    assert get_telemetry_client() is None


@pytest.mark.parametrize("uri", ["http://127.0.0.1:5000", "sqlite:///{root}/mlflow.db"])
def test_registering_runs_of_one_workspace_take_turns_with_a_server_too(tmp_path, uri):
    """Registering reads the champion, then sets the aliases: two flow runs of one workspace
    (as `tinyseek up` serves them, against its MLflow server) must not interleave."""
    uri = uri.format(root=tmp_path)
    holding, order = threading.Event(), []

    def first() -> None:
        with store_lock(uri, tmp_path):
            holding.set()
            time.sleep(0.3)
            order.append("first done")

    thread = threading.Thread(target=first)
    thread.start()
    holding.wait()
    with store_lock(uri, tmp_path):
        order.append("second in")
    thread.join()
    assert order == ["first done", "second in"]
