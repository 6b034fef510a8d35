"""The collect stage: gather raw documents from the configured sources into Parquet shards.

Every later stage wants one uniform, streamable table of documents with their
provenance, whatever the sources were: the running Python's standard library (the
offline default, so a first run needs nothing downloaded), local files, a Hugging Face
dataset, or URLs. Each document keeps `id`, `text`, `source` (the source's name) and
`origin` (path, path:line, path#row, URL or dataset row).

Bad input never holds back the good documents beside it: a binary or non-UTF-8 file,
an empty or over-long document, a malformed JSON line is written to `quarantine.parquet`
with its reason. (A file in UTF-16 with its byte-order mark, as Windows editors save
"Unicode" text, is read as such: its NUL bytes do not make it binary.)
Mistakes only the user can fix (a missing path, a wrong text field, an unreachable URL)
stop the stage with a one-line `StageError`.

Everything streams: sources are generators, shards are written one row group at a
time, so memory stays flat however large the corpus grows.
"""

from __future__ import annotations

import ast
import csv
import glob
import gzip
import hashlib
import http.client
import io
import itertools
import json
import os
import platform
import re
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from importlib.util import decode_source
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zstandard
from pydantic import AfterValidator, Field, model_validator

import tasks.files
from tasks.files import UTF16_BOMS, Utf16AsUtf8, file_states, json_failure, starts_json_array, walk
from tasks.settings import Settings
from tasks.stage import Ref, StageError, code_version, fingerprint, json_digest, run_stage, workspace

