"""docker-compose.yml, translated into the commands of plain local processes.

CI and many developer machines have no Docker engine, so `stack.native` runs the team stack
as processes. It takes every command, environment variable, working directory, dependency
and healthcheck from docker-compose.yml through this module, so the compose file and the
native run cannot drift apart. What differs between containers and one host is translated,
and nothing else:

- `${VAR}`, `${VAR:-default}`, `${VAR:?message}` (and `-`, `?`, `+` without the colon) are
  interpolated as compose does, from the variables given, never from the caller's environment;
- each service listens on the port it `expose`s; natively every such port becomes a free
  local one, and `<service>:<port>`, `localhost:<port>`, `127.0.0.1:<port>`, `--port <port>`
  and `*_PORT=<port>` follow it;
- `0.0.0.0` becomes `127.0.0.1`: nothing native listens beyond this host;
- container paths become host paths: the image's WORKDIR (the Dockerfile's) is the
  repository, a named volume is a folder under the state directory, a bind mount its source.

A service with `restart: "no"` is a one-shot job (its dependants wait for it to exit with 0);
every other service runs until the stack stops.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
DOCKERFILE = REPO_ROOT / "Dockerfile"
LOOPBACK = "127.0.0.1"

_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<name>[A-Za-z_]\w*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}|(?P<bare>[A-Za-z_]\w*))"
)
_ANY_ADDRESS = re.compile(r"(?<![\d.])0\.0\.0\.0(?![\d.])")


class MissingVariable(ValueError):
    """A `${VAR:?message}` whose variable is unset or empty: compose refuses to start."""


def load(path: Path = COMPOSE_FILE) -> dict[str, Any]:
    """The compose file as data, YAML anchors and merge keys resolved."""
    return yaml.safe_load(Path(path).read_text())


def required_variables(path: Path = COMPOSE_FILE) -> list[str]:
    """Names of the variables the file demands with `${VAR:?...}`: the stack's secrets."""
    found = (m["name"] for m in _VARIABLE.finditer(Path(path).read_text()) if m["op"] in (":?", "?"))
    return sorted(set(found))


def image_workdir(path: Path = DOCKERFILE) -> str:
    """The WORKDIR of the Dockerfile's final stage: where the image keeps the project."""
    workdir = None
    for line in Path(path).read_text().splitlines():
        words = line.split()
        if words[:1] == ["FROM"]:
            workdir = None
        elif words[:1] == ["WORKDIR"] and len(words) == 2:
            workdir = words[1]
    if workdir is None:
        raise ValueError(f"{path}: the final stage sets no WORKDIR")
    return workdir


def interpolate(value: Any, variables: Mapping[str, str]) -> Any:
    """Compose's variable substitution over strings, lists and mappings."""
    if isinstance(value, str):
        return _VARIABLE.sub(lambda match: _substitute(match, variables), value)
    if isinstance(value, list):
        return [interpolate(item, variables) for item in value]
    if isinstance(value, dict):
        return {key: interpolate(item, variables) for key, item in value.items()}
    return value


def _substitute(match: re.Match, variables: Mapping[str, str]) -> str:
    if match["escaped"]:
        return "$"
    name = match["name"] or match["bare"]
    op, arg = match["op"] or "", match["arg"] or ""
    value = variables.get(name)
    present = value is not None and (value != "" or not op.startswith(":"))
    if op.endswith("-"):
        return value if present else interpolate(arg, variables)
    if op.endswith("?"):
        if not present:
            raise MissingVariable(f"{name}: {arg or 'required'}")
        return value
    if op.endswith("+"):
        return interpolate(arg, variables) if present else ""
    return value or ""


@dataclass(frozen=True)
class NativeService:
    """One compose service as a local process."""

    name: str
    command: list[str]
    env: dict[str, str]
    cwd: Path
    healthcheck: list[str] | None
    depends_on: dict[str, str]
    oneshot: bool


