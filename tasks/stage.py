"""The stage contract: fingerprinted, atomic, cached outputs.

A stage writes into `<workspace>/<stage>/<fingerprint>/` and returns a small `Ref`.
The fingerprint hashes the upstream outputs (`Ref.key`: their content hash where the
stage records one), the stage's own config and the stage's code version, so an
unchanged stage is found on disk and skipped. Outputs
are built in a temporary sibling directory, fsynced and renamed into place, so a
crash never leaves a directory that looks complete; a per-fingerprint lock makes
two runs racing on the same output wait for each other instead of colliding. The
manifest records each file's size: an output damaged since (a truncated or deleted file,
an unreadable manifest) is not reused but built again.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field

if TYPE_CHECKING:
    import torch

MANIFEST = "manifest.json"
# the stages' folders in a workspace, in pipeline order
STAGES = ("collect", "clean", "tokenize", "pretrain", "finetune", "evaluate")
REPO_ROOT = Path(__file__).resolve().parents[1]
TOOLS = ("torch", "tokenizers", "tiktoken", "datasets", "pyarrow", "numpy", "rensa", "prefect", "mlflow")


class StageError(RuntimeError):
    """A problem the user can fix (bad input, bad config); its message is shown as is."""


def resolve_device(choice: str, setting: str, fallback: str) -> torch.device:
    """The torch device for a stage's or command's `choice` (auto, cpu or cuda): auto takes a
    GPU when there is one; cuda without one is refused naming `setting` and the `fallback`.
    (torch is imported here, not at the top, for the same reason as in `user_errors`.)"""
    import torch

    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise StageError(f"{setting} cuda: no CUDA device is available here; use {fallback}")
    return torch.device(choice)


def user_errors() -> tuple[type[Exception], ...]:
    """The errors whose message says what to fix: the CLI shows them as one line, and a flow
    run's log without a traceback. Imported when asked for: the data stages (and clean's
    worker processes) import this module and need no torch. `model.checkpoint` (torch) counts
    only once loaded, since none of its errors can be raised before: a config error is then
    shown without loading torch."""
    from model.config import ConfigError

    checkpoint = sys.modules.get("model.checkpoint")
    return (StageError, ConfigError) + ((checkpoint.CheckpointError,) if checkpoint else ())


class Ref(BaseModel):
    """What a stage hands to the next one: where its output is and what it holds."""

    stage: str
    path: str
    fingerprint: str
    counts: dict[str, Any] = Field(default_factory=dict)
    cached: bool = Field(False, description="True when this output was already on disk and reused.")
    content_hash: str | None = Field(
        None, description="Hash of the output's content, when the stage records one (collect does)."
    )

    @property
    def key(self) -> str:
        """What downstream fingerprints hash: the content when known, else the fingerprint, so a
        stage that ran again but produced the same content does not rerun what follows."""
        return self.content_hash or self.fingerprint

    @property
    def dir(self) -> Path:
        return Path(self.path)

    def manifest(self) -> dict[str, Any]:
        return json.loads((self.dir / MANIFEST).read_text())


def workspace(path: str | os.PathLike | None = None, *, writable: bool = True) -> Path:
    """The workspace: the argument, else $TINYSEEK_WORKSPACE, else `data/` in the repo.

    Stages write there, so by default it is created and must be writable; reading models
    from it (`writable=False`) needs neither, so a shared read-only copy serves them."""
    chosen = path or os.environ.get("TINYSEEK_WORKSPACE") or REPO_ROOT / "data"
    root = Path(chosen).expanduser().resolve()
    if root.exists() and not root.is_dir():
        raise StageError(f"workspace {root} is a file, not a directory; pass --workspace DIR")
    if not writable:
        return root
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write-test-{uuid.uuid4().hex}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise StageError(f"workspace {root} is not writable ({exc.strerror}); pass --workspace DIR") from None
    return root


def user_cache() -> Path:
    """tinyseek's directory in the user's cache (`$XDG_CACHE_HOME`, else `~/.cache`): what
    does not belong to one workspace, or cannot be written to it."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tinyseek"


def cpu_cores() -> int:
    """CPU cores this process may run on (its affinity, where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def json_digest(obj: Any) -> str:
    """A short hash of a JSON-able value, the same for equal values however their dicts are ordered."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:16]


def code_version(*modules: Any) -> str:
    """Hash of the source files of the given modules: editing a stage's code reruns it."""
    digest = hashlib.sha256()
    for module in modules:
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()[:12]


def fingerprint(stage: str, config: Any, upstream: list[str] | tuple[str, ...] = (), code: str = "") -> str:
    return json_digest({"stage": stage, "config": config, "upstream": list(upstream), "code": code})