FORMATS = (".txt", ".md", ".py", ".jsonl", ".json", ".csv", ".parquet")
RECORD_FORMATS = (".jsonl", ".json", ".csv", ".parquet")  # the formats whose text is in a field
COMPRESSIONS = (".gz", ".zst")
SUPPORTED = f"{', '.join(FORMATS)} (all but .parquet also as .gz or .zst)"
QUARANTINE = "quarantine.parquet"
SAMPLE_CHARS = 500
BINARY_PROBE = 8192
ROW_GROUP_BYTES = 64 << 20
BATCH_ROWS = 1024
FIELD_PROBE = 1000  # records without text_field at a file's start that show the setting, not the data, is wrong
RECORD_SLACK = 1 << 20  # bytes a JSON line or CSV row may hold beyond its text: the record's other fields
# Standard-library folders that are not the library itself, or differ between machines.
STDLIB_SKIP = {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__", "__phello__"}
DEFINITIONS = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
_ESCAPED = re.compile("[\udc80-\udcff]")  # a byte that is not UTF-8, as `surrogateescape` decodes it

DOC_SCHEMA = pa.schema(
    [("id", pa.string()), ("text", pa.large_string()), ("source", pa.string()), ("origin", pa.string())]
)
QUARANTINE_SCHEMA = pa.schema([(name, pa.string()) for name in ("source", "origin", "reason", "detail", "sample")])


def _name(default: str) -> Any:
    return Field(default, min_length=1, description="Name stored in each document's `source`; unique per config.")


def _text_field() -> Any:
    return Field("text", min_length=1, description="The JSON field or CSV/Parquet/dataset column holding the text. "
                 "A record without it is quarantined; a file none of whose first records has it stops the stage, "
                 "unless other files of the same files source have it: then the file is quarantined.")


class StdlibSource(Settings):
    """Docstrings of the running Python's standard library: one document per module."""

    kind: Literal["stdlib"] = "stdlib"
    name: str = _name("stdlib")
    include_code: bool = Field(False, description="Also add each module's source code as its own document.")
    max_files: int | None = Field(None, ge=1, description="Read only the first N modules in sorted order.")


class FilesSource(Settings):
    """Local files: one document per .txt/.md/.py file, per JSON record, per CSV or Parquet row."""

    kind: Literal["files"] = "files"
    name: str = _name("files")
    paths: list[str] = Field(
        min_length=1,
        description=f"Files, directories (read recursively, into linked folders too, hidden entries skipped) or "
        f"glob patterns (** allowed). Supported: {SUPPORTED}.",
    )
    text_field: str = _text_field()


class HFSource(Settings):
    """A Hugging Face dataset: streamed from the hub, or a directory written by `save_to_disk`."""

    kind: Literal["hf"] = "hf"
    name: str = _name("hf")
    path: str = Field(description="Hub dataset name (streamed; the CLI keeps the Hub offline unless "
                      "HF_HUB_OFFLINE=0 and HF_DATASETS_OFFLINE=0), or a directory written by `Dataset.save_to_disk`.")
    config_name: str | None = Field(None, description="Hub dataset configuration (subset), if it has several.")
    split: str = Field("train", description="The split to read.")
    text_field: str = _text_field()
    max_docs: int | None = Field(None, ge=1, description="Read at most this many rows.")


def _fetchable(url: str) -> str:
    """Refuse, at config time, a URL that urllib could never fetch however often it tried."""
    if any(ord(char) <= 0x20 or ord(char) == 0x7F for char in url):
        raise ValueError(f"{url!r} contains a space or control character; percent-encode it (a space is %20)")
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # parsed lazily: a bad port raises here
    except ValueError as exc:
        raise ValueError(f"{url!r} is not a valid URL: {exc}") from None
    if not parts.hostname:
        raise ValueError(f"{url!r} names no host")
    return url


class UrlSource(Settings):
    """Files fetched over http(s), then read like local files."""

    kind: Literal["url"] = "url"
    name: str = _name("url")
    urls: list[Annotated[str, Field(pattern=r"^https?://"), AfterValidator(_fetchable)]] = Field(
        min_length=1, description="http(s) URLs of plain-text, Markdown, Python, JSONL, JSON, CSV or Parquet files."
    )
    format: Literal["auto", "txt", "md", "py", "jsonl", "json", "csv", "parquet"] = Field(
        "auto",
        description="File format; auto takes it from the URL's extension, else plain text. "
        "A .gz or .zst ending is decompressed either way.",
    )
    text_field: str = _text_field()
    max_bytes: int = Field(1 << 30, ge=1, description="Largest download; a bigger one is quarantined as too-large.")
    retries: int = Field(3, ge=0, description="Extra attempts after a connection error, timeout or 5xx/429 reply.")
    backoff_s: float = Field(1.0, ge=0, description="Seconds before the first retry; doubles for each next one.")
    timeout_s: float = Field(30.0, gt=0, description="Socket timeout of one attempt, in seconds.")


Source = Annotated[StdlibSource | FilesSource | HFSource | UrlSource, Field(discriminator="kind")]


class CollectConfig(Settings):
    """Where the raw documents come from and how they are sharded."""

    sources: list[Source] = Field(
        default_factory=lambda: [StdlibSource()],
        min_length=1,
        description="Sources read in order: stdlib, files, hf or url.",
    )
    shard_docs: int = Field(5000, ge=1, description="Documents per Parquet shard.")
    max_doc_chars: int = Field(
        20_000_000, ge=1, le=1 << 40, description="Documents longer than this are quarantined as too-long."
    )
    refresh: int = Field(
        0,
        description="Bump to fetch remote sources (hub datasets, URLs) again; "
        "local inputs are tracked by size and mtime.",
    )

    @model_validator(mode="after")
    def _unique_names(self) -> CollectConfig:
        names = Counter(source.name for source in self.sources)
        repeated = sorted(name for name, count in names.items() if count > 1)
        if repeated:
            raise ValueError(f"source names must be unique; give each source a name (repeated: {', '.join(repeated)})")
        return self


class _Doc(NamedTuple):
    text: str
    origin: str


class _Bad(NamedTuple):
    origin: str
    reason: str
    detail: str = ""
    sample: str = ""


_Item = _Doc | _Bad


def _sample(data: bytes | str) -> str:
    if isinstance(data, bytes):
        data = data[: 4 * SAMPLE_CHARS].decode("utf-8", "replace")
    return data[:SAMPLE_CHARS]


class _NoField(StageError):
    """A table or file of records without `text_field`: the setting is wrong, unless other
    files of the same source have it (see `_read_files`)."""

    def __init__(self, label: str, field: str, names: Iterable[Any]):
        self.fields = ", ".join(map(str, names)) or "(none)"
        super().__init__(f"{label}: no field {field!r}; fields there: {self.fields}. Set text_field to one of them.")


def _require(label: str, field: str, names: list[str]) -> None:
    if field not in names:
        raise _NoField(label, field, names)


def _value(field: str, value: Any, origin: str) -> _Item:
    if value is None:
        return _Bad(origin, "missing-field", f"no value for {field!r}")
    if not isinstance(value, str):
        return _Bad(origin, "not-text", f"{field!r} is {type(value).__name__}", _sample(str(value)))
    return _Doc(value, origin)


def _column(values: Iterable[Any], field: str, label: str) -> Iterator[_Item]:
    for row, value in enumerate(values):
        yield _value(field, value, f"{label}#{row}")


def _records(entries: Iterable[tuple[str, Any] | _Bad], field: str, label: str) -> Iterator[_Item]:
    """The text of each JSON record of one file or dataset; `entries` are (origin, record)
    pairs, or the _Bad of a record that did not parse.

    A wrong `text_field` is a config error, a record that lacks it is bad input. So the
    records lacking it are held until one record has it, then quarantined; if none of the
    first FIELD_PROBE records (or none at all) has it, the file has no such field (`_NoField`)."""
    held: list[_Item] | None = []
    fields: list[str] = []
    for entry in entries:
        if isinstance(entry, _Bad):
            yield entry
            continue
        origin, record = entry
        if not isinstance(record, dict):
            detail = f"expected an object, got {type(record).__name__}"
            yield _Bad(origin, "malformed-json", detail, _sample(str(record)))
        elif held is not None and field not in record:
            fields = fields or list(record)
            held.append(_value(field, None, origin))
            if len(held) == FIELD_PROBE:
                raise _NoField(label, field, fields)
        else:
            yield from held or ()
            held = None
            yield _value(field, record.get(field), origin)
    if held:
        raise _NoField(label, field, fields)


# ---- files ---------------------------------------------------------------------------


def _format(path: Path) -> tuple[str, str] | None:
    """(format, compression) from the file name, e.g. ('.jsonl', '.gz'); None if unsupported."""
    suffix = path.suffix.lower()
    compression = suffix if suffix in COMPRESSIONS else ""
    fmt = Path(path.stem).suffix.lower() if compression else suffix
    if fmt not in FORMATS or (compression and fmt == ".parquet"):
        return None
    return fmt, compression


def _expand(entry: str) -> list[Path]:
    """The files an entry of a files source names, as absolute paths: documents are named, and
    their ids (so the validation split) drawn, from their paths, which are then the same
    however the entry spells them (`corpus/`, `./corpus`, `/home/me/corpus`)."""
    absolute = os.path.abspath(os.path.expanduser(entry))
    if any(char in entry for char in "*?["):
        matches = sorted(glob.glob(absolute, recursive=True))
        if not matches:
            raise StageError(f"no files match {entry!r}")
        return [path for match in matches for path in walk(Path(match))]
    path = Path(absolute)
    if path.is_dir():
        return walk(path)
    if not path.is_file():
        where = "" if Path(entry).expanduser().is_absolute() else f" (relative to the current directory: {path})"
        raise StageError(f"input path does not exist: {entry}{where}")
    if _format(path) is None:
        raise StageError(f"unsupported file type: {entry}; supported: {SUPPORTED}")
    return [path]


def _match(source: FilesSource) -> list[Path]:
    """The files a source names, each once, in the order given."""
    return list(dict.fromkeys(path for entry in source.paths for path in _expand(entry)))


def _open(path: Path, compression: str) -> io.BufferedIOBase:
    if compression == ".gz":
        return gzip.open(path, "rb")
    if compression == ".zst":
        return io.BufferedReader(zstandard.open(path, "rb"))
    return open(path, "rb")


def _lines(stream: io.BufferedIOBase, limit: int) -> Iterator[tuple[int, bytes | None]]:
    """Numbered lines; None stands for a line over `limit` bytes, which is skipped, not held."""
    for number in itertools.count(1):
        line = stream.readline(limit + 1)
        if not line:
            return
        if len(line) > limit and not line.endswith(b"\n"):
            while line and not line.endswith(b"\n"):
                line = stream.readline(1 << 20)
            yield number, None
        else:
            yield number, line


def _read_text(stream: io.BufferedIOBase, label: str, text_field: str, max_doc_chars: int) -> Iterator[_Item]:
    yield from _read_whole(stream, label, max_doc_chars, lambda data: data.decode("utf-8-sig"), "invalid-utf8")


def _read_python(stream: io.BufferedIOBase, label: str, text_field: str, max_doc_chars: int) -> Iterator[_Item]:
    """A Python module, decoded as Python reads it: by its coding line (PEP 263), else as UTF-8.
    Bytes that its encoding cannot decode, or a coding line naming no text codec, quarantine it
    as `bad-encoding`."""
    yield from _read_whole(stream, label, max_doc_chars, decode_source, "bad-encoding")


def _read_whole(
    stream: io.BufferedIOBase, label: str, max_doc_chars: int, decode: Callable[[bytes], str], undecodable: str
) -> Iterator[_Item]:
    """A whole file as one document; quarantined as `undecodable` where `decode` fails."""
    limit = 4 * max_doc_chars  # UTF-8 takes at most 4 bytes a character
    data = _read_up_to(stream, limit + 1)
    if len(data) > limit:
        yield _Bad(label, "too-long", f"more than {limit} bytes as UTF-8", _sample(data))
        return
    if b"\0" in data:
        yield _Bad(label, "binary", "contains NUL bytes")
        return
    try:
        text = decode(data)
    except UnicodeDecodeError as exc:
        yield _Bad(label, undecodable, f"byte {exc.start}: {exc.reason}", _sample(data))
        return
    # a coding line Python cannot follow (SyntaxError), or naming a codec that is not a text
    # encoding (rot13: LookupError) or that fails otherwise (punycode: UnicodeError)
    except (SyntaxError, LookupError, UnicodeError) as exc:
        yield _Bad(label, undecodable, str(exc), _sample(data))
        return
    del data
    yield _Doc(text, label)


def _read_up_to(stream: io.BufferedIOBase, size: int) -> bytes:
    """At most `size` bytes, read a MiB at a time: one `read(size)` allocates `size` bytes
    up front however short the file, which fails for a `max_doc_chars` set huge."""
    chunks = []
    while size > 0 and (chunk := stream.read(min(size, 1 << 20))):
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def _read_jsonl(stream: io.BufferedIOBase, label: str, text_field: str, max_doc_chars: int) -> Iterator[_Item]:
    yield from _records(_json_lines(stream, label, max_doc_chars), text_field, label)


def _record_limit(max_doc_chars: int) -> int:
    """The most a JSON line (bytes) or a CSV field (characters) may take: a guard on memory
    only, since a document's length is judged on its text. JSON spells one character in up
    to 12 bytes (`\\ud83d\\ude00`), and a record holds other fields beside its text."""
    return 12 * max_doc_chars + RECORD_SLACK


def _json_lines(stream: io.BufferedIOBase, label: str, max_doc_chars: int) -> Iterator[tuple[str, Any] | _Bad]:
    limit = _record_limit(max_doc_chars)
    for number, line in _lines(stream, limit):
        origin = f"{label}:{number}"
        if line is None:
            yield _Bad(origin, "too-long", f"line {number} is over {limit} bytes (12 x max_doc_chars + 1 MiB, "
                       "more than a document's text, escaped, and a MiB of other fields)")
        elif b"\0" in line:
            yield _Bad(origin, "binary", f"line {number} contains NUL bytes")
        elif line.strip():
            yield _parse_line(line, number, origin)


def _parse_line(line: bytes, number: int, origin: str) -> tuple[str, Any] | _Bad:
    try:
        record = json.loads(line.decode("utf-8-sig" if number == 1 else "utf-8"))
    except UnicodeDecodeError as exc:
        return _Bad(origin, "invalid-utf8", f"line {number}, byte {exc.start}: {exc.reason}", _sample(line))
    except json.JSONDecodeError as exc:
        return _Bad(origin, "malformed-json", f"line {number}, column {exc.colno}: {exc.msg}", _sample(line))
    except (ValueError, RecursionError) as exc:  # an integer over 4,300 digits; nesting too deep for the parser
        return _Bad(origin, "malformed-json", f"line {number}: {json_failure(exc)}", _sample(line))
    return origin, record


def _read_json(stream: io.BufferedIOBase, label: str, text_field: str, max_doc_chars: int) -> Iterator[_Item]:
    """A JSON array of records (parsed whole); anything else is read as JSON Lines, as `datasets` does."""
    if not starts_json_array(stream.peek(BINARY_PROBE)):
        yield from _read_jsonl(stream, label, text_field, max_doc_chars)
        return
    data = stream.read()
    try:
        records = json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        yield _Bad(label, "invalid-utf8", f"byte {exc.start}: {exc.reason}", _sample(data))
        return
    except json.JSONDecodeError as exc:
        yield _Bad(label, "malformed-json", f"line {exc.lineno}, column {exc.colno}: {exc.msg}", _sample(data))
        return
    except (ValueError, RecursionError) as exc:
        yield _Bad(label, "malformed-json", json_failure(exc), _sample(data))
        return
    del data
    yield from _records(((f"{label}#{row}", record) for row, record in enumerate(records)), text_field, label)


def _read_csv(stream: io.BufferedIOBase, label: str, text_field: str, max_doc_chars: int) -> Iterator[_Item]:
    """Rows of a CSV file with a header. Bytes that are not UTF-8 are decoded as lone
    surrogates (`surrogateescape`), so only the rows whose text holds them are quarantined."""
    csv.field_size_limit(max(csv.field_size_limit(), min(_record_limit(max_doc_chars), 2**31 - 1)))
    reader = csv.DictReader(io.TextIOWrapper(stream, encoding="utf-8-sig", errors="surrogateescape", newline=""))
    try:
        if reader.fieldnames is None:  # not even a header
            yield _Bad(label, "empty")
            return
        _require(label, text_field, reader.fieldnames)
        for row in reader:
            yield _utf8_row(_value(text_field, row[text_field], f"{label}:{reader.line_num}"), reader.line_num)
    except csv.Error as exc:
        yield _Bad(label, "malformed-csv", f"line {reader.line_num}: {exc}; the rest of the file is skipped")


def _utf8_row(item: _Item, line: int) -> _Item:
    """`item`, or an invalid-utf8 _Bad when its text holds a byte escaped by `surrogateescape`."""
    if isinstance(item, _Doc) and (bad := _ESCAPED.search(item.text)):
        raw = item.text.encode("utf-8", "surrogateescape")
        byte = ord(bad.group()) - 0xDC00
        return _Bad(item.origin, "invalid-utf8", f"line {line}: byte 0x{byte:02x} is not UTF-8", _sample(raw))
    return item


def _is_text(kind: pa.DataType) -> bool:
    """Whether an Arrow column of this type holds strings: plain, large or view, or
    dictionary-encoded (as pandas writes a categorical column)."""
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)


