"""Local input files: which a folder holds, and what identifies their current content.

Collect reads a corpus from such files and fine-tuning reads the user's instruction data;
both fingerprint the same file states, so an edited, added or removed file builds again.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

# how a UTF-16 file starts (little- or big-endian), as Windows editors save "Unicode" text
UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


def walk(top: Path) -> list[Path]:
    """Files under `top` in sorted order (`top` itself when it is not a folder), hidden files
    and folders skipped. Linked folders are followed, each real folder once, so a link back up
    the tree cannot loop."""
    if not top.is_dir():
        return [top]
    found, seen = [], {top.resolve()}
    for folder, dirnames, filenames in os.walk(top, followlinks=True):
        visible = sorted(name for name in dirnames if not name.startswith("."))
        dirnames[:] = [name for name in visible if _first_visit(Path(folder) / name, seen)]
        found += [Path(folder) / name for name in sorted(filenames) if not name.startswith(".")]
    return found


def _first_visit(folder: Path, seen: set[Path]) -> bool:
    real = folder.resolve()
    if real in seen:
        return False
    seen.add(real)
    return True


def file_states(paths: list[Path]) -> list[list[Any]]:
    """Path, size and modification time of each file; one that cannot be read (a broken
    link) has none, and reading it quarantines it."""
    states = []
    for path in paths:
        try:
            stat = path.stat()
        except OSError:
            states.append([str(path), None, None])
        else:
            states.append([str(path), stat.st_size, stat.st_mtime_ns])
    return states


def starts_json_array(head: bytes) -> bool:
    """Whether a file's first bytes open a JSON array (a byte-order mark and white space
    before it allowed), rather than JSON Lines."""
    return head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"[")
