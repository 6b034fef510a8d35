"""What interrupted runs leave in a workspace, and removing it.

A training stage keeps the checkpoints of an unfinished run in `<stage>/.<fingerprint>.work/`
so that running the same config again resumes it; a killed build leaves its half-written
output in `<stage>/.<fingerprint>.tmp-*`. Both are cleared when the same fingerprint runs
again, but a run whose config then changed is never resumed, and its checkpoints (two
model-and-optimizer copies: ~0.25 GB for the demo, ~14 GB for gpu-small) stay. Only the
stage folders are looked at: finished outputs are the cache and are kept, and so are the
fingerprints' empty lock files, which other processes may be waiting on.
"""

from __future__ import annotations

import fcntl
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tasks.stage import STAGES, StageError

# `.<fingerprint>.work` and `.<fingerprint>.tmp-<pid>-<id>` beside a stage's outputs
_LEFTOVER = re.compile(r"\.(?P<fp>[0-9a-f]{16})\.(?P<kind>work|tmp-[0-9]+-[0-9a-f]+)")
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
    """Hold the fingerprint's lock for the block when no run holds it (True), else yield False.
    A running stage holds it for its whole build, training included, and takes it before it
    writes anything: without a lock file no run is using the fingerprint's folders."""
    if not lock_path.exists():
        yield True
        return
    with open(lock_path) as handle:
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
    for stage in STAGES:
        folder = root / stage
        if not folder.is_dir():
            continue
        for entry in sorted(folder.iterdir()):
            match = _LEFTOVER.fullmatch(entry.name)
            if match and entry.is_dir() and not entry.is_symlink():
                yield entry, match["fp"], "work" if match["kind"] == "work" else "tmp"


def prune(root: Path, dry_run: bool = False) -> tuple[list[Leftover], list[Path]]:
    """Remove (or with `dry_run` only list) the leftovers of runs no process is running now.
    Returns what was (or would be) removed, and the leftovers of runs in progress, kept."""
    removed, running = [], []
    for path, fp, kind in _candidates(root):
        try:
            with _idle(path.parent / f".{fp}.lock") as idle:
                if not idle:
                    running.append(path)
                elif path.exists():  # a run that just finished has removed its work folder
                    removed.append(Leftover(path, KINDS[kind], _bytes(path)))
                    if not dry_run:
                        shutil.rmtree(path)
        except OSError as exc:
            raise StageError(f"cannot remove {path}: {exc.strerror or exc}") from None
    return removed, running
