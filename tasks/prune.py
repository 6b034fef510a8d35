"""What interrupted runs leave in a workspace, and removing it.

A training stage keeps the checkpoints of an unfinished run in `<stage>/.<fingerprint>.work/`
so that running the same config again resumes it; a killed build leaves its half-written
output in `<stage>/.<fingerprint>.tmp-*`. Both are cleared when the same fingerprint runs
again, but a run whose config then changed is never resumed, and its checkpoints (two
model-and-optimizer copies: ~0.25 GB for the demo, ~14 GB for gpu-small) stay. Finished
outputs are the cache and are kept; so are the fingerprints' empty lock files, which other
processes may be waiting on.
"""

from __future__ import annotations

import fcntl
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

# `.<fingerprint>.work` and `.<fingerprint>.tmp-<pid>-<id>` beside a stage's outputs
_LEFTOVER = re.compile(r"^\.(?P<fp>[0-9a-f]+)\.(?P<kind>work|tmp-.+)$")
KINDS = {"work": "checkpoints of an unfinished training run", "tmp": "a half-built output"}


@dataclass
class Leftover:
    path: Path
    what: str
    bytes: int


def _bytes(folder: Path) -> int:
    return sum(entry.stat().st_size for entry in folder.rglob("*") if entry.is_file() and not entry.is_symlink())


@contextmanager
def _idle(lock_path: Path) -> Iterator[bool]:
    """Hold the fingerprint's lock for the block when no run holds it (True), else yield False:
    a running stage holds it for the whole build, its training included."""
    with open(lock_path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _candidates(root: Path) -> Iterator[tuple[Path, str, str]]:
    """(path, fingerprint, kind) of every leftover-shaped folder in the stage folders of `root`."""
    if not root.is_dir():
        return
    for stage in sorted(entry for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith(".")):
        for entry in sorted(stage.iterdir()):
            match = _LEFTOVER.match(entry.name)
            if match and entry.is_dir() and not entry.is_symlink():
                yield entry, match["fp"], "work" if match["kind"] == "work" else "tmp"


def prune(root: Path, dry_run: bool = False) -> tuple[list[Leftover], list[Path]]:
    """Remove (or with `dry_run` only list) the leftovers of runs no process is running now.
    Returns what was (or would be) removed, and the leftovers of runs in progress, kept."""
    removed, running = [], []
    for path, fp, kind in _candidates(root):
        with _idle(path.parent / f".{fp}.lock") as idle:
            if not idle:
                running.append(path)
                continue
            removed.append(Leftover(path, KINDS[kind], _bytes(path)))
            if not dry_run:
                shutil.rmtree(path)
    return removed, running
