"""Training checkpoints that survive crashes and never execute what they load.

A checkpoint is a directory `step-000123/` holding

- `model.safetensors`: the weights (tied tensors stored once, their aliases in the metadata);
- `optimizer.pt`: the optimizer state dict (tensors and plain Python values only);
- `rng.pt`: the random number generator states (python, numpy, torch CPU and CUDA);
- `meta.json`: the step, the caller's JSON `extra` (loader position, config, ...) and
  a sha256 checksum of every other file.

It is written into a hidden temporary sibling, fsynced and renamed into place, so a
crash mid-write leaves only a hidden directory that loading ignores. Loading walks the
checkpoints newest first and falls back past any that is truncated or corrupted,
reporting why. Nothing is unpickled: weights come from safetensors and the `.pt` files
are read with `torch.load(weights_only=True)`, which refuses arbitrary objects.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from model.config import ModelConfig
from model.transformer import Transformer

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng.pt"
META_FILE = "meta.json"
FORMAT_VERSION = 1
STEP_DIR = re.compile(r"^step-(\d+)$")
TEMP_DIR = re.compile(r"^\.step-\d+\.(?:tmp|old)-(\d+)-[0-9a-f]+$")
ALIASES_KEY = "tinyseek.aliases"
MODEL_CONFIG_FILE = "model_config.json"

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint directory that is incomplete, corrupted or not loadable safely."""


@dataclass
class Checkpoint:
    """Everything a resumed run needs, as loaded from `path`."""

    step: int
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any]
    extra: dict[str, Any]
    rng: dict[str, Any]
    path: Path


