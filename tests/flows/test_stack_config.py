"""The team stack's files: docker-compose.yml is secure by default and complete, the native
stack (stack/native.py, `make stack-test`) runs exactly its commands and environment, and
the Dockerfile builds a multi-stage, non-root image."""

import configparser
import re
from pathlib import Path

import pytest
import yaml

from stack import compose, native

REPO = compose.REPO_ROOT
SECRET_NAME = re.compile(r"PASSWORD|SECRET|AUTH_STRING|_KEY$")
SERVICE_ADDRESS = re.compile(r"\b(postgres|prefect-server|mlflow):\d+")


def secrets() -> dict[str, str]:
    return {name: f"{name.lower()}-value" for name in compose.required_variables()}


@pytest.fixture(scope="module")
def raw():
    """The compose file as written, before interpolation."""
    return compose.load()


@pytest.fixture(scope="module")
def resolved():
    """The compose file as `docker compose` resolves it with a .env holding only the secrets."""
    return compose.interpolate(compose.load(), secrets())


@pytest.fixture(scope="module")
def gpu():
    """The GPU override's worker service (docker-compose.gpu.yml), as written."""
    return yaml.safe_load((REPO / "docker-compose.gpu.yml").read_text())["services"]["prefect-worker"]


@pytest.fixture(scope="module")
def translated(tmp_path_factory):
    ports = {port: 20000 + i for i, port in enumerate(compose.exposed_ports(compose.load()).values())}
    state = tmp_path_factory.mktemp("state")
    services, translation = compose.native_services(secrets(), ports, state)
    return services, translation, ports, state


def long_running(compose_data) -> dict:
    return {name: svc for name, svc in compose_data["services"].items() if svc.get("restart") != "no"}


def test_the_stack_has_its_services_on_postgres(resolved):
    services = resolved["services"]
    assert {"postgres", "prefect-server", "prefect-worker", "mlflow"} <= set(services)
    assert services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"].startswith(
        "postgresql+asyncpg://prefect:")
    assert "postgresql://mlflow:" in " ".join(services["mlflow"]["command"])
    assert services["prefect-worker"]["command"][:7] == ["prefect", "worker", "start", "--pool", "tinyseek",
                                                         "--type", "process"]


def test_the_init_script_creates_the_databases_the_servers_use(resolved):
    script = (REPO / "stack" / "postgres-init.sh").read_text()
    created = dict(re.findall(r"CREATE DATABASE (\w+) OWNER (\w+);", script))
    urls = [resolved["services"]["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"],
            *[arg for arg in resolved["services"]["mlflow"]["command"] if arg.startswith("postgresql")]]
    used = {re.search(r"/(\w+)$", url)[1]: re.search(r"//(\w+):", url)[1] for url in urls}
    assert used == created == {"prefect": "prefect", "mlflow": "mlflow"}
    mounts = resolved["services"]["postgres"]["volumes"]
    assert any(m.startswith("./stack/postgres-init.sh:/docker-entrypoint-initdb.d/") for m in mounts)


def test_published_ports_bind_to_localhost_unless_told_otherwise(raw):
    published = {name: svc["ports"] for name, svc in raw["services"].items() if svc.get("ports")}
    assert set(published) == {"prefect-server", "mlflow"}
    for ports in published.values():
        for mapping in ports:
            assert compose.interpolate(mapping, secrets()).startswith("127.0.0.1:"), mapping
            assert compose.interpolate(mapping, {"TINYSEEK_BIND": "0.0.0.0"}).startswith("0.0.0.0:"), mapping
    assert not raw["services"]["postgres"].get("ports"), "Postgres must not be published"


def test_every_secret_comes_from_env_and_compose_refuses_to_start_without_it(raw):
    required = compose.required_variables()
    assert {"POSTGRES_PASSWORD", "PREFECT_API_AUTH_STRING", "MLFLOW_TRACKING_PASSWORD",
            "MLFLOW_FLASK_SERVER_SECRET_KEY"} <= set(required)
    for name, svc in raw["services"].items():
        for key, value in (svc.get("environment") or {}).items():
            if SECRET_NAME.search(key):
                assert re.fullmatch(r"\$\{\w+:\?[^}]+\}", str(value)), f"{name}.{key} = {value!r}"
            if "://" in str(value) and "@" in str(value):
                assert re.search(r":\$\{\w+:\?[^}]+\}@", str(value)), f"{name}.{key} embeds a literal password"
        for arg in svc.get("command") or []:
            if "://" in arg and "@" in arg:
                assert re.search(r":\$\{\w+:\?[^}]+\}@", arg), f"{name} command embeds a literal password"
    for missing in required:
        with pytest.raises(compose.MissingVariable, match=missing):
            compose.interpolate(raw, {k: v for k, v in secrets().items() if k != missing})
        with pytest.raises(compose.MissingVariable, match=missing):
            compose.interpolate(raw, {**secrets(), missing: ""})


