"""A real Prefect server: the deployments are served, `build-llm` is triggered through the
API the way the UI does and completes, `retrain` has its schedule, and a
`tinyseek.corpus.updated` event creates a `retrain` run."""

import asyncio
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from flows import deploy
from flows.deploy import stop_serving
from tasks.tracking import TAG_PROCESS, Tracker

from tests.flows.helpers import BIN, TINYSEEK, cli_env, free_port, mlflow_runs
from tests.processes import dead_pid

STAGE_TASKS = ["collect", "clean", "tokenize", "pretrain", "finetune", "evaluate", "register"]
QUICK = ["--set", "pretrain.steps=4", "--set", "finetune.steps=2", "--set", "evaluate.max_examples_per_family=1"]


def wait_for(url: str, proc: subprocess.Popen, timeout: float = 150) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"{proc.args[:3]} exited with {proc.returncode}"
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(url)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    home = root / "prefect-server"
    server_env = cli_env(PREFECT_HOME=str(home),
                         PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home / 'server.db'}")
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=server_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    procs = [server]
    try:
        wait_for(f"{api}/health", server)
        log = open(root / "serve.log", "w")
        serve = subprocess.Popen([TINYSEEK, "serve", "--preset", "tiny", "--workspace", str(root / "ws"), *QUICK],
                                 env=cli_env(PREFECT_API_URL=api), stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        procs.append(serve)
        yield api, root, serve
    finally:
        for proc in reversed(procs):
            stop(proc)


async def deployment_ids(client, names: set[str], timeout: float = 120) -> dict[str, object]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = {d.name: d for d in await client.read_deployments() if d.name in names}
        if set(found) == names:
            return found
        await asyncio.sleep(1)
    raise TimeoutError(f"deployments {names} were not served")


def test_served_deployments_run_from_the_api_and_react_to_events(served):
    # Prefect reads its settings when first imported: an earlier test in this process may
    # have imported it without a server, so the server is set for this block, not in os.environ
    from prefect.settings import PREFECT_API_URL, temporary_settings

    api, root, _ = served
    with temporary_settings(updates={PREFECT_API_URL: api}):
        asyncio.run(exercise(root))


async def exercise(root):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, FlowRunFilter, FlowRunFilterId
    from prefect.events.clients import get_events_client
    from prefect.events.schemas.events import Event

    async with get_client() as client:
        deployments = await deployment_ids(client, {"build-llm", "data", "pretrain", "finetune", "evaluate", "retrain"})
        retrain = deployments["retrain"]
        assert any(s.schedule.cron == "0 3 * * *" for s in retrain.schedules)
        # one retrain at a time: a schedule or burst of events firing mid-retrain queues the next
        assert retrain.global_concurrency_limit.limit == 1

        # the UI's "Quick run": a flow run from the deployment with its default parameters
        run = await client.create_flow_run_from_deployment(deployments["build-llm"].id)
        deadline = time.time() + 400
        while time.time() < deadline:
            run = await client.read_flow_run(run.id)
            if run.state.is_final():
                break
            await asyncio.sleep(2)
        assert run.state.is_completed(), (run.state, (root / "serve.log").read_text()[-3000:])
        # the UI's graph of the run: every stage, registration included, is a task run
        task_runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
        assert sorted(t.name.rsplit("-", 1)[0] for t in task_runs) == sorted(STAGE_TASKS), [t.name for t in task_runs]
        assert all(t.state.is_completed() for t in task_runs)

        async with get_events_client() as events:
            await events.emit(Event(event="tinyseek.corpus.updated", resource={"prefect.resource.id": "tinyseek.corpus"}))
        deadline = time.time() + 90
        triggered = []
        while time.time() < deadline and not triggered:
            runs = await client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[retrain.id])))
            triggered = [r for r in runs if str(r.parameters.get("refresh_token", "")).startswith("event-")]
            await asyncio.sleep(1)
        assert triggered, "no retrain run was created by the corpus-updated event"


