"""MLflow tracking for the pipeline: one parent run per pipeline run, one child run per stage.

Prefect runs tasks in worker threads and MLflow's "active run" is thread-local, so
everything here goes through an `MlflowClient` with explicit run ids; nothing relies
on `mlflow.active_run()` or on the process-wide tracking URI. With no server the store
is `sqlite:///<workspace>/mlflow.db` with artifacts beside it in `<workspace>/mlartifacts`;
`$MLFLOW_TRACKING_URI` points every run at a server instead.
"""

from __future__ import annotations


import functools
import gc
import json
import logging
import os
import socket
import sqlite3
import subprocess
import time
import traceback
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import closing, contextmanager, suppress
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import pyarrow.dataset as pads
from mlflow.data.dataset_source import DatasetSource
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.data.pandas_dataset import from_pandas
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
from mlflow.telemetry.client import get_telemetry_client, set_telemetry_client
from mlflow.telemetry.utils import is_telemetry_disabled
from mlflow.utils.file_utils import local_file_uri_to_path
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_GIT_COMMIT, MLFLOW_PARENT_RUN_ID
from mlflow.utils.validation import (
    MAX_ENTITY_KEY_LENGTH,
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VAL_LENGTH,
)
from pydantic import BaseModel
from sqlalchemy.engine import make_url

from tasks.interrupts import interrupts_held
from tasks.stage import REPO_ROOT, StageError, file_lock

DB_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
SERVER_LOCK = ".tracking.lock"  # in the workspace, when the store is a server (`store_lock`)
EXPERIMENT = "tinyseek"
DATASET_SAMPLE_ROWS = 1000

# Environment defaults MLflow 3.17 reads: usage telemetry (checked at `import mlflow` and
# again by `set_telemetry_client`; disabling it also skips its Databricks SDK warm-up),
# GitPython's probe for a git executable, and the per-artifact upload progress bars.
QUIET_ENV = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "GIT_PYTHON_REFRESH": "quiet",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}

TAG_PRESET = "preset"
TAG_DATA_FINGERPRINT = "data_fingerprint"
TAG_FLOW_RUN_ID = "prefect.flow_run_id"
TAG_FLOW_RUN_URL = "prefect.flow_run_url"
TAG_PROCESS = "tinyseek.process"  # host:pid of the process that runs it, to tell a run left RUNNING by a kill


def quiet_mlflow() -> None:
    """Keep MLflow offline and quiet unless the user's environment or logging says otherwise."""
    for name, value in QUIET_ENV.items():
        os.environ.setdefault(name, value)
    # start/stop lines for every stage; the store's creation; "validating input example" per logged model
    for name in ("mlflow.system_metrics", "mlflow.store.db.utils", "mlflow.pyfunc"):
        log = logging.getLogger(name)
        if log.level == logging.NOTSET:
            log.setLevel(logging.WARNING)
    if get_telemetry_client() is not None and is_telemetry_disabled():
        set_telemetry_client()  # drops the client created at import, before any record is sent


def tracking_uri(root: Path) -> str:
    """`$MLFLOW_TRACKING_URI` if set, else the SQLite store in the workspace `root`."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(root).resolve() / DB_FILE}"


@contextmanager
def readable_store(uri: str) -> Iterator[None]:
    """Within the block, a SQLite store that is no database (damaged, or another file under
    its name) is a StageError naming the file, not SQLAlchemy's traceback."""
    import sqlalchemy.exc

    try:
        yield
    except (sqlalchemy.exc.DatabaseError, sqlite3.DatabaseError) as exc:
        cause = getattr(exc, "orig", exc)  # SQLAlchemy's wraps sqlite3's
        if type(cause) is not sqlite3.DatabaseError:  # a locked or missing table is another matter
            raise
        fix = ("fix or unset MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI")
               else "restore it from a copy, or use another --workspace")
        raise StageError(f"the MLflow store {make_url(uri).database} cannot be read ({cause}): {fix}") from None


def artifact_location(uri: str) -> str | None:
    """Where a new experiment keeps artifacts: beside a SQLite database; a server decides otherwise."""
    if not uri.startswith("sqlite:"):
        return None
    database = make_url(uri).database
    return (Path(database).resolve().parent / ARTIFACTS_DIR).as_uri()