def _read_parquet(path: Path, label: str, text_field: str) -> Iterator[_Item]:
    table = pq.ParquetFile(path)
    _require(label, text_field, table.schema_arrow.names)
    kind = table.schema_arrow.field(text_field).type
    if not _is_text(kind):
        raise StageError(f"{label}: column {text_field!r} holds {kind}, not text. Set text_field to a text column.")
    batches = table.iter_batches(batch_size=BATCH_ROWS, columns=[text_field])
    values = (value for batch in batches for value in batch.column(0).to_pylist())
    yield from _column(values, text_field, label)


READERS = {".txt": _read_text, ".md": _read_text, ".py": _read_python, ".jsonl": _read_jsonl, ".json": _read_json,
           ".csv": _read_csv}


def _utf16_hint(head: bytes, fmt: str) -> str:
    """A hint when NUL bytes look like UTF-16 text without its byte-order mark: mostly Latin
    text has a NUL as every other byte (the odd ones little-endian, the even ones big-endian)."""
    halves = head[1::2], head[0::2]
    if len(head) >= 16 and any(half.count(0) >= 0.9 * len(half) and b"\0" not in other
                               for half, other in (halves, halves[::-1])):
        other = "" if fmt == ".py" else " (or UTF-16 with one)"  # Python reads no UTF-16 source
        return f": it looks like UTF-16 without a byte-order mark; save it as UTF-8{other}"
    return ""


