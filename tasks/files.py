"""Local input files: which a folder holds, and what identifies their current content.

Collect reads a corpus from such files and fine-tuning reads the user's instruction data;
both fingerprint the files' states, so an edited, added or removed file builds again, and
both read UTF-16 files through `Utf16AsUtf8`. A corpus, which may run to gigabytes, is known
by each file's size and modification time (`file_states`); instruction data, small and
costly to train on again, by its bytes (`file_digests`): a copy or a `touch` leaves it the same.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import os
from pathlib import Path
from typing import Any

from tasks.stage import StageError

# how a UTF-16 file starts (little- or big-endian), as Windows editors save "Unicode" text
UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


def walk(top: Path) -> list[Path]:
    """Files under `top` in sorted order (`top` itself when it is not a folder), hidden files
    and folders skipped. Linked folders are followed, each real folder once, so a link back up
    the tree cannot loop."""
    if not top.is_dir():
        return [top]
    found, seen = [], {top.resolve()}
    for folder, dirnames, filenames in os.walk(top, followlinks=True, onerror=_unlisted):
        visible = sorted(name for name in dirnames if not name.startswith("."))
        dirnames[:] = [name for name in visible if _first_visit(Path(folder) / name, seen)]
        found += [Path(folder) / name for name in sorted(filenames) if not name.startswith(".")]
    return found


def _unlisted(error: OSError) -> None:
    """A folder that cannot be listed stops the walk: skipped, its files would be missing
    from the corpus without a word."""
    raise StageError(f"{error.filename}: cannot list this folder ({error.strerror}); "
                     "make it readable, or name a source without it")


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


def file_digests(paths: list[Path]) -> list[list[Any]]:
    """Path and `content_digest` of each file; one that cannot be read has none, and reading
    it reports it."""
    digests = []
    for path in paths:
        try:
            digests.append([str(path), content_digest([path])])
        except OSError:
            digests.append([str(path), None])
    return digests


def content_digest(paths: list[Path]) -> str:
    """A hash of the files' bytes, one after the other (read a MiB at a time): for inputs that
    are not a corpus, where a copy or a rewrite with the same content should count the same."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def starts_json_array(head: bytes) -> bool:
    """Whether a file's first bytes open a JSON array (a byte-order mark and white space
    before it allowed), rather than JSON Lines."""
    return head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"[")


def json_failure(exc: ValueError | RecursionError) -> str:
    """Why `json.loads` refused text that is valid JSON syntax: an integer of more than
    Python's 4,300 digits (ValueError), or nesting deeper than the parser's recursion."""
    return "nested too deep to parse" if isinstance(exc, RecursionError) else str(exc).partition(";")[0]


class Utf16AsUtf8(io.RawIOBase):
    """A UTF-16 stream, starting with its byte-order mark, read as UTF-8 bytes, so that every
    reader takes Windows' "Unicode" files as it takes UTF-8 ones. Where the bytes stop being
    UTF-16, the text before them is read, then reading raises UnicodeDecodeError; `error_at`
    is the (uncompressed) file's byte where they start."""

    def __init__(self, stream: io.BufferedIOBase) -> None:
        self._stream = stream
        self._codec = "utf-16-le" if stream.read(2) == b"\xff\xfe" else "utf-16-be"
        self._decoder = codecs.getincrementaldecoder(self._codec)()
        self._pending = b""
        self._read = 2
        self._error: UnicodeDecodeError | None = None
        self.error_at = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._pending:
            if self._error:
                raise self._error
            raw = self._stream.read(1 << 16)
            self._read += len(raw)
            try:
                text = self._decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as exc:  # exc.object: the bytes held back from before, then raw
                self._error, self.error_at = exc, self._read - len(exc.object) + exc.start
                text = exc.object[: exc.start].decode(self._codec)
            if not (raw or text or self._error):
                return 0
            self._pending = text.encode()
        size = min(len(buffer), len(self._pending))
        buffer[:size] = self._pending[:size]
        self._pending = self._pending[size:]
        return size