# the columns of MLflow's SQL store that hold artifact locations
ARTIFACT_COLUMNS = {"experiments": ["artifact_location"], "runs": ["artifact_uri"],
                    "logged_models": ["artifact_location"], "model_versions": ["source", "storage_location"]}


def moved_root(recorded: str, uri: str) -> str | None:
    """Where the artifacts of a SQLite store are now, when the experiment recorded them under
    `recorded` in a workspace since moved or copied (SQLite keeps absolute locations); None
    when nothing moved, or the location is not the one beside the database this tool chose."""
    current = artifact_location(uri)
    if current and recorded != current and recorded.endswith(f"/{ARTIFACTS_DIR}"):
        return current
    return None


def moved(location: str, recorded: str, current: str | None) -> str:
    """`location`, recorded under `recorded`, as it is under `current` (unchanged without one)."""
    if current and (location == recorded or location.startswith(recorded + "/")):
        return current + location[len(recorded):]
    return location


def relocate_store(uri: str) -> int:
    """In a SQLite store of a workspace moved or copied since it was made, rewrite the artifact
    locations to where they are now: otherwise its models are looked for where it was, and its
    new runs write their artifacts into the old place. The stage outputs that runs name (their
    `output` tags and dataset sources) are rewritten too, so the UI shows where they are.
    Returns the rows changed."""
    database = Path(make_url(uri).database)
    if not database.is_file():
        return 0
    with closing(sqlite3.connect(database)) as db, db:
        row = db.execute("SELECT artifact_location FROM experiments WHERE name = ?", (EXPERIMENT,)).fetchone()
        current = moved_root(row[0], uri) if row else None
        if not current:
            return 0
        changed = sum(_replace_prefix(db, table, column, row[0], current)
                      for table, columns in ARTIFACT_COLUMNS.items() for column in columns)
        return changed + _rewrite_paths(db, *workspace_move(row[0], current))


def workspace_move(recorded: str, current: str) -> tuple[Path, Path]:
    """The workspace folders a store's artifacts were recorded in and are in now (from
    `recorded` and `current`, as `moved_root` gives them)."""
    return Path(local_file_uri_to_path(recorded)).parent, Path(local_file_uri_to_path(current)).parent


def _replace_prefix(db: sqlite3.Connection, table: str, column: str, old: str, new: str) -> int:
    """Values of `column` that are `old` or lie under `old`/, with `new` in its place."""
    if column not in {row[1] for row in db.execute(f"PRAGMA table_info({table})")}:
        return 0
    return db.execute(
        f"UPDATE {table} SET {column} = ? || substr({column}, length(?) + 1) "
        f"WHERE {column} = ? OR substr({column}, 1, length(?) + 1) = ? || '/'",
        (new, old, old, old, old),
    ).rowcount


def _rewrite_paths(db: sqlite3.Connection, old: Path, new: Path) -> int:
    """Paths under the workspace `old` in run tags and dataset sources, moved to `new`."""
    changed = _replace_prefix(db, "tags", "value", str(old), str(new))
    for dataset, text in db.execute("SELECT dataset_uuid, dataset_source FROM datasets").fetchall():
        try:
            source = json.loads(text)
        except ValueError:  # a source some other client wrote: not ours to rewrite
            continue
        location = source.get("uri") if isinstance(source, dict) else None
        if isinstance(location, str) and (now := moved(location, str(old), str(new))) != location:
            source["uri"] = now
            db.execute("UPDATE datasets SET dataset_source = ? WHERE dataset_uuid = ?", (json.dumps(source), dataset))
            changed += 1
    return changed


@functools.cache
def git_commit() -> str:
    """The checked-out commit of this repository, or "unknown" outside a git checkout."""
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return done.stdout.strip() or "unknown"


def run_tags(
    preset: str,
    data_fingerprint: str,
    flow_run_id: str | None = None,
    flow_run_url: str | None = None,
) -> dict[str, str]:
    """The tags every run carries: code version, preset, data, and the Prefect run that made it."""
    tags = {
        MLFLOW_GIT_COMMIT: git_commit(),
        TAG_PRESET: preset,
        TAG_DATA_FINGERPRINT: data_fingerprint,
        TAG_FLOW_RUN_ID: flow_run_id,
        TAG_FLOW_RUN_URL: flow_run_url,
        TAG_PROCESS: f"{socket.gethostname()}:{os.getpid()}",
    }
    return {key: value for key, value in tags.items() if value}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return not _exited(pid)


