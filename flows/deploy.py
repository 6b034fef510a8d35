"""Deployments for the Prefect UI and schedules, and the one-command local stack.

`serve()` serves every flow as a deployment to the server in PREFECT_API_URL: each can
be started from the UI with its form (the preset's values filled in), `retrain` also
runs on a cron schedule and whenever a `tinyseek.corpus.updated` event arrives.
`up()` starts a Prefect server and an MLflow server as child processes (SQLite in the
workspace), waits until both answer, serves the deployments and stops it all on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from flows import prefect_database
from tasks.config import PipelineConfig
from tasks.children import adopt_orphans
from tasks.stage import StageError, workspace

CORPUS_UPDATED = "tinyseek.corpus.updated"
DEFAULT_CRON = "0 3 * * *"


def deployments(config: PipelineConfig, workspace_dir: str, cron: str = DEFAULT_CRON) -> list:
    from prefect.events import DeploymentEventTrigger

    from flows import pipeline

    params = {"config": config.model_dump(mode="json"), "workspace_dir": workspace_dir}
    stage_flows = {
        "build-llm": pipeline.build_llm,
        "data": pipeline.data_flow,
        "pretrain": pipeline.pretrain_flow,
        "finetune": pipeline.finetune_flow,
        "evaluate": pipeline.evaluate_flow,
    }
    out = [flow.to_deployment(name=name, parameters=params, tags=["tinyseek", config.preset])
           for name, flow in stage_flows.items()]
    out.append(
        pipeline.retrain.to_deployment(
            name="retrain",
            parameters=params,
            cron=cron,
            # one retrain at a time: a schedule or a burst of corpus events that fires while one
            # runs queues the next rather than training two models side by side
            concurrency_limit=1,
            tags=["tinyseek", config.preset],
            triggers=[
                DeploymentEventTrigger(
                    name="corpus updated",
                    expect={CORPUS_UPDATED},
                    parameters={**params, "refresh_token": "event-{{ event.id }}"},
                )
            ],
        )
    )
    return out


def check_cron(cron: str) -> None:
    """Refuse a retrain schedule Prefect would refuse, before any server starts, and one of
    six fields, whose sixth Prefect reads as seconds (`* * * * * *`: a retrain every second)."""
    from prefect.client.schemas.schedules import CronSchedule
    from pydantic import ValidationError

    usage = (f"five fields, minute hour day month weekday, e.g. {DEFAULT_CRON!r} (daily at 03:00), "
             "or an alias such as '@hourly'")
    fields = cron.split()
    if len(fields) == 6:
        raise StageError(f"--cron {cron!r} has a sixth field, which Prefect reads as seconds: use {usage}")
    try:
        if not (len(fields) == 5 or (len(fields) == 1 and cron.strip().startswith("@"))):
            raise ValueError(cron)
        CronSchedule(cron=cron)
    except (ValueError, ValidationError):
        raise StageError(f"--cron {cron!r} is not a cron schedule: {usage}") from None


def require_server() -> None:
    """Refuse to serve without a Prefect server: the deployments would live only as long as
    the temporary one a run starts, unseen by any UI."""
    if not os.environ.get("PREFECT_API_URL"):
        raise StageError("tinyseek serve needs a Prefect server: set PREFECT_API_URL, or use `tinyseek up`")


def serve(config: PipelineConfig, workspace_dir: str, cron: str = DEFAULT_CRON) -> None:
    """Serve all deployments until interrupted (needs a Prefect server)."""
    require_server()
    from prefect import serve as prefect_serve

    try:
        prefect_serve(*deployments(config, workspace_dir, cron), print_starting_message=True)
    finally:
        end_killed_runs(workspace_dir)


def end_killed_runs(workspace_dir: str) -> None:
    """On stopping, Prefect's runner cancels its flow runs with SIGTERM, and kills outright
    one that has not ended 30 s later; such a run cannot mark its MLflow runs KILLED itself.
    They are ended here, not left RUNNING until the workspace's next run ends them."""
    from tasks.tracking import Tracker  # MLflow: not imported by `up`, which only starts processes

    try:
        orphans = Tracker(workspace(workspace_dir)).end_orphaned_runs()
    except Exception as exc:  # the store unreachable: the next run ends them
        print(f"could not end the MLflow runs of flow runs killed on stopping ({type(exc).__name__}: {exc})")
        return
    if orphans:
        print(f"{len(orphans)} MLflow run(s) of flow runs killed on stopping ended as KILLED")