def _read_utf16(
    stream: io.BufferedIOBase, fmt: str, label: str, text_field: str, max_doc_chars: int
) -> Iterator[_Item]:
    """A file of a text format in UTF-16. Where its bytes stop being UTF-16, a JSON Lines or
    CSV file keeps its complete lines before them; the rest, or a whole-file format whole, is
    quarantined. Python source is not read: Python does not read UTF-16 source either."""
    if fmt == ".py":
        yield _Bad(label, "bad-encoding", "UTF-16, which Python does not read as source: save it as UTF-8")
        return
    utf8 = Utf16AsUtf8(stream)
    try:
        yield from READERS[fmt](io.BufferedReader(utf8), label, text_field, max_doc_chars)
    except UnicodeDecodeError as exc:
        yield _Bad(label, "invalid-utf16", f"byte {utf8.error_at}: {exc.reason}; lines from the one holding it on "
                   "are skipped (a .txt, .md or JSON array file: the whole file)")


def _read_file(path: Path, label: str, text_field: str, max_doc_chars: int) -> Iterator[_Item]:
    """Documents of one file; `label` names it in origins (its path, or the URL it came from)."""
    spec = _format(path)
    if spec is None:
        yield _Bad(label, "unsupported-extension", f"supported: {SUPPORTED}")
        return
    fmt, compression = spec
    try:
        if fmt == ".parquet":
            yield from _read_parquet(path, label, text_field)
            return
        with _open(path, compression) as stream:
            head = stream.peek(BINARY_PROBE)[:BINARY_PROBE]
            if head.startswith(UTF16_BOMS):  # Windows' "Unicode" text: its NUL bytes are not binary
                yield from _read_utf16(stream, fmt, label, text_field, max_doc_chars)
                return
            if b"\0" in head:
                yield _Bad(label, "binary", f"NUL bytes in the first {BINARY_PROBE} bytes{_utf16_hint(head, fmt)}")
                return
            yield from READERS[fmt](stream, label, text_field, max_doc_chars)
    except (OSError, EOFError, zlib.error, zstandard.ZstdError, pa.ArrowException) as exc:
        yield _Bad(label, "unreadable", f"{type(exc).__name__}: {exc}")