def test_env_example_lists_every_secret_empty_and_env_is_ignored():
    example = dict(line.split("=", 1) for line in (REPO / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    for name in compose.required_variables():
        assert example.get(name) == "", f"{name} must be listed in .env.example, with no value"
    assert ".env" in (REPO / ".gitignore").read_text().splitlines()
    assert ".env" in (REPO / ".dockerignore").read_text().splitlines()


def test_servers_require_credentials(resolved):
    services = resolved["services"]
    server_env = services["prefect-server"]["environment"]
    worker_env = services["prefect-worker"]["environment"]
    assert server_env["PREFECT_SERVER_API_AUTH_STRING"] == worker_env["PREFECT_API_AUTH_STRING"] != ""
    command = services["mlflow"]["command"]
    assert command[command.index("--app-name") + 1] == "basic-auth"
    mlflow_env = services["mlflow"]["environment"]
    assert mlflow_env["MLFLOW_AUTH_ADMIN_PASSWORD"] == worker_env["MLFLOW_TRACKING_PASSWORD"] != ""
    assert mlflow_env["MLFLOW_AUTH_ADMIN_USERNAME"] == worker_env["MLFLOW_TRACKING_USERNAME"]
    allowed = set(mlflow_env["MLFLOW_SERVER_ALLOWED_HOSTS"].split(","))
    assert {"mlflow:5000", "localhost:5000", "127.0.0.1:5000"} <= allowed
    ini_path = mlflow_env["MLFLOW_AUTH_CONFIG_PATH"]
    assert ini_path.startswith(compose.image_workdir() + "/")
    ini = configparser.ConfigParser()
    ini.read(REPO / ini_path.removeprefix(compose.image_workdir() + "/"))
    assert "admin_password" not in ini["mlflow"], "no default admin password"
    assert ini["mlflow"]["authorization_function"].endswith("authenticate_request_basic_auth")


def test_healthchecks_and_dependency_conditions(raw):
    services = raw["services"]
    for name, svc in long_running(raw).items():
        assert svc["healthcheck"]["test"][0] == "CMD", name
    for name, svc in services.items():
        for dep, spec in (svc.get("depends_on") or {}).items():
            expected = "service_completed_successfully" if services[dep].get("restart") == "no" else "service_healthy"
            assert spec == {"condition": expected}, (name, dep)
    assert set(services["prefect-worker"]["depends_on"]) == {"prefect-deploy", "mlflow"}
    assert set(services["prefect-server"]["depends_on"]) == set(services["mlflow"]["depends_on"]) == {"postgres"}


def test_native_stack_runs_the_compose_commands_and_environment(resolved, translated):
    services, translation, ports, state = translated
    assert set(services) == set(resolved["services"])
    for name, svc in resolved["services"].items():
        ours = services[name]
        command = [str(arg) for arg in svc.get("command") or []]
        assert len(ours.command) == len(command), name
        for theirs, mine in zip(command, ours.command, strict=True):
            assert mine == theirs or mine in (translation.text(theirs), translation.port(theirs)), (name, theirs, mine)
        env = {key: str(value) for key, value in (svc.get("environment") or {}).items()}
        assert set(ours.env) == set(env), name
        assert all(ours.env[key] == env[key] for key in env if SECRET_NAME.search(key)), name
        assert ours.oneshot == (svc.get("restart") == "no")
        native_text = " ".join([*ours.command, *ours.env.values(), *(ours.healthcheck or []), str(ours.cwd)])
        assert not SERVICE_ADDRESS.search(native_text), (name, native_text)
        assert "0.0.0.0" not in native_text and "/var/lib/" not in native_text, (name, native_text)


def test_native_translation_of_addresses_ports_and_paths(translated):
    services, translation, ports, state = translated
    prefect, mlflow, worker = services["prefect-server"], services["mlflow"], services["prefect-worker"]
    assert prefect.command[-2:] == ["--port", str(ports[4200])]
    assert prefect.env["PREFECT_API_DATABASE_CONNECTION_URL"].endswith(f"@127.0.0.1:{ports[5432]}/prefect")
    assert worker.env["PREFECT_API_URL"] == f"http://127.0.0.1:{ports[4200]}/api"
    assert worker.env["MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{ports[5000]}"
    assert worker.env["PREFECT_WORKER_WEBSERVER_PORT"] == str(ports[8080])
    assert f"localhost:{ports[5000]}" in mlflow.env["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    assert mlflow.cwd == state / "volumes" / "mlflow"
    assert worker.env["TINYSEEK_HOME"] == str(REPO)
    assert worker.env["TINYSEEK_WORKSPACE"] == str(state / "volumes" / "workspace")
    assert Path(mlflow.env["MLFLOW_AUTH_CONFIG_PATH"]).is_file()
    # a password that starts with digits is not mistaken for a port
    assert translation.text("postgresql://mlflow:5000abc@postgres:5432/mlflow") == \
        f"postgresql://mlflow:5000abc@127.0.0.1:{ports[5432]}/mlflow"


def test_native_runner_paths_exist_in_the_compose_file(translated):
    services, translation, ports, state = translated
    assert {native.POSTGRES_DATA, native.WORKSPACE} <= set(translation.paths)
    assert native.MLFLOW_ARTIFACTS in compose.COMPOSE_FILE.read_text()
    assert any(target.startswith(native.INITDB_DIR + "/") for target in translation.paths)
    deployments = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
    assert {deployment["name"] for deployment in deployments} == native.DEPLOYMENTS


def test_interpolation_follows_compose():
    variables = {"SET": "value", "EMPTY": ""}
    assert compose.interpolate("${SET}-${UNSET}-$$HOME", variables) == "value--$HOME"
    assert compose.interpolate("${EMPTY:-fallback} ${EMPTY-kept} ${UNSET-default}", variables) == "fallback  default"
    assert compose.interpolate("${SET:+on}${UNSET:+on}", variables) == "on"
    with pytest.raises(compose.MissingVariable, match="EMPTY: set EMPTY in .env"):
        compose.interpolate("${EMPTY:?set EMPTY in .env}", variables)
    assert compose.interpolate("${EMPTY?unset only}", variables) == ""


def dockerfile_stages() -> list[list[str]]:
    stages: list[list[str]] = []
    for line in compose.DOCKERFILE.read_text().replace("\\\n", " ").splitlines():
        if line.startswith("FROM "):
            stages.append([])
        if stages and line.strip() and not line.startswith("#"):
            stages[-1].append(line)
    return stages


def test_dockerfile_is_multi_stage_pinned_and_runs_as_a_user():
    stages = dockerfile_stages()
    assert len(stages) >= 2
    builder, final = "\n".join(stages[0]), stages[-1]
    assert "-c constraints.txt" in builder and "download.pytorch.org/whl/cpu" in builder
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim", compose.DOCKERFILE.read_text(), re.M)
    assert any(line.startswith("COPY --from=") for line in final)
    users = [line.split()[1] for line in final if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    assert not any(re.search(r"\b(build-essential|gcc|g\+\+|make)\b", line) for line in final if "ARG " not in line)
    assert re.search(r"^ARG RUNTIME_PACKAGES=$", "\n".join(final), re.M), "no runtime packages by default"
    assert compose.image_workdir() == "/app"


def test_the_stack_image_has_a_cpp_compiler_unless_told_otherwise(raw, gpu):
    """The worker's training builds its fused CPU kernels (model/fused.py) with g++; the GPU
    override keeps the compiler (Triton needs one) and only the .env can drop it."""
    args = raw["x-image"]["build"]["args"]
    assert compose.interpolate(args["RUNTIME_PACKAGES"], {}).split() == ["g++"]
    assert compose.interpolate(args["RUNTIME_PACKAGES"], {"TINYSEEK_RUNTIME_PACKAGES": ""}) == ""
    assert "RUNTIME_PACKAGES" not in gpu["build"]["args"]
    assert "RUNTIME_PACKAGES" in (REPO / ".env.example").read_text()


def test_gpu_override_reserves_nvidia_gpus_with_a_cuda_torch(gpu):
    [device] = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"] and device["driver"] == "nvidia"
    index = compose.interpolate(gpu["build"]["args"]["TORCH_INDEX"], {})
    assert "whl/cpu" not in index
