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

import contextlib
import fcntl
import os
import re
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tasks.stage import STAGES

# `.<fingerprint>.work` and `.<fingerprint>.tmp-<pid>-<id>` beside a stage's outputs
_LEFTOVER = re.compile(r"\.(?P<fp>[0-9a-f]{16})\.(?P<kind>work|tmp-[0-9]+-[0-9a-f]+)")
KINDS = {"work": "checkpoints of an unfinished training run", "tmp": "a half-built output"}


@dataclass
class Leftover:
    path: Path
    what: str
    bytes: int


@dataclass
class Failure:
    path: Path
    reason: str


def _files(folder: Path) -> Iterator[os.stat_result]:
    """The stat of every file under `folder` (links not followed). A folder that cannot be
    listed is an OSError, not a part silently left out; what a run removes meanwhile (its
    work folder, once its output is in place) is simply not there."""
    def unlisted(error: OSError) -> None:
        if not isinstance(error, FileNotFoundError):
            raise error

    for top, _, names in os.walk(folder, onerror=unlisted):
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                info = os.lstat(os.path.join(top, name))
                if stat.S_ISREG(info.st_mode):
                    yield info


def _freed_bytes(files: dict[Path, list[os.stat_result]]) -> dict[Path, int]:
    """Bytes that removing all the folders (`_files` of each) frees, per folder. A file
    hard-linked from elsewhere (a training run's checkpoints are linked into its finished
    output) frees nothing; one linked from several of the folders counts once, in the first."""
    inodes: dict[tuple[int, int], list] = {}  # (device, inode) -> [size, links, links seen, first folder]
    for folder, infos in files.items():
        for info in infos:
            entry = inodes.setdefault((info.st_dev, info.st_ino), [info.st_size, info.st_nlink, 0, folder])
            entry[2] += 1
    freed = dict.fromkeys(files, 0)
    for size, links, seen, folder in inodes.values():
        if seen == links:
            freed[folder] += size
    return freed


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


def _candidates(root: Path) -> tuple[dict[Path, list[tuple[Path, str]]], list[Failure]]:
    """Every leftover-shaped folder in the stage folders of `root`, with its description, by
    the lock file of its fingerprint; and the stage folders that cannot be listed."""
    groups: dict[Path, list[tuple[Path, str]]] = {}
    failed = []
    for stage in STAGES:
        folder = root / stage
        try:
            if not folder.is_dir():
                continue
            for entry in sorted(folder.iterdir()):
                match = _LEFTOVER.fullmatch(entry.name)
                if match and entry.is_dir() and not entry.is_symlink():
                    kind = "work" if match["kind"] == "work" else "tmp"
                    groups.setdefault(folder / f".{match['fp']}.lock", []).append(
                        (entry, _what(entry, match["fp"], kind)))
        except OSError as exc:
            failed.append(Failure(folder, f"cannot list it ({exc.strerror or exc})"))
    return groups, failed


def _what(path: Path, fp: str, kind: str) -> str:
    """A leftover's description: the work folder of a fingerprint whose output is in place
    belongs to a run killed between the two (its checkpoints are linked into the output)."""
    if kind == "work" and (path.parent / fp).is_dir():
        return "checkpoints of a finished run"
    return KINDS[kind]


def prune(root: Path, dry_run: bool = False) -> tuple[list[Leftover], list[Path], list[Failure]]:
    """Remove (or with `dry_run` only list) the leftovers of runs no process is running now,
    one fingerprint at a time, holding its lock. Returns what was (or would be) removed, the
    leftovers of runs in progress (kept), and what could not be listed, read or removed: one
    failure does not stop the others. What a run removes meanwhile is none of these."""
    groups, failed = _candidates(root)
    removed: list[Leftover] = []
    running: list[Path] = []
    for lock, leftovers in groups.items():
        try:
            with _idle(lock) as idle:
                if not idle:
                    running += [path for path, _ in leftovers]
                    continue
                files = {}
                for path, _ in leftovers:
                    try:
                        files[path] = list(_files(path))
                    except OSError as exc:
                        failed.append(Failure(path, f"cannot read it ({exc.strerror or exc}{_at(exc, path)})"))
                what = dict(leftovers)
                for path, freed in _freed_bytes(files).items():
                    try:
                        if not dry_run:
                            shutil.rmtree(path)
                    except FileNotFoundError:
                        continue
                    except OSError as exc:
                        failed.append(Failure(path, f"cannot remove it ({exc.strerror or exc}{_at(exc, path)})"))
                        continue
                    removed.append(Leftover(path, what[path], freed))
        except OSError as exc:  # the lock file cannot be opened
            failed += [Failure(path, f"cannot lock it ({exc.strerror or exc})") for path, _ in leftovers]
    return removed, running, failed


def _at(exc: OSError, path: Path) -> str:
    """Where under `path` the error happened, if not at `path` itself."""
    return f": {exc.filename}" if exc.filename and Path(exc.filename) != path else ""