# ---- stdlib --------------------------------------------------------------------------


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_modules(root: Path) -> list[str]:
    """Relative paths of the standard library's own modules, sorted, so equal versions agree."""
    found = []
    for folder, dirnames, filenames in os.walk(root):
        dirnames[:] = [name for name in dirnames if name not in STDLIB_SKIP and not name.startswith(("config-", "."))]
        relative = Path(folder).relative_to(root)
        found += [
            (relative / name).as_posix()
            for name in filenames
            if name.endswith(".py") and not name.startswith("_sysconfigdata")
        ]
    return sorted(found)


def _definitions(statements: list[ast.stmt]) -> Iterator[ast.stmt]:
    """Every class and function defined in `statements`, at any depth, in source order.

    Definitions are statements, so only statement lists are searched: the bodies of
    definitions and compound statements, their `else`/`finally` parts, `except` clauses and
    `match` cases. Skipping the expressions (most of a module's nodes) makes this several
    times faster than `ast.walk`."""
    for node in statements:
        if isinstance(node, DEFINITIONS):
            yield node
        clauses = [clause.body for clause in [*getattr(node, "handlers", ()), *getattr(node, "cases", ())]]
        blocks = [getattr(node, "body", None), *clauses, getattr(node, "orelse", None), getattr(node, "finalbody", None)]
        for block in blocks:
            if isinstance(block, list):  # a lambda's body is an expression
                yield from _definitions(block)


def _docstrings(tree: ast.Module) -> list[str]:
    """The module docstring, then every class and function docstring in source order."""
    return [doc for node in [tree, *_definitions(tree.body)] if (doc := ast.get_docstring(node, clean=True))]