def _exited(pid: int) -> bool:
    """Whether the process has exited and only waits for its parent to collect its status (a
    zombie: Linux's /proc says Z), as a flow run's process does for a moment after its kill."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()  # bytes: the name may be cut inside a character
    except OSError:
        return False
    return stat.rpartition(b")")[2].split()[:1] == [b"Z"]


def flatten(params: Mapping[str, Any] | BaseModel, prefix: str = "") -> dict[str, Any]:
    """Nested mappings (or a pydantic model) as one level of dotted keys."""
    if isinstance(params, BaseModel):
        params = params.model_dump(mode="json")
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping | BaseModel):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _now_ms() -> int:
    return int(time.time() * 1000)


def _dataset_source(source: str) -> DatasetSource:
    """MLflow's source for a path or URI; local paths match two registered (identical) sources."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways")
        return resolve_dataset_source(source)


def _parquet_sample(path: Path) -> pd.DataFrame | None:
    """The first rows of a Parquet file, or of a stage directory's data shards
    (`shard-*.parquet`: its quarantine file is not the dataset); None for anything else."""
    if path.is_dir():
        files = sorted(path.rglob("shard-*.parquet"))
    else:
        files = [path] if path.suffix == ".parquet" else []
    if not files:
        return None
    return pads.dataset([str(f) for f in files], format="parquet").head(DATASET_SAMPLE_ROWS).to_pandas()


@contextmanager
def store_lock(uri: str, root: Path) -> Iterator[None]:
    """Hold the tracking store against the other processes of the workspace `root`: a SQLite
    store beside its database; a server in the workspace (`SERVER_LOCK`), since each of its
    calls is atomic but a read, decide, write sequence of them is not (the runs `tinyseek up`
    serves share one workspace and one server)."""
    sqlite = uri.startswith("sqlite:///")
    with file_lock(Path(uri.removeprefix("sqlite:///")).with_suffix(".lock") if sqlite else root / SERVER_LOCK):
        yield


class _Uninterrupted:
    """An `MlflowClient` for a SQLite store whose calls finish before a Ctrl-C takes effect,
    and that an interruption inside a call leaves unlocked.

    Python raises KeyboardInterrupt wherever the main thread is, and Prefect raises
    TerminationSignal (how a served flow run is cancelled, SIGTERM) the same way. Raised
    inside a store call, the frames it passed through kept that call's SQLite connection in
    its transaction, holding the database's write lock: every later write, such as marking
    the interrupted runs KILLED, waited out SQLite's busy timeout (20 s) and failed with
    "database is locked". A Ctrl-C is held until the call ends (a store call takes
    milliseconds, an artifact copy as long as the copy). Prefect's SIGTERM handler is left
    in place, since Prefect acknowledges a cancellation only while it is installed: an
    interruption raised inside a call drops those frames instead, which closes the connection.
    """

    def __init__(self, client: mlflow.MlflowClient) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # the client's own names only (copy and pickle ask for __setstate__ first)
            raise AttributeError(name)
        attribute = getattr(self._client, name)
        if not callable(attribute):
            return attribute

        @functools.wraps(attribute)
        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                with interrupts_held():
                    return attribute(*args, **kwargs)
            except BaseException as exc:
                if not isinstance(exc, Exception):  # an interruption (see the class docstring)
                    _release_frames(exc)
                raise

        return call