def tool_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in TOOLS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# descriptors of the locks `file_lock` holds now in this process
_HELD_LOCKS: set[int] = set()


@contextmanager
def file_lock(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `lock_path` (created if missing) for the block."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        _HELD_LOCKS.add(handle.fileno())
        try:
            yield
        finally:
            _HELD_LOCKS.discard(handle.fileno())
            fcntl.flock(handle, fcntl.LOCK_UN)


def held_locks() -> tuple[int, ...]:
    """The descriptors of the locks `file_lock` holds in this process now. A child process
    given them (`subprocess.Popen(pass_fds=...)`) keeps them locked while it lives should
    this process be killed, when the lock would otherwise go free at once: flock belongs
    to the open file, which the child then shares. The block's end unlocks it for both."""
    return tuple(sorted(_HELD_LOCKS))


def file_sizes(out: Path) -> dict[str, int]:
    """Every file of an output but its manifest, by path relative to it, with its size."""
    return {path.relative_to(out).as_posix(): path.stat().st_size
            for path in sorted(out.rglob("*")) if path.is_file() and path != out / MANIFEST}


def damage(out: Path) -> str | None:
    """Why a finished output cannot be trusted, or None: its manifest cannot be read or is not
    this output's, or a file it lists is missing or of another size. (Content is not hashed: a
    size check costs a stat a file, where hashing would read every shard and model at each run.)"""
    return _inspect(out)[1]


def _inspect(out: Path) -> tuple[dict[str, Any] | None, str | None]:
    """An output's manifest, read once, and why the output cannot be trusted (None if it can)."""
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        return None, f"its {MANIFEST} cannot be read ({exc})"
    if not isinstance(manifest, dict) or manifest.get("fingerprint") != out.name:
        return None, f"its {MANIFEST} is not the manifest of this output"
    sizes = manifest.get("file_sizes", {})  # none in an output written before sizes were recorded
    if not isinstance(sizes, dict):
        return None, f"its {MANIFEST} lists no file sizes"
    for name, size in sizes.items():
        path = out / name
        if not path.is_file():
            return None, f"{name} is missing"
        if path.stat().st_size != size:
            return None, f"{name} has {path.stat().st_size} bytes, not the {size} it was written with"
    return manifest, None


def find(stage: str, fp: str, root: Path) -> Ref | None:
    """The finished, undamaged output of `stage` with fingerprint `fp`, or None."""
    out = root / stage / fp
    if not (out / MANIFEST).is_file():
        return None
    manifest, damaged = _inspect(out)
    if damaged:
        return None
    return Ref(stage=stage, path=str(out), fingerprint=fp, counts=manifest.get("counts", {}),
               content_hash=manifest.get("content_hash"))


def run_stage(
    stage: str,
    fp: str,
    build: Callable[[Path], dict[str, Any]],
    *,
    root: Path,
    inputs: dict[str, Any] | None = None,
    config: Any = None,
    committed: Callable[[], None] | None = None,
) -> Ref:
    """Return the stage's output for `fp`, building it with `build(tmp_dir)` if needed.

    `build` writes its files into the directory it is given and returns extra
    manifest fields; `counts` among them becomes `Ref.counts`. `committed` runs once a
    built output is in place, and whenever it is found in place: what the build drew on may
    go then, and not before.
    """
    def reused(done: Ref) -> Ref:
        if committed:  # again: a run killed between its output's rename and `committed` left that undone
            committed()
        return done.model_copy(update={"cached": True})

    done = find(stage, fp, root)
    if done:
        return reused(done)
    with file_lock(root / stage / f".{fp}.lock"):
        done = find(stage, fp, root)
        if done:
            return reused(done)
        for leftover in (root / stage).glob(f".{fp}.tmp-*"):  # from a killed run: we hold the lock now
            shutil.rmtree(leftover, ignore_errors=True)
        damaged = damage(root / stage / fp) if (root / stage / fp).exists() else None
        if damaged:  # a cache entry gone bad: built again, and the new manifest says why
            shutil.rmtree(root / stage / fp)
        tmp = root / stage / f".{fp}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            started = time.time()
            extra = build(tmp) or {}
            manifest = {
                "stage": stage,
                "fingerprint": fp,
                "inputs": inputs or {},
                "config": config,
                "started": started,
                "seconds": round(time.time() - started, 3),
                "tools": tool_versions(),
                **({"rebuilt_because": f"the earlier output was damaged: {damaged}"} if damaged else {}),
                **extra,
                "file_sizes": file_sizes(tmp),
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
            _fsync_tree(tmp)
            os.rename(tmp, root / stage / fp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if committed:
            committed()
    return find(stage, fp, root)  # type: ignore[return-value]