def _read_stdlib(source: StdlibSource) -> Iterator[_Item]:
    root = _stdlib_root()
    for relative in _stdlib_modules(root)[: source.max_files]:
        code = (root / relative).read_bytes()
        try:
            tree = ast.parse(code, filename=relative)
        except (SyntaxError, ValueError) as exc:
            yield _Bad(relative, "syntax-error", str(exc))
            continue
        docs = _docstrings(tree)
        if docs:
            yield _Doc("\n\n".join(docs), relative)
        if source.include_code:
            yield _Doc(decode_source(code), f"{relative}#source")


# ---- Hugging Face datasets -----------------------------------------------------------


def _hf_disk(source: HFSource) -> Iterator[_Item]:
    import datasets  # a heavy import, paid only when a dataset source is configured

    try:
        dataset, label = datasets.load_from_disk(source.path), os.path.abspath(source.path)  # as `_expand`'s
    except FileNotFoundError as exc:
        raise StageError(f"{source.path} is not a dataset written by save_to_disk: {exc}") from None
    if isinstance(dataset, datasets.DatasetDict):
        if source.split not in dataset:
            raise StageError(f"{source.path} has no split {source.split!r}; splits: {', '.join(dataset)}")
        dataset, label = dataset[source.split], f"{label}:{source.split}"
    _require(label, source.text_field, dataset.column_names)
    batches = dataset.select_columns([source.text_field]).iter(batch_size=BATCH_ROWS)
    values = (value for batch in batches for value in batch[source.text_field])
    yield from _column(values, source.text_field, label)


def _hf_hub(source: HFSource) -> Iterator[_Item]:
    import datasets

    label = ":".join(part for part in (source.path, source.config_name, source.split) if part)
    try:
        rows = datasets.load_dataset(source.path, source.config_name, split=source.split, streaming=True)
    except Exception as exc:  # the hub raises many types; all mean "cannot open this dataset"
        offline = "1" in (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("HF_DATASETS_OFFLINE"))
        hint = " (the Hub is switched off here: set HF_HUB_OFFLINE=0 and HF_DATASETS_OFFLINE=0)" if offline else ""
        raise StageError(f"cannot open dataset {label}: {type(exc).__name__}: {exc}{hint}") from None
    records = ((f"{label}#{row}", record) for row, record in enumerate(rows))
    yield from _records(records, source.text_field, label)


def _read_hf(source: HFSource) -> Iterator[_Item]:
    rows = _hf_disk(source) if Path(source.path).is_dir() else _hf_hub(source)
    return itertools.islice(rows, source.max_docs)


# ---- URLs ----------------------------------------------------------------------------


def _url_suffix(url: str, fmt: str) -> str:
    """File ending for a download, so it is read like a local file of that format."""
    name = Path(urllib.parse.urlparse(url).path)
    compression = name.suffix.lower() if name.suffix.lower() in COMPRESSIONS else ""
    if fmt != "auto":
        return f".{fmt}{compression}"
    spec = _format(name)
    return "".join(spec) if spec else f".txt{compression}"


def _fetch(url: str, dest: Path, max_bytes: int, timeout_s: float) -> _Bad | None:
    """Download `url` into `dest`; a _Bad when it is over `max_bytes` (nothing is kept then)."""
    too_large = _Bad(url, "too-large", f"more than max_bytes={max_bytes} bytes")
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        declared = response.headers.get("Content-Length", "").strip()  # a header that is no number: counted as read
        if declared.isascii() and declared.isdigit() and int(declared) > max_bytes:
            return too_large
        with open(dest, "wb") as out:
            size = 0
            while chunk := response.read(1 << 20):
                size += len(chunk)
                if size > max_bytes:
                    dest.unlink()
                    return too_large
                out.write(chunk)
    return None


def _download(url: str, dest: Path, source: UrlSource) -> _Bad | None:
    """`_fetch` with retries and exponential backoff, for transient failures only."""
    for attempt in range(source.retries + 1):
        if attempt:
            time.sleep(source.backoff_s * 2 ** (attempt - 1))
        try:
            return _fetch(url, dest, source.max_bytes, source.timeout_s)
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code < 500 and exc.code != 429:
                raise StageError(f"cannot fetch {url}: HTTP {exc.code} {exc.reason}") from None
            error = f"HTTP {exc.code} {exc.reason}"
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as exc:
            error = str(getattr(exc, "reason", exc))
    raise StageError(f"cannot fetch {url} after {source.retries + 1} attempts: {error}")


def _read_urls(source: UrlSource, scratch: Path, max_doc_chars: int) -> Iterator[_Item]:
    for number, url in enumerate(dict.fromkeys(source.urls)):
        local = scratch / f"{source.name}-{number}{_url_suffix(url, source.format)}"
        failure = _download(url, local, source)
        if failure:
            yield failure
            continue
        yield from _read_file(local, url, source.text_field, max_doc_chars)
        local.unlink()