def test_stopping_the_deployments_cancels_a_run_in_progress_and_records_it(served):
    """What `tinyseek up` does on Ctrl-C, before it stops the servers: the runner cancels
    its flow runs, and each records its end while the servers still answer."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    api, root, serve = served
    with temporary_settings(updates={PREFECT_API_URL: api}):
        run_id = asyncio.run(start_long_pretraining(root))
        killed = run_of_a_killed_flow_process(root / "ws")
        stop_serving(serve)
        run = asyncio.run(read_flow_run(run_id))
    assert run.state.is_cancelled(), (run.state, (root / "serve.log").read_text()[-3000:])
    # a flow run that outlasts the runner's grace is killed outright: `serve` ends its runs on stopping
    assert Tracker(root / "ws").client.get_run(killed).info.status == "KILLED"
    assert "1 MLflow run(s) of flow runs killed on stopping ended as KILLED" in (root / "serve.log").read_text()
    runs = mlflow_runs(root / "ws", filter_string=f"tags.`prefect.flow_run_id` = '{run_id}'")
    assert {r.info.status for r in runs} == {"KILLED", "FINISHED"}, (
        [(r.info.run_name, r.info.status) for r in runs], (root / "serve.log").read_text()[-3000:])
    assert {r.info.run_name for r in runs if r.info.status == "KILLED"} == {"pretrain"}


def run_of_a_killed_flow_process(ws: Path) -> str:
    """A run left RUNNING by a process of this machine that is gone, as a flow run's process
    killed outright leaves its runs."""
    return Tracker(ws).start_run("pretrain", tags={TAG_PROCESS: f"{socket.gethostname()}:{dead_pid()}"})


async def start_long_pretraining(root):
    """A flow run of the `pretrain` deployment with far more steps than it will get through,
    once its training has started."""
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        deployment = (await deployment_ids(client, {"pretrain"}))["pretrain"]
        params = dict(deployment.parameters)
        params["config"] = {**params["config"], "pretrain": {**params["config"]["pretrain"], "steps": 100_000}}
        run = await client.create_flow_run_from_deployment(deployment.id, parameters=params)
        deadline = time.time() + 300
        while not any((root / "ws" / "pretrain").glob(".*.work/step-*")):
            assert time.time() < deadline, "no pretraining checkpoint within 300 s"
            assert not (await client.read_flow_run(run.id)).state.is_final(), (root / "serve.log").read_text()[-3000:]
            await asyncio.sleep(1)
        return run.id


async def read_flow_run(run_id):
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        return await client.read_flow_run(run_id)


def processes_mentioning(text: str) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in args:
            found.append(args)
    return found


@pytest.mark.parametrize("failing", ["serve", "mlflow"])
def test_servers_started_are_stopped_when_what_follows_cannot_start(tmp_path, monkeypatch, failing):
    """The servers run in sessions of their own: if starting the next process fails, nothing
    else would stop those already started."""
    started, popen = [], subprocess.Popen
    handlers = {sig: signal.getsignal(sig) for sig in deploy.STOP_SIGNALS}  # `up` installs its own

    def start(args, **options):
        if failing in (Path(arg).name for arg in args):  # the mlflow executable, or the serve command
            raise FileNotFoundError(f"no {failing} here")
        started.append(popen(["sleep", "60"], start_new_session=True))
        return started[-1]

    monkeypatch.setattr(deploy.subprocess, "Popen", start)
    monkeypatch.setattr(deploy, "wait_healthy", lambda *args: None)
    try:
        with pytest.raises(FileNotFoundError, match=f"no {failing} here"):
            deploy.up(tmp_path, free_port(), free_port(), "127.0.0.1", [])
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert len(started) == (2 if failing == "serve" else 1)
    assert [proc.poll() for proc in started] == [-signal.SIGTERM] * len(started)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_up_stops_everything_it_started_on_a_signal(tmp_path, sig):
    """`kill` or a closed terminal stops `up` the way Ctrl-C does: its servers, in sessions of
    their own, would otherwise keep running and holding the ports."""
    prefect_port, mlflow_port = free_port(), free_port()
    log = tmp_path / "up.log"
    with open(log, "w") as out:
        up = subprocess.Popen([TINYSEEK, "up", "--preset", "tiny", "--workspace", str(tmp_path / "ws"),
                               "--prefect-port", str(prefect_port), "--mlflow-port", str(mlflow_port)],
                              env=cli_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(f"http://127.0.0.1:{prefect_port}/api/health", up)
        wait_for(f"http://127.0.0.1:{mlflow_port}/health", up)
        deadline = time.time() + 60
        while not any(" serve " in p for p in processes_mentioning(str(tmp_path / "ws"))) and time.time() < deadline:
            time.sleep(0.5)
        up.send_signal(sig)  # to `up` alone, as `kill PID` does
        up.wait(timeout=150)
    finally:
        stop(up)
    assert "stopped the deployments, the Prefect server and the MLflow server" in log.read_text(), log.read_text()
    assert processes_mentioning(str(tmp_path / "ws")) == []
    for port in prefect_port, mlflow_port:
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{port}/", timeout=2)