def capture_rng() -> dict[str, Any]:
    """The states of python `random`, numpy's global generator, torch CPU and the current CUDA device.

    Only tensors and plain Python values, so `torch.load(weights_only=True)` can read it back.
    """
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {**np_state, "state": {**np_state["state"], "key": np_state["state"]["key"].tolist()}},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Put back the generator states captured by `capture_rng`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    key = np.asarray(np_state["state"]["key"], dtype=np.uint32)
    np.random.set_state({**np_state, "state": {**np_state["state"], "key": key}})
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _storable(model_state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """CPU contiguous tensors safetensors accepts, plus {alias: stored name} for tied tensors.

    safetensors refuses tensors that share memory: an exact alias (a tied weight) is
    stored once and named in the aliases; any other overlap is copied.
    """
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen_views: dict[tuple, str] = {}
    seen_storages: set[tuple] = set()
    for name, tensor in model_state.items():
        storage = (tensor.device, tensor.untyped_storage().data_ptr())
        view = (*storage, tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
        if view in seen_views:
            aliases[name] = seen_views[view]
            continue
        stored = tensor.detach().to("cpu").contiguous()
        if storage in seen_storages and stored.untyped_storage().data_ptr() == storage[1]:
            stored = stored.clone()
        seen_views[view] = name
        seen_storages.add(storage)
        tensors[name] = stored
    return tensors, aliases


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    """Finished checkpoint directories under `root`, newest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return sorted(found, reverse=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_temps(root: Path) -> None:
    """Delete hidden directories left by writers that are no longer running."""
    for path in root.iterdir():
        match = TEMP_DIR.match(path.name)
        if match and int(match.group(1)) != os.getpid() and not _pid_alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """`safetensors.torch.save_file`, with the permissions any other new file gets. safetensors
    0.8 writes through a temporary file that is always 0600, so weights beside a 0644 config
    could not be read by other users of a shared workspace or export (safetensors issue #782).
    A failed write (a full disk) is an OSError with its errno, as for any other file, where
    safetensors raises its own error."""
    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as exc:
        code = re.search(r"os error (\d+)", str(exc))
        raise (OSError(int(code[1]), os.strerror(int(code[1])), str(path)) if code else OSError(str(exc))) from exc
    umask = os.umask(0o077)
    os.umask(umask)
    path.chmod(0o666 & ~umask)


def _write_files(
    tmp: Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    extra: dict[str, Any],
    rng: dict[str, Any],
) -> None:
    tensors, aliases = _storable(model_state)
    save_tensors(tensors, tmp / MODEL_FILE, {ALIASES_KEY: json.dumps(aliases)})
    torch.save(optimizer_state, tmp / OPTIMIZER_FILE)
    torch.save(rng, tmp / RNG_FILE)
    files = {name: _sha256(tmp / name) for name in (MODEL_FILE, OPTIMIZER_FILE, RNG_FILE)}
    meta = {"format": FORMAT_VERSION, "step": step, "extra": extra, "sha256": files}
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
    for name in (*files, META_FILE):
        _fsync(tmp / name)
    _fsync(tmp)


def _move_into_place(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final`, replacing a checkpoint of the same step if there is one."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(
    dir: Path,
    step: int,
    *,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    extra: dict[str, Any],
    keep_last: int = 3,
) -> Path:
    """Write `dir/step-{step:06d}/` atomically, then keep only the newest `keep_last` checkpoints.

    Checkpoints of later steps than `step` are deleted (see `_prune`).

    `extra` must be JSON-serialisable. The RNG states saved are this process's (`capture_rng()`).
    Returns the checkpoint directory.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be at least 1, got {keep_last}")
    json.dumps(extra)  # fail on a non-JSON value before anything is written
    root = Path(dir)
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(root)
    final = root / f"step-{step:06d}"
    tmp = root / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _write_files(tmp, step, model_state, optimizer_state, extra, capture_rng())
        _move_into_place(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _prune(root, step, keep_last)
    return final


def _prune(root: Path, step: int, keep_last: int) -> None:
    """Keep the newest `keep_last` checkpoints up to `step`; drop any later ones.

    A checkpoint later than the one just written belongs to a timeline this run has
    left (it resumed from an earlier step because the later ones failed to load, or it
    started afresh), so keeping it would make the next resume jump back onto it.
    """
    later = [path for saved, path in _step_dirs(root) if saved > step]
    current = [path for saved, path in _step_dirs(root) if saved <= step]
    for path in later + current[keep_last:]:
        shutil.rmtree(path, ignore_errors=True)


def _load_model_state(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as handle:
        aliases = json.loads((handle.metadata() or {}).get(ALIASES_KEY, "{}"))
    state = load_file(str(path))
    for alias, stored in aliases.items():
        state[alias] = state[stored]
    return state


def load_checkpoint(path: Path) -> Checkpoint:
    """Load and verify one checkpoint directory; raise `CheckpointError` saying what is wrong."""
    path = Path(path)
    try:
        meta = json.loads((path / META_FILE).read_text())
        if meta.get("format") != FORMAT_VERSION:
            raise CheckpointError(f"unknown checkpoint format {meta.get('format')!r}")
        expected = meta["sha256"]
        for name in (MODEL_FILE, OPTIMIZER_FILE, RNG_FILE):
            if _sha256(path / name) != expected[name]:
                raise CheckpointError(f"{name} does not match its checksum (truncated or corrupted)")
        return Checkpoint(
            step=int(meta["step"]),
            model_state=_load_model_state(path / MODEL_FILE),
            optimizer_state=torch.load(path / OPTIMIZER_FILE, map_location="cpu", weights_only=True),
            extra=meta["extra"],
            rng=torch.load(path / RNG_FILE, map_location="cpu", weights_only=True),
            path=path,
        )
    except CheckpointError:
        raise
    except Exception as exc:  # any unreadable file, bad JSON or refused pickle makes it unusable
        raise CheckpointError(_first_line(exc)) from exc


# the most of an error message `one_line` keeps
ONE_LINE_CHARS = 300


def one_line(text: str) -> str:
    """A long error message in one line: its first, and where that only announces a list
    ("Error(s) in loading state_dict for Transformer:"), the list's first item too
    ("size mismatch for …"; past MLflow's "##### File … #####" banners, "[Errno 28] No
    space left on device"); at most ONE_LINE_CHARS characters."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    items = [line for line in lines[1:] if not line.startswith("#####")]
    line = f"{lines[0]} {items[0]}" if lines and lines[0].endswith(":") and items else next(iter(lines), "")
    return line if len(line) <= ONE_LINE_CHARS else line[: ONE_LINE_CHARS - 1] + "…"


def _first_line(exc: Exception) -> str:
    """What went wrong reading a file, in one line (safetensors and torch errors run long)."""
    return f"{type(exc).__name__}: {one_line(str(exc))}"


def load_latest(dir: Path, *, on_warning: Callable[[str], None] | None = None) -> Checkpoint | None:
    """The newest loadable checkpoint under `dir`, or None when there is none.

    Each checkpoint skipped on the way (truncated, corrupted, unsafe) is reported as one
    line through `on_warning` (default: this module's logger).
    """
    warn = on_warning or log.warning
    for _, path in _step_dirs(Path(dir)):
        try:
            return load_checkpoint(path)
        except CheckpointError as exc:
            warn(f"skipping checkpoint {path}: {exc}")
    return None


def save_model(model: torch.nn.Module, directory: str | Path) -> Path:
    """Write a finished model (weights incl. MTP and router biases, plus its config) for use
    outside training: `model.safetensors` and `model_config.json`."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors, aliases = _storable(model.state_dict())
    save_tensors(tensors, out / MODEL_FILE, {ALIASES_KEY: json.dumps(aliases)})
    (out / MODEL_CONFIG_FILE).write_text(json.dumps(model.config.to_dict(), indent=2))
    return out


def load_model(directory: str | Path, device: str | torch.device = "cpu") -> Transformer:
    """Load a directory written by `save_model` into a `Transformer` (eval mode); a missing
    or damaged file raises `CheckpointError` naming the directory."""
    src = Path(directory)
    try:
        config = ModelConfig.from_dict(json.loads((src / MODEL_CONFIG_FILE).read_text()))
        model = Transformer(config)
        model.load_state_dict(_load_model_state(src / MODEL_FILE))
    except Exception as exc:  # unreadable or truncated files, bad JSON, weights of another shape
        raise CheckpointError(f"cannot load the model in {src} ({_first_line(exc)})") from exc
    return model.to(device).eval()