def _label(path: Path) -> str:
    """A file's path as it names the file's documents. Bytes of the name that are not UTF-8
    are written as \\xNN: as `str(path)` leaves them (lone surrogates), no origin holding
    them could be stored."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _read_files(files: list[Path], text_field: str, max_doc_chars: int) -> Iterator[_Item]:
    """The documents of a files source. A table or file of records without `text_field` is
    quarantined when another one of the source has it (a folder holding other tables too);
    when none has it, the setting is wrong, and the stage stops naming the first one's fields.
    Such a file is one quarantine row: the bad lines it opens with (up to FIELD_PROBE) are
    held back until a document shows the file is not one."""
    lacking: list[_NoField] = []
    found = False  # a document from a file of records
    for path in files:
        records = (_format(path) or ("",))[0] in RECORD_FORMATS
        label = _label(path)
        opening: list[_Item] | None = []
        try:
            for item in _read_file(path, label, text_field, max_doc_chars):
                if records and isinstance(item, _Bad) and opening is not None and len(opening) < FIELD_PROBE:
                    opening.append(item)
                    continue
                found = found or (records and isinstance(item, _Doc))
                yield from opening or ()
                opening = None
                yield item
            yield from opening or ()
        except _NoField as exc:
            lacking.append(exc)
            yield _Bad(label, "missing-field", f"no field {text_field!r} in its records; fields there: "
                       f"{exc.fields}")
    if lacking and not found:
        raise lacking[0]


# ---- the stage -----------------------------------------------------------------------


def _read_source(source: Source, files: list[Path], scratch: Path, max_doc_chars: int) -> Iterator[_Item]:
    match source:
        case StdlibSource():
            return _read_stdlib(source)
        case FilesSource():
            return _read_files(files, source.text_field, max_doc_chars)
        case HFSource():
            return _read_hf(source)
        case UrlSource():
            return _read_urls(source, scratch, max_doc_chars)


def _identity(source: Source, files: list[Path]) -> dict[str, Any]:
    """What, besides the config, decides this source's documents: a change re-collects."""
    match source:
        case StdlibSource():
            return {"python": platform.python_version(), "implementation": sys.implementation.name}
        case FilesSource():
            return {"files": file_states(files)}
        case HFSource() if Path(source.path).is_dir():
            return {"files": file_states(walk(Path(source.path)))}
    return {}  # remote: named by the config; `refresh` fetches again


def _strings(kind: pa.DataType, values: list[bytes]) -> pa.Array:
    """A string column over UTF-8 values, built without a second copy of the text."""
    offsets = np.zeros(len(values) + 1, dtype=np.int64 if pa.types.is_large_string(kind) else np.int32)
    np.cumsum([len(value) for value in values], dtype=offsets.dtype, out=offsets[1:])
    return pa.Array.from_buffers(kind, len(values), [None, pa.py_buffer(offsets), pa.py_buffer(b"".join(values))])


class _ParquetSink:
    """Writes rows to Parquet a row group at a time, starting a new file every `rows_per_file` rows.

    Rows wait as UTF-8 bytes and are flushed when the next row comes in and the group
    is full, so the caller's copy of a large document is already gone by then.
    """

    def __init__(self, schema: pa.Schema, folder: Path, pattern: str, rows_per_file: int | None, **options: Any):
        self.schema, self.folder, self.pattern = schema, folder, pattern
        self.rows_per_file, self.options = rows_per_file, options
        self.names: list[str] = []
        self._writer: pq.ParquetWriter | None = None
        self._in_file = 0
        self._rows: list[dict[str, bytes]] = []
        self._bytes = 0

    def add(self, row: dict[str, str | bytes]) -> None:
        if self._bytes >= ROW_GROUP_BYTES or self._in_file + len(self._rows) == self.rows_per_file:
            self._flush()
        encoded = {
            name: value if isinstance(value, bytes) else value.encode("utf-8", "replace") for name, value in row.items()
        }
        self._rows.append(encoded)
        self._bytes += sum(map(len, encoded.values()))

    def _flush(self) -> None:
        if self._writer is None:
            self.names.append(self.pattern.format(len(self.names)))
            self._writer = pq.ParquetWriter(self.folder / self.names[-1], self.schema, **self.options)
        rows, self._rows, self._bytes = self._rows, [], 0
        columns = [_strings(field.type, [row[field.name] for row in rows]) for field in self.schema]
        del rows
        self._writer.write_batch(pa.RecordBatch.from_arrays(columns, schema=self.schema))
        self._in_file += len(columns[0])
        if self._in_file == self.rows_per_file:
            self._writer.close()
            self._writer, self._in_file = None, 0

    def close(self) -> list[str]:
        """Flush and close; always leaves at least one (possibly empty) file."""
        if self._rows or not self.names:
            self._flush()
        if self._writer is not None:
            self._writer.close()
        return self.names