def wait_healthy(url: str, what: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise StageError(f"{what} exited with code {proc.returncode} before answering at {url}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise StageError(f"{what} did not answer at {url} within {timeout:.0f} s")


def _executable(name: str) -> str:
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


def check_free(host: str, port: int, option: str) -> None:
    """Refuse a port another process listens on, naming the option that moves it, and a host
    the servers cannot listen on (not this machine's, or not IPv4), naming --host."""
    with socket.socket() as probe:
        # as the servers bind: connections of a server stopped moments ago (TIME_WAIT) do not count
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            fix = (f"pass {option} with a free port" if exc.errno == errno.EADDRINUSE else
                   "pass --host with an IPv4 address or host name of this machine")
            raise StageError(f"cannot listen on {host}:{port} ({exc.strerror}): {fix}") from None


def mlflow_host_options(host: str, port: int) -> list[str]:
    """`mlflow server` options that let clients name the server by `host`. MLflow refuses API
    calls whose Host header is not local or a private address (DNS rebinding), but answers
    its health check: a host name such as the machine's would pass the check and fail
    every run's tracking."""
    from mlflow.server.security_utils import get_default_allowed_hosts, is_allowed_host_header

    allowed = get_default_allowed_hosts()
    # clients send the name in lower case; listening on every address, the machine is named by its own names
    names = {host.lower()} | ({socket.gethostname().lower(), socket.getfqdn().lower()} if host == "0.0.0.0" else set())
    added = [f"{name}{suffix}" for name in sorted(names) for suffix in ("", f":{port}")
             if not is_allowed_host_header(allowed, f"{name}{suffix}")]
    return ["--allowed-hosts", ",".join([*allowed, *added])] if added else []


def start_servers(root: Path, prefect_port: int, mlflow_port: int, host: str = "127.0.0.1") -> list[subprocess.Popen]:
    """A Prefect server and an MLflow server on SQLite under the workspace, both healthy."""
    if prefect_port == mlflow_port:
        raise StageError(f"--prefect-port and --mlflow-port are both {prefect_port}: give each server its own port")
    check_free(host, prefect_port, "--prefect-port")
    check_free(host, mlflow_port, "--mlflow-port")
    env = {**os.environ, "PREFECT_HOME": str(root / "prefect"),
           "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{root / 'prefect' / 'prefect.db'}"}
    (root / "prefect").mkdir(parents=True, exist_ok=True)
    prefect_database.seed(root / "prefect" / "prefect.db")
    from tasks.tracking import readable_store, relocate_store  # (MLflow's import is slow: only here)

    store = f"sqlite:///{root / 'mlflow.db'}"
    with readable_store(store):
        relocate_store(store)  # the server reads the store's locations as they are
    procs: list[subprocess.Popen] = []  # each stopped below if a later one fails to start
    try:
        procs.append(subprocess.Popen(
            [_executable("prefect"), "server", "start", "--host", host, "--port", str(prefect_port)],
            env=env, start_new_session=True,
        ))
        procs.append(subprocess.Popen(
            [_executable("mlflow"), "server", "--host", host, "--port", str(mlflow_port),
             *mlflow_host_options(host, mlflow_port),
             "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
             "--artifacts-destination", str(root / "mlartifacts"), "--serve-artifacts",
             "--uvicorn-opts", "--no-access-log"],  # a line per logged metric batch otherwise
            # its web stack warns of a deprecated starlette module in each worker, at every start
            env={**env, "PYTHONWARNINGS": "ignore:starlette.middleware.wsgi is deprecated"},
            start_new_session=True,
        ))
        wait_healthy(f"http://{host}:{prefect_port}/api/health", "the Prefect server", procs[0])
        wait_healthy(f"http://{host}:{mlflow_port}/health", "the MLflow server", procs[1])
    except BaseException:
        stop(procs)
        raise
    return procs


def stop(procs: list[subprocess.Popen]) -> None:
    """Stop servers: SIGTERM to each process group (servers run workers), SIGKILL after 20 s."""
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        _wait_or_kill(proc, 20)


def stop_serving(serve: subprocess.Popen, timeout: float = 120) -> None:
    """Stop `tinyseek serve` while the servers still run: SIGTERM to the process alone lets
    Prefect's runner cancel its flow runs, which record their end (Cancelled in Prefect,
    KILLED in MLflow) before the servers go."""
    if serve.poll() is None:
        serve.terminate()
    _wait_or_kill(serve, timeout)


def _wait(proc: subprocess.Popen, timeout: float) -> int | None:
    """proc's exit code, or None if it still runs `timeout` seconds later."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


def _wait_or_kill(proc: subprocess.Popen, timeout: float) -> None:
    if _wait(proc, timeout) is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _adopted(keep: list[subprocess.Popen]) -> list:
    """This process's children other than `keep`: processes adopted from a parent that died
    (`adopt_orphans`), such as a worker pool a finished flow run left to end on its own."""
    import psutil

    kept = {proc.pid for proc in keep}
    return [child for child in psutil.Process().children() if child.pid not in kept]


def reap_adopted(keep: list[subprocess.Popen]) -> None:
    """Collect the exit status of adopted processes that have ended, so that they do not stay
    behind as zombies while `up` runs."""
    import psutil

    for child in _adopted(keep):
        with contextlib.suppress(psutil.Error):
            if child.status() == psutil.STATUS_ZOMBIE:
                child.wait(0)


def stop_orphans(keep: list[subprocess.Popen], timeout: float = 30) -> int:
    """Stop the processes this process adopted (`_adopted`), and those they adopted in turn:
    SIGTERM, as the runner cancels a flow run, then SIGKILL after `timeout` seconds. The
    number of flow runs among them (Prefect's engine: a `tinyseek serve` that died left them)."""
    import psutil

    flow_runs, seen = 0, set()
    # a process stopped may leave children of its own; one that cannot be stopped is not tried twice
    while orphans := [child for child in _adopted(keep) if child.pid not in seen]:
        seen.update(orphan.pid for orphan in orphans)
        for orphan in orphans:
            with contextlib.suppress(psutil.Error):
                if orphan.status() != psutil.STATUS_ZOMBIE:
                    flow_runs += "prefect.engine" in orphan.cmdline()
                    orphan.terminate()
        _, alive = psutil.wait_procs(orphans, timeout=timeout)  # also collects the zombies
        for orphan in alive:
            with contextlib.suppress(psutil.Error):
                orphan.kill()
        psutil.wait_procs(alive, timeout=timeout)
    return flow_runs


# what stops `up` as Ctrl-C does: `kill` or a service manager (SIGTERM), a closed terminal (SIGHUP).
# Its servers run in sessions of their own, so only `up` can stop them.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def up(root: Path, prefect_port: int, mlflow_port: int, host: str, serve_args: list[str]) -> None:
    """Servers first, then `tinyseek serve SERVE_ARGS` pointed at them, until Ctrl-C (or a
    SIGTERM or SIGHUP), which stops them all."""
    for sig in STOP_SIGNALS[1:]:
        signal.signal(sig, _interrupt)
    # Prefect's runner starts each flow run in a session of its own: were `tinyseek serve` killed (out of
    # memory, SIGKILL), its flow runs would go on training under init, out of reach of `up`
    adopt_orphans()
    procs = start_servers(root, prefect_port, mlflow_port, host)
    env = {**os.environ, "PREFECT_API_URL": f"http://{host}:{prefect_port}/api",
           "MLFLOW_TRACKING_URI": f"http://{host}:{mlflow_port}"}
    serving, code = None, 0
    try:  # from here on, whatever happens stops the servers
        print(f"Prefect UI: http://{host}:{prefect_port}")
        print(f"MLflow UI:  http://{host}:{mlflow_port}")
        print("serving the deployments (build-llm, data, pretrain, finetune, evaluate, retrain); "
              "Ctrl-C stops everything")
        # this interpreter's own CLI: no `tinyseek` script needs to be on the PATH
        serving = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", *serve_args], env=env,
                                   start_new_session=True)
        while (code := _wait(serving, 10)) is None:
            reap_adopted([*procs, serving])
    except KeyboardInterrupt:
        for sig in STOP_SIGNALS:  # the shutdown below runs to its end
            signal.signal(sig, signal.SIG_IGN)
        print("stopping: flow runs in progress are cancelled first", flush=True)
    finally:
        try:
            if serving is not None:
                stop_serving(serving)
            if flow_runs := stop_orphans(procs):
                print(f"stopped {flow_runs} flow run(s) left running by `tinyseek serve`", flush=True)
                end_killed_runs(str(root))
        finally:
            stop(procs)
        print("stopped the deployments, the Prefect server and the MLflow server")
    if code:
        raise StageError(f"serving the deployments failed (`tinyseek serve` exited with code {code}); "
                         "its error is above")