def _release_frames(exc: BaseException) -> None:
    """Clear the locals of the finished frames that `exc` and the exceptions it was raised
    during passed through (a Ctrl-C held while a SIGTERM cut the call, say), keeping the
    tracebacks' lines, so that what they held (a store connection) is closed now."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        traceback.clear_frames(exc.__traceback__)
        exc = exc.__cause__ or exc.__context__
    gc.collect()  # and what they held in a reference cycle


class Tracker:
    """The pipeline's view of one MLflow experiment, every call naming its run explicitly."""

    def __init__(self, root: Path, experiment: str = EXPERIMENT) -> None:
        quiet_mlflow()
        self.root = Path(root)
        self.uri = tracking_uri(self.root)
        # the first use of a SQLite store creates and migrates it: one process at a time
        with store_lock(self.uri, self.root), readable_store(self.uri):
            client = mlflow.MlflowClient(tracking_uri=self.uri)
            self.client = _Uninterrupted(client) if self.uri.startswith("sqlite:") else client
            self.experiment_id = self._experiment(experiment)
            if self.uri.startswith("sqlite:"):
                relocate_store(self.uri)

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the store for the block: a read, decide, write sequence (registering reads the
        champion, then sets the aliases) that another process on the workspace must not interleave."""
        with store_lock(self.uri, self.root):
            yield

    def _experiment(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name, artifact_location=artifact_location(self.uri))
        except MlflowException as exc:  # another process created it first
            if exc.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                raise
            return self.client.get_experiment_by_name(name).experiment_id

    def start_run(
        self,
        name: str,
        parent_id: str | None = None,
        tags: Mapping[str, Any] | None = None,
        params: Mapping[str, Any] | BaseModel | None = None,
    ) -> str:
        """Create a run (a child of `parent_id` if given) and return its id."""
        all_tags = {**(tags or {}), **({MLFLOW_PARENT_RUN_ID: parent_id} if parent_id else {})}
        run = self.client.create_run(self.experiment_id, run_name=name, tags=self._tag_values(all_tags))
        run_id = run.info.run_id
        if params:
            try:
                self.log_params(run_id, params)
            except BaseException:  # not left RUNNING by a run that never started its work
                self._end_failed(run_id, "FAILED")
                raise
        return run_id

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        """Mark the run FINISHED, FAILED or KILLED."""
        self.client.set_terminated(run_id, status)

    def _end_failed(self, run_id: str, status: str) -> None:
        """End a run whose work raised; a store error here is not raised over that error (the
        next run's sweep of orphaned runs ends it then)."""
        with suppress(Exception):
            self.end_run(run_id, status)

    def end_orphaned_runs(self) -> list[str]:
        """End as KILLED the runs left RUNNING by a process of this machine that is gone: one
        killed outright (SIGKILL, the kernel's out-of-memory killer) cannot end its runs itself.
        Runs of other machines, or without the tag, are left alone. Returns the runs ended."""
        host = socket.gethostname()
        running = self.client.search_runs(
            [self.experiment_id], max_results=1000,
            filter_string=f"attributes.status = 'RUNNING' and tags.`{TAG_PROCESS}` LIKE '{host}:%'",
        )
        processes = {run.info.run_id: run.data.tags[TAG_PROCESS].rpartition(":") for run in running}
        orphans = [run_id for run_id, (on, _, pid) in processes.items() if on == host and not _alive(int(pid))]
        for run_id in orphans:
            self.end_run(run_id, "KILLED")
        return orphans

    @contextmanager
    def run(
        self,
        name: str,
        parent_id: str | None = None,
        tags: Mapping[str, Any] | None = None,
        params: Mapping[str, Any] | BaseModel | None = None,
        interruptions: tuple[type[BaseException], ...] = (KeyboardInterrupt,),
    ) -> Iterator[str]:
        """A run that ends FINISHED; when the block raises, KILLED if it was interrupted (one
        of `interruptions`: Ctrl-C, and the caller's own, such as a cancellation), FAILED otherwise."""
        run_id = self.start_run(name, parent_id, tags, params)
        try:
            yield run_id
        except BaseException as exc:
            self._end_failed(run_id, "KILLED" if isinstance(exc, interruptions) else "FAILED")
            raise
        self.end_run(run_id)

    @staticmethod
    def _tag_values(tags: Mapping[str, Any]) -> dict[str, str]:
        return {key: str(value)[:MAX_TAG_VAL_LENGTH] for key, value in tags.items() if value is not None}

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        run_tags_ = [RunTag(key, value) for key, value in self._tag_values(tags).items()]
        for chunk in _chunks(run_tags_, MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(run_id, tags=chunk)

    def log_params(self, run_id: str, params: Mapping[str, Any] | BaseModel) -> None:
        """Log a (nested) config as flat dotted params, values cut to MLflow's length limit."""
        flat = [
            Param(key[:MAX_ENTITY_KEY_LENGTH], str(value)[:MAX_PARAM_VAL_LENGTH])
            for key, value in flatten(params).items()
        ]
        for chunk in _chunks(flat, MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(run_id, params=chunk)

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int = 0,
                    model_id: str | None = None) -> None:
        """Log `metrics` at `step`; with `model_id`, also as that logged model's (the UI's model page shows them)."""
        now = _now_ms()
        self.log_metric_batch(run_id, [Metric(k, float(v), now, step, model_id=model_id) for k, v in metrics.items()])

    def log_metric_batch(self, run_id: str, metrics: Iterable[Metric]) -> None:
        for chunk in _chunks(list(metrics), MAX_METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=chunk)

    def log_table(self, run_id: str, df: pd.DataFrame, artifact_file: str) -> None:
        """A table for people (`.json` or `.parquet`), shown in the run's artifacts and evaluation views."""
        self.client.log_table(run_id, data=df, artifact_file=artifact_file)

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)

    def log_artifacts(self, run_id: str, directory: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(run_id, str(directory), artifact_path)

    def log_dict(self, run_id: str, dictionary: dict[str, Any], artifact_file: str) -> None:
        self.client.log_dict(run_id, dictionary, artifact_file)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.client.log_text(run_id, text, artifact_file)

    def log_dataset(
        self,
        run_id: str,
        name: str,
        source: str,
        data: pd.DataFrame | str | Path,
        context: str,
        digest: str | None = None,
    ) -> None:
        """Record a dataset the run used (`context`: "training", "eval", ...).

        `source` says where the data lives (a path or URL). `data` is a DataFrame sample
        or a path: Parquet data is sampled for its schema and profile, anything else
        (token memmaps) is logged as metadata only. `digest` (the stage fingerprint)
        defaults to one MLflow computes.
        """
        sample = data if isinstance(data, pd.DataFrame) else _parquet_sample(Path(data))
        if sample is None:
            dataset = MetaDataset(_dataset_source(source), name=name, digest=digest)
        else:
            dataset = from_pandas(sample, source=_dataset_source(source), name=name, digest=digest)
        tags = [InputTag(key=MLFLOW_DATASET_CONTEXT, value=context)]
        entry = DatasetInput(dataset._to_mlflow_entity(), tags)
        # MLflow looks a dataset up, then inserts it: two runs logging the same dataset at
        # once collide on its unique key. Serialised in the workspace; for runs of other
        # workspaces on one server, the retry finds it.
        for attempt in range(2):
            try:
                with self.exclusive():
                    self.client.log_inputs(run_id, datasets=[entry])
                return
            except MlflowException as exc:
                if attempt or "UNIQUE" not in str(exc).upper():
                    raise


@contextmanager
def system_metrics(tracker: Tracker, run_id: str, interval: float = 10.0) -> Iterator[SystemMetricsMonitor]:
    """Sample CPU, memory, disk, network (and NVIDIA GPU with nvidia-ml-py) into `system/*` metrics.

    A sample is logged every `interval` seconds while the block runs; the sampling thread
    is stopped and its buffer flushed when the block exits.
    """
    monitor = SystemMetricsMonitor(run_id, sampling_interval=interval, tracking_uri=tracker.uri)
    monitor.start()
    try:
        yield monitor
    finally:
        monitor.finish()


class MetricsCallback:
    """The trainer's metrics callback: buffers `(step, metrics)` and logs them every `every` steps."""

    def __init__(self, tracker: Tracker, run_id: str, every: int = 50) -> None:
        if every < 1:
            raise ValueError(f"every must be at least 1, got {every}")
        self.tracker = tracker
        self.run_id = run_id
        self.every = every
        self._buffer: list[Metric] = []
        self._pending_steps = 0

    def __call__(self, step: int, metrics: Mapping[str, float]) -> None:
        now = _now_ms()
        self._buffer += [Metric(key, float(value), now, step) for key, value in metrics.items()]
        self._pending_steps += 1
        if self._pending_steps >= self.every:
            self.flush()

    def flush(self) -> None:
        if self._buffer:
            self.tracker.log_metric_batch(self.run_id, self._buffer)
        self._buffer = []
        self._pending_steps = 0

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> MetricsCallback:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        if exc_type is None:
            self.close()
            return
        with suppress(Exception):  # the error that ended the block is the one to report
            self.close()