class _Corpus:
    """Routes documents to the shards and bad items to quarantine, and keeps the tallies."""

    def __init__(self, folder: Path, max_doc_chars: int, shard_docs: int):
        self.max_doc_chars = max_doc_chars
        self.shards = _ParquetSink(
            DOC_SCHEMA, folder, "shard-{:05d}.parquet", shard_docs,
            compression="zstd", use_dictionary=["source"], write_statistics=["id", "source", "origin"],
        )  # fmt: skip
        self.quarantine = _ParquetSink(QUARANTINE_SCHEMA, folder, QUARANTINE, None, compression="zstd")
        self.digest = hashlib.sha256()
        self.sources: dict[str, Counter] = {}
        self.reasons: Counter = Counter()

    def extend(self, source: str, items: Iterable[_Item]) -> None:
        tally = self.sources.setdefault(source, Counter(docs=0, bytes=0, quarantined=0))
        for item in items:
            if isinstance(item, _Doc):
                item = self._write(source, item, tally)
            if item is not None:
                self.quarantine.add({"source": source, **item._asdict()})
                self.reasons[item.reason] += 1
                tally["quarantined"] += 1

    def _write(self, source: str, doc: _Doc, tally: Counter) -> _Bad | None:
        if not doc.text or doc.text.isspace():
            return _Bad(doc.origin, "empty")
        if len(doc.text) > self.max_doc_chars:
            detail = f"{len(doc.text)} characters, max_doc_chars={self.max_doc_chars}"
            return _Bad(doc.origin, "too-long", detail, _sample(doc.text))
        try:
            data = doc.text.encode("utf-8")
        except UnicodeEncodeError as exc:
            return _Bad(doc.origin, "invalid-utf8", f"character {exc.start}: {exc.reason}", _sample(doc.text))
        self.digest.update(f"{source}\0{doc.origin}\0{len(data)}\0".encode())
        self.digest.update(data)
        doc_id = hashlib.sha1(f"{source}\0{doc.origin}".encode()).hexdigest()[:20]
        self.shards.add({"id": doc_id, "text": data, "source": source, "origin": doc.origin})
        tally["docs"] += 1
        tally["bytes"] += len(data)
        return None

    def close(self) -> dict[str, Any]:
        """Close both tables; the manifest fields describing them."""
        docs = sum(tally["docs"] for tally in self.sources.values())
        if not docs:
            if not self.reasons:
                raise StageError("no documents collected: the sources hold no files or records")
            reasons = ", ".join(f"{reason} ({count})" for reason, count in self.reasons.most_common())
            raise StageError(f"no documents collected; quarantined by reason: {reasons}")
        shards = self.shards.close()
        self.quarantine.close()
        return {
            "counts": {
                "docs": docs,
                "bytes": sum(tally["bytes"] for tally in self.sources.values()),
                "shards": len(shards),
                "quarantined": self.reasons.total(),
            },
            "python": platform.python_version(),
            "content_hash": self.digest.hexdigest(),
            "shards": shards,
            "sources": {name: dict(tally) for name, tally in self.sources.items()},
            "quarantine": dict(self.reasons.most_common()),
        }


def _build(config: CollectConfig, files: dict[str, list[Path]], out: Path) -> dict[str, Any]:
    corpus = _Corpus(out, config.max_doc_chars, config.shard_docs)
    with tempfile.TemporaryDirectory(dir=out, prefix=".downloads-") as scratch:
        for source in config.sources:
            items = _read_source(source, files.get(source.name, []), Path(scratch), config.max_doc_chars)
            corpus.extend(source.name, items)
    return corpus.close()


def collect(config: CollectConfig | None = None, root: str | os.PathLike | None = None) -> Ref:
    """Collect the configured sources into `<workspace>/collect/<fingerprint>/`."""
    config = config or CollectConfig()
    root = workspace(root)
    files = {source.name: _match(source) for source in config.sources if isinstance(source, FilesSource)}
    identities = {source.name: _identity(source, files.get(source.name, [])) for source in config.sources}
    settings = config.model_dump(mode="json")
    fp = fingerprint("collect", settings, [json_digest(identities)], code_version(sys.modules[__name__], tasks.files))
    inputs = {
        source.name: {"kind": source.kind, "files": len(identities[source.name].get("files", [])),
                      "identity": json_digest(identities[source.name])}
        for source in config.sources
    }  # fmt: skip
    return run_stage("collect", fp, lambda out: _build(config, files, out), root=root, inputs=inputs, config=settings)


def shard_paths(ref: Ref) -> list[Path]:
    """The Parquet shards of a collect output, in order."""
    return [ref.dir / name for name in ref.manifest()["shards"]]


def iter_shard(path: Path, batch_size: int = BATCH_ROWS) -> Iterator[dict[str, str]]:
    """Documents of one shard, read `batch_size` rows at a time."""
    for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size):
        yield from batch.to_pylist()


def iter_documents(ref: Ref, batch_size: int = BATCH_ROWS) -> Iterator[dict[str, str]]:
    """Every document of a collect output as {id, text, source, origin}, streamed shard by shard."""
    for path in shard_paths(ref):
        yield from iter_shard(path, batch_size)