class Translation:
    """Rewrites container addresses, ports and paths into their native counterparts."""

    def __init__(self, services: list[str], ports: Mapping[int, int], paths: Mapping[str, Path]):
        self.ports = dict(ports)
        self.paths = dict(paths)
        self.services = set(services)
        hosts = sorted(self.services | {"localhost", LOOPBACK, "0.0.0.0"}, key=len, reverse=True)
        self._address = re.compile(rf"(?<![\w.-])({'|'.join(map(re.escape, hosts))}):(\d+)(?![\w@])")
        targets = sorted(self.paths, key=len, reverse=True)
        self._path = (re.compile(rf"(?<![\w.-])({'|'.join(map(re.escape, targets))})(?=/|$|[^\w.-])")
                      if targets else None)

    def port(self, value: str) -> str:
        return str(self.ports[int(value)]) if value.isdigit() and int(value) in self.ports else value

    def text(self, value: str) -> str:
        value = self._address.sub(self._rewrite_address, value)
        value = _ANY_ADDRESS.sub(LOOPBACK, value)
        if self._path:
            value = self._path.sub(lambda match: str(self.paths[match[1]]), value)
        return value

    def _rewrite_address(self, match: re.Match) -> str:
        host, port = match[1], int(match[2])
        if port not in self.ports:
            if host in self.services:
                raise ValueError(f"{match[0]}: service {host} does not expose port {port}")
            return match[0]
        return f"{LOOPBACK if host in self.services or host == '0.0.0.0' else host}:{self.ports[port]}"

    def argv(self, args: list[str]) -> list[str]:
        out = []
        for i, arg in enumerate(args):
            if i and args[i - 1] in ("--port", "-p"):
                out.append(self.port(arg))
            elif arg.startswith("--port="):
                out.append("--port=" + self.port(arg.removeprefix("--port=")))
            else:
                out.append(self.text(arg))
        return out

    def env(self, env: Mapping[str, str]) -> dict[str, str]:
        return {key: self.port(value) if key.endswith("_PORT") else self.text(value) for key, value in env.items()}


def exposed_ports(compose: Mapping[str, Any]) -> dict[str, int]:
    """Each service's listening port (its single `expose` entry), by service."""
    ports = {}
    for name, service in compose["services"].items():
        exposed = service.get("expose") or []
        if len(exposed) > 1:
            raise ValueError(f"service {name} exposes {len(exposed)} ports; the native stack maps one per service")
        if exposed:
            ports[name] = int(exposed[0])
    if len(set(ports.values())) != len(ports):
        raise ValueError(f"services share a container port ({ports}); natively each needs its own")
    return ports


def volume_paths(compose: Mapping[str, Any], workdir: str, state_dir: Path, repo: Path = REPO_ROOT) -> dict[str, Path]:
    """Container path -> host path: the image's WORKDIR, every named volume and bind mount."""
    paths = {workdir: repo}
    for service in compose["services"].values():
        for volume in service.get("volumes") or []:
            source, target = volume.split(":")[:2]
            host = (repo / source).resolve() if source.startswith((".", "/")) else state_dir / "volumes" / source
            if paths.setdefault(target, host) != host:
                raise ValueError(f"{target} is mounted from two places ({paths[target]} and {host})")
    return paths


def _environment(service: Mapping[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def _healthcheck(service: Mapping[str, Any]) -> list[str] | None:
    test = (service.get("healthcheck") or {}).get("test")
    if not test:
        return None
    if test[0] == "CMD":
        return list(test[1:])
    if test[0] == "CMD-SHELL":
        return ["sh", "-c", test[1]]
    raise ValueError(f"healthcheck test {test!r}: use the CMD or CMD-SHELL form")


def _depends_on(service: Mapping[str, Any]) -> dict[str, str]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {dep: "service_started" for dep in deps}
    return {dep: spec.get("condition", "service_started") for dep, spec in deps.items()}


def native_services(
    variables: Mapping[str, str],
    ports: Mapping[int, int],
    state_dir: Path,
    compose_file: Path = COMPOSE_FILE,
    dockerfile: Path = DOCKERFILE,
) -> tuple[dict[str, NativeService], Translation]:
    """Every service of the compose file as a local process, and the translation used.

    `ports` maps each exposed container port to its native port (see `exposed_ports`).
    """
    compose = interpolate(load(compose_file), variables)
    workdir = image_workdir(dockerfile)
    translation = Translation(list(compose["services"]), ports, volume_paths(compose, workdir, state_dir))
    services = {}
    for name, service in compose["services"].items():
        command = service.get("command") or []
        services[name] = NativeService(
            name=name,
            command=translation.argv([str(arg) for arg in command]),
            env=translation.env(_environment(service)),
            cwd=Path(translation.text(service.get("working_dir", workdir))),
            healthcheck=translation.argv(check) if (check := _healthcheck(service)) else None,
            depends_on=_depends_on(service),
            oneshot=str(service.get("restart", "")) == "no",
        )
    return services, translation
