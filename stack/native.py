"""Run the team stack of docker-compose.yml as local processes, and check it end to end.

Docker cannot run on CI, so `make stack-test` (stack/stack_test.sh) runs the same topology
natively: Postgres from Debian's packages on a private port and data directory, then the
Prefect server, the MLflow server, the deployment registration and the Prefect worker, with
the commands, environment and healthchecks of docker-compose.yml (read through
`stack.compose`) and secrets generated for this run. It triggers the `build-llm` deployment
through the Prefect API as the UI does and checks what a team relies on: the deployments of
prefect.yaml are registered, the run completes, its MLflow runs and the registered model are
in Postgres, the model's artifacts are on the MLflow volume, and both servers refuse requests
without valid credentials. It prints one line per check and a PASS/FAIL summary, stops
everything it started, and exits non-zero when a check failed.

    python -m stack.native --state-dir DIR [--timeout SECONDS]
"""

from __future__ import annotations

import argparse
import base64
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from stack import compose

PRESET = "tiny"
# The deployment's `config` form, as a person would fill it in for a quick run.
QUICK_CONFIG = {"preset": PRESET, "pretrain": {"steps": 4}, "finetune": {"steps": 2},
                "evaluate": {"max_examples_per_family": 1}}
DEPLOYMENTS = {"build-llm", "data", "pretrain", "finetune", "evaluate", "retrain"}
POSTGRES_DATA = "/var/lib/postgresql/data"  # the postgres image's PGDATA
INITDB_DIR = "/docker-entrypoint-initdb.d"  # scripts the postgres image runs on an empty PGDATA
MLFLOW_ARTIFACTS = "/var/lib/tinyseek/mlflow/artifacts"
WORKSPACE = "/var/lib/tinyseek/workspace"
PASSTHROUGH = ("LANG", "LC_ALL", "TZ", "TMPDIR", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
FINAL_STATES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class CheckFailed(Exception):
    """A check of the running stack did not hold; the message says what was seen."""


class Stopped(Exception):
    """SIGTERM (the time limit of stack_test.sh) arrived."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((compose.LOOPBACK, 0))
        return sock.getsockname()[1]


def generated_secrets(names: list[str]) -> dict[str, str]:
    """A fresh random value for every secret the compose file requires (PREFECT_API_AUTH_STRING
    in the user:password form .env.example asks for)."""
    values = {name: secrets.token_hex(16) for name in names}
    if "PREFECT_API_AUTH_STRING" in values:
        values["PREFECT_API_AUTH_STRING"] = f"tinyseek:{values['PREFECT_API_AUTH_STRING']}"
    return values


def postgres_bin() -> Path:
    """Debian's PostgreSQL binaries (/usr/lib/postgresql/<version>/bin, the newest version), else
    those of the `initdb` on PATH."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                   key=lambda p: [int(part) for part in p.parent.parent.name.split(".") if part.isdigit()])
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    if not initdb:
        raise CheckFailed("PostgreSQL is not installed (apt-get install postgresql)")
    return Path(initdb).resolve().parent


def basic_auth(credentials: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(credentials.encode()).decode()}


@dataclass
class Checks:
    """Results in order, printed as they come and summarised at the end."""

    results: list[tuple[bool, str, str]] = field(default_factory=list)

    def run(self, name: str, check: Callable[[], str]) -> bool:
        try:
            ok, detail = True, check()
        except CheckFailed as exc:
            ok, detail = False, str(exc)
        except Exception as exc:  # any error of a check is that check's failure, reported with the rest
            ok, detail = False, f"{type(exc).__name__}: {exc}"
        self.results.append((ok, name, detail))
        print(f"  {'PASS' if ok else 'FAIL'}  {name}: {detail}", flush=True)
        return ok

    def summary(self, seconds: float) -> bool:
        passed = sum(ok for ok, _, _ in self.results)
        ok = bool(self.results) and passed == len(self.results)
        verdict = "PASS" if ok else "FAIL"
        print(f"\nstack-test: {verdict} ({passed}/{len(self.results)} checks passed in {seconds:.0f} s)")
        for good, name, _ in self.results:
            if not good:
                print(f"  failed: {name}")
        return ok


class NativeStack:
    """The compose services as processes under `state_dir`; `close()` stops them all."""

    def __init__(self, state_dir: Path, deadline: float):
        self.state = state_dir
        self.deadline = deadline
        self.variables = generated_secrets(compose.required_variables()) | {"TINYSEEK_PRESET": PRESET}
        exposed = compose.exposed_ports(compose.load())
        self.ports = {port: free_port() for port in exposed.values()}
        self.native_port = {name: self.ports[port] for name, port in exposed.items()}
        self.services, self.translation = compose.native_services(self.variables, self.ports, state_dir)
        self.pg_bin = postgres_bin()
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs = state_dir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)

    # -- processes ---------------------------------------------------------------------------

    def env(self, name: str, extra: dict[str, str] | None = None) -> dict[str, str]:
        """A container-like environment: the service's compose variables, a home of its own."""
        home = self.state / "home" / name
        home.mkdir(parents=True, exist_ok=True)
        base = {key: os.environ[key] for key in PASSTHROUGH if key in os.environ}
        path = os.pathsep.join([str(Path(sys.executable).parent), str(self.pg_bin), SYSTEM_PATH])
        return {**base, "PATH": path, "HOME": str(home), "PYTHONUNBUFFERED": "1",
                **self.services[name].env, **(extra or {})}

    def spawn(self, name: str, argv: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen:
        executable = shutil.which(argv[0], path=env["PATH"]) or argv[0]
        with open(self.logs / f"{name}.log", "ab") as log:
            proc = subprocess.Popen([executable, *argv[1:]], env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs[name] = proc
        with open(self.state / "pgids", "a") as handle:  # for stack_test.sh's exit trap
            handle.write(f"{proc.pid}\n")
        return proc

    def log_tail(self, name: str, lines: int = 25) -> str:
        path = self.logs / f"{name}.log"
        text = path.read_text(errors="replace").splitlines()[-lines:] if path.exists() else []
        return "\n".join(f"    {name}| {line}" for line in text)

    def remaining(self, cap: float) -> float:
        return max(0.0, min(cap, self.deadline - time.time()))

    def close(self) -> None:
        """Stop in reverse start order; Postgres with SIGINT (fast shutdown), as its image does."""
        for name, proc in reversed(self.procs.items()):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGINT if name == "postgres" else signal.SIGTERM)
        for proc in reversed(list(self.procs.values())):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        (self.state / "pgids").unlink(missing_ok=True)

    # -- bringing services up, in compose's dependency order ----------------------------------

    def up(self) -> str:
        pending, ready = dict(self.services), []
        while pending:
            wave = [name for name, svc in pending.items() if set(svc.depends_on) <= set(ready)]
            if not wave:
                raise CheckFailed(f"depends_on cycle among {sorted(pending)}")
            for name in wave:
                if name == "postgres":
                    self.start_postgres()
                else:
                    self.start(name)
            for name in wave:
                self.wait_ready(name)
                if name == "postgres":
                    self.run_init_scripts()  # as the postgres image does on an empty data directory
                ready.append(name)
                del pending[name]
        listening = [f"{name} (:{self.native_port[name]})" if name in self.native_port else name for name in ready]
        return "started " + ", ".join(listening)

    def start(self, name: str) -> None:
        svc = self.services[name]
        svc.cwd.mkdir(parents=True, exist_ok=True)
        self.spawn(name, svc.command, self.env(name), svc.cwd)

    def start_postgres(self) -> None:
        """Debian's postgres on a private port, data directory and socket; then the init scripts."""
        data = Path(self.translation.text(POSTGRES_DATA))
        sockets = self.state / "pgsocket"
        password = self.state / "pgpassword"
        as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        self.state.chmod(0o755)  # the postgres user walks into it
        for directory in (data, sockets):
            directory.mkdir(parents=True, exist_ok=True)
            directory.chmod(0o700)
        password.write_text(self.variables["POSTGRES_PASSWORD"])
        password.chmod(0o600)
        if as_postgres:
            for path in (data, sockets, password):
                shutil.chown(path, "postgres", "postgres")
        with open(self.logs / "postgres.log", "ab") as log:
            subprocess.run([*as_postgres, str(self.pg_bin / "initdb"), "-D", str(data), "-U", "postgres",
                            f"--pwfile={password}", "--auth-local=trust", "--auth-host=scram-sha-256",
                            "--no-locale", "--encoding=UTF8", "--no-instructions"],
                           cwd=self.state, stdout=log, stderr=subprocess.STDOUT, check=True, timeout=120)
        password.unlink()
        port = str(self.native_port["postgres"])
        self.spawn("postgres", [*as_postgres, str(self.pg_bin / "postgres"), "-D", str(data), "-p", port,
                                "-k", str(sockets), "-c", f"listen_addresses={compose.LOOPBACK}"],
                   self.env("postgres"), self.state)

    def run_init_scripts(self) -> None:
        sockets = self.state / "pgsocket"
        env = self.env("postgres", {"PGHOST": str(sockets), "PGPORT": str(self.native_port["postgres"]),
                                    "POSTGRES_USER": "postgres", "POSTGRES_DB": "postgres"})
        scripts = sorted((target, path) for target, path in self.translation.paths.items()
                         if target.startswith(INITDB_DIR + "/"))
        if not scripts:
            raise CheckFailed(f"docker-compose.yml mounts no init script into {INITDB_DIR}")
        for _, script in scripts:
            with open(self.logs / "postgres-init.log", "ab") as log:
                subprocess.run(["sh", str(script)], env=env, cwd=self.state, stdout=log, stderr=subprocess.STDOUT,
                               check=True, timeout=60)

    def healthy(self, name: str) -> bool:
        check = self.services[name].healthcheck
        try:
            return subprocess.run(check, env=self.env(name), cwd=self.state, capture_output=True,
                                  timeout=15).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    def wait_ready(self, name: str) -> None:
        svc, proc = self.services[name], self.procs[name]
        limit = time.time() + self.remaining(300)
        while time.time() < limit:
            if svc.oneshot:
                if proc.poll() is not None:
                    if proc.returncode:
                        raise CheckFailed(f"{name} exited with {proc.returncode}\n{self.log_tail(name)}")
                    return
            elif proc.poll() is not None:
                raise CheckFailed(f"{name} exited with {proc.returncode} before it was healthy\n{self.log_tail(name)}")
            elif svc.healthcheck is None or self.healthy(name):
                return
            time.sleep(1)
        raise CheckFailed(f"{name} was not {'done' if svc.oneshot else 'healthy'} in time\n{self.log_tail(name)}")

    # -- talking to the servers -------------------------------------------------------------

    def url(self, name: str) -> str:
        return f"http://{compose.LOOPBACK}:{self.native_port[name]}"

    def prefect(self, method: str, path: str, credentials: str | None = "valid", **kwargs: Any) -> httpx.Response:
        auth = self.variables["PREFECT_API_AUTH_STRING"] if credentials == "valid" else credentials
        headers = basic_auth(auth) if auth else {}
        return httpx.request(method, f"{self.url('prefect-server')}/api{path}", headers=headers, timeout=30, **kwargs)

    def mlflow(self, path: str, auth: tuple[str, str] | None) -> httpx.Response:
        return httpx.get(f"{self.url('mlflow')}{path}", auth=auth, timeout=30)

    def mlflow_login(self) -> tuple[str, str]:
        env = self.services["prefect-worker"].env
        return env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"]

    def query(self, database: str, sql: str, **params: Any) -> list[tuple]:
        """Rows of `sql` in one of the stack's databases, connected as the role that owns it."""
        from sqlalchemy import create_engine, text

        password = self.variables[f"{database.upper()}_DB_PASSWORD"]
        engine = create_engine(f"postgresql+psycopg://{database}:{password}@{compose.LOOPBACK}:"
                               f"{self.native_port['postgres']}/{database}")
        try:
            with engine.connect() as connection:
                return [tuple(row) for row in connection.execute(text(sql), params)]
        finally:
            engine.dispose()


class StackTest:
    """The end-to-end checks, in order; each returns a one-line detail or raises CheckFailed."""

    def __init__(self, stack: NativeStack):
        self.stack = stack
        self.deployment: dict[str, Any] = {}
        self.flow_run_id = ""

    def deployments_registered(self) -> str:
        found = self.stack.prefect("POST", "/deployments/filter", json={}).raise_for_status().json()
        by_name = {d["name"]: d for d in found}
        if set(by_name) != DEPLOYMENTS:
            raise CheckFailed(f"deployments {sorted(by_name)}, expected {sorted(DEPLOYMENTS)}")
        self.deployment = by_name["build-llm"]
        workspace = self.stack.translation.text(WORKSPACE)
        expected = {"config": {"preset": PRESET}, "workspace_dir": workspace}
        if self.deployment["parameters"] != expected:
            raise CheckFailed(f"build-llm parameters {self.deployment['parameters']}, expected {expected}")
        crons = [s["schedule"].get("cron") for s in by_name["retrain"]["schedules"]]
        if not crons:
            raise CheckFailed("retrain has no schedule")
        limit = (by_name["retrain"].get("global_concurrency_limit") or {}).get("limit")
        if limit != 1:
            raise CheckFailed(f"retrain runs {limit or 'any number'} at a time, expected 1")
        return (f"{len(by_name)} deployments from prefect.yaml; build-llm parameters {expected}; retrain cron {crons}, "
                f"one run at a time")

    def pipeline_completes(self) -> str:
        if not self.deployment:
            raise CheckFailed("no build-llm deployment to trigger")
        parameters = {**self.deployment["parameters"], "config": QUICK_CONFIG}
        run = self.stack.prefect("POST", f"/deployments/{self.deployment['id']}/create_flow_run",
                                 json={"parameters": parameters}).raise_for_status().json()
        self.flow_run_id = run["id"]
        started, state = time.time(), run["state"]
        limit = started + self.stack.remaining(420)
        while state["type"] not in FINAL_STATES and time.time() < limit:
            time.sleep(3)
            state = self.stack.prefect("GET", f"/flow_runs/{self.flow_run_id}").raise_for_status().json()["state"]
        if state["type"] != "COMPLETED":
            raise CheckFailed(f"flow run {self.flow_run_id} ended {state['type']} ({state.get('message')})\n"
                              f"{self.stack.log_tail('prefect-worker', 40)}")
        return f"build-llm run {self.flow_run_id} triggered through the API, COMPLETED in {time.time() - started:.0f} s"

    def prefect_state_in_postgres(self) -> str:
        if not self.flow_run_id:
            raise CheckFailed("no flow run was created")
        rows = self.stack.query("prefect", "SELECT CAST(state_type AS TEXT) FROM flow_run WHERE id = CAST(:id AS uuid)",
                                id=self.flow_run_id)
        if rows != [("COMPLETED",)]:
            raise CheckFailed(f"prefect.flow_run rows for the run: {rows}")
        return "prefect database: flow_run COMPLETED"

    def mlflow_runs_in_postgres(self) -> str:
        runs = self.stack.query("mlflow", "SELECT r.name, r.status FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
                                          "WHERE t.key = 'prefect.flow_run_id' AND t.value = :id", id=self.flow_run_id)
        unfinished = [row for row in runs if row[1] != "FINISHED"]
        if len(runs) < 2 or unfinished:
            raise CheckFailed(f"MLflow runs tagged with the flow run: {runs}")
        versions = self.stack.query("mlflow", "SELECT version FROM model_versions WHERE name = 'tinyseek'")
        if not versions:
            raise CheckFailed("no version of the registered model tinyseek")
        return (f"mlflow database: {len(runs)} FINISHED runs tagged with the flow run "
                f"({', '.join(sorted(name for name, _ in runs))}); tinyseek versions {[v for (v,) in versions]}")

    def artifacts_on_volume(self) -> str:
        root = Path(self.stack.translation.text(MLFLOW_ARTIFACTS))
        models = list(root.rglob("MLmodel"))
        if not models:
            raise CheckFailed(f"no MLmodel under {root}")
        return f"{len(models)} logged model(s) under the mlflow volume ({root})"

    def prefect_refuses_anonymous(self) -> str:
        path = "/deployments/filter"
        codes = {label: self.stack.prefect("POST", path, credentials=creds, json={}).status_code
                 for label, creds in (("none", None), ("wrong", "tinyseek:wrong-password"), ("valid", "valid"))}
        if codes != {"none": 401, "wrong": 401, "valid": 200}:
            raise CheckFailed(f"POST /api{path} answered {codes}")
        health = httpx.get(f"{self.stack.url('prefect-server')}/api/health", timeout=10).status_code
        return f"POST /api{path}: no credentials 401, wrong 401, valid 200 (health {health} without)"

    def mlflow_refuses_anonymous(self) -> str:
        path = "/api/2.0/mlflow/registered-models/search"
        user, password = self.stack.mlflow_login()
        codes = {label: self.stack.mlflow(path, auth).status_code
                 for label, auth in (("none", None), ("wrong", (user, "wrong-password")), ("valid", (user, password)))}
        if codes != {"none": 401, "wrong": 401, "valid": 200}:
            raise CheckFailed(f"GET {path} answered {codes}")
        return f"GET {path}: no credentials 401, wrong 401, valid 200"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stack.native", description=__doc__.split("\n\n")[0])
    parser.add_argument("--state-dir", required=True, help="an empty directory for data, logs and volumes")
    parser.add_argument("--timeout", type=float, default=540, help="seconds for the whole run (default: 540)")
    args = parser.parse_args(argv)

    def stop(signum, frame):
        raise Stopped()

    signal.signal(signal.SIGTERM, stop)
    started = time.time()
    checks = Checks()
    stack = None
    print("stack-test: the docker-compose.yml stack as local processes (no Docker engine)", flush=True)
    try:
        stack = NativeStack(Path(args.state_dir).resolve(), started + args.timeout)
        if checks.run("services up in depends_on order, healthchecks passing", stack.up):
            test = StackTest(stack)
            for name, check in (
                ("prefect deploy --all registered prefect.yaml", test.deployments_registered),
                ("build-llm triggered through the Prefect API completes on the worker", test.pipeline_completes),
                ("the flow run is recorded in Prefect's Postgres database", test.prefect_state_in_postgres),
                ("MLflow runs and the registered model are in MLflow's Postgres database",
                 test.mlflow_runs_in_postgres),
                ("MLflow serves artifacts from its volume", test.artifacts_on_volume),
                ("the Prefect API refuses requests without valid credentials", test.prefect_refuses_anonymous),
                ("the MLflow server refuses requests without valid credentials", test.mlflow_refuses_anonymous),
            ):
                checks.run(name, check)
    except (Stopped, KeyboardInterrupt):
        checks.results.append((False, "finished within the time limit", "stopped"))
    except Exception as exc:  # reading the compose file or finding Postgres failed
        checks.results.append((False, "set up the stack", f"{type(exc).__name__}: {exc}"))
        print(f"  FAIL  set up the stack: {type(exc).__name__}: {exc}")
    finally:
        if stack:
            stack.close()
    return 0 if checks.summary(time.time() - started) else 1


if __name__ == "__main__":
    sys.exit(main())
