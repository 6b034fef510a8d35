"""The collect stage: every source kind, every kind of bad input, caching and streaming."""

from __future__ import annotations

import ast
import functools
import gzip
import hashlib
import http.server
import json
import os
import platform
import re
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from types import SimpleNamespace

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from pydantic import ValidationError

from tasks.collect import (
    QUARANTINE,
    CollectConfig,
    FilesSource,
    HFSource,
    StdlibSource,
    UrlSource,
    _docstrings,
    _stdlib_modules,
    _stdlib_root,
    collect,
    iter_documents,
    shard_paths,
)
from tasks.stage import REPO_ROOT, Ref, StageError

BIG = 50_000_000  # a 50 MB single-line document


def run(ws: Path, *sources, **options) -> Ref:
    return collect(CollectConfig(sources=list(sources), **options), ws)


def texts(ref: Ref) -> dict[str, str]:
    return {doc["origin"]: doc["text"] for doc in iter_documents(ref)}


def quarantined(ref: Ref) -> dict[str, str]:
    """origin -> reason of every quarantined item."""
    return {row["origin"]: row["reason"] for row in pq.read_table(ref.dir / QUARANTINE).to_pylist()}


def write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def jsonl(*records) -> str:
    return "".join(json.dumps(record) + "\n" for record in records)


# ---- stdlib --------------------------------------------------------------------------


def test_stdlib_default_is_reproducible_with_provenance(ws, tmp_path):
    ref = run(ws, StdlibSource(max_files=30))
    docs = list(iter_documents(ref))
    manifest = ref.manifest()

    assert 0 < len(docs) <= 30
    assert [doc["origin"] for doc in docs] == sorted(doc["origin"] for doc in docs)
    assert set(_stdlib_modules(_stdlib_root())[:30]) >= {doc["origin"] for doc in docs}
    assert all(doc["source"] == "stdlib" and doc["text"].strip() for doc in docs)
    assert len({doc["id"] for doc in docs}) == len(docs)
    assert manifest["python"] == platform.python_version()
    assert manifest["counts"] == {"docs": len(docs), "bytes": sum(len(d["text"].encode()) for d in docs),
                                  "shards": 1, "quarantined": 0}  # fmt: skip

    again = run(tmp_path / "elsewhere", StdlibSource(max_files=30))
    assert again.fingerprint == ref.fingerprint
    assert again.manifest()["content_hash"] == manifest["content_hash"]
    assert list(iter_documents(again)) == docs


def test_stdlib_walk_skips_tests_and_installed_packages():
    modules = _stdlib_modules(_stdlib_root())
    assert modules == sorted(modules)
    assert {"json/decoder.py", "os.py", "email/message.py"} <= set(modules)
    assert not [path for path in modules if {"test", "tests", "idlelib", "site-packages"} & set(Path(path).parts)]
    assert not [path for path in modules if path.startswith("_sysconfigdata")]


def test_stdlib_document_is_module_docstring_then_definitions_in_order():
    tree = ast.parse(textwrap.dedent('''
        """Module line.

            common indent goes
                relative indent stays
        """
        def first():
            """First function."""
        class Thing:
            """A class."""
            def method(self):
                """
                Method doc.
                """
        def undocumented():
            pass
    '''))
    module = "Module line.\n\ncommon indent goes\n    relative indent stays"
    assert _docstrings(tree) == [module, "First function.", "A class.", "Method doc."]


def test_stdlib_docstrings_nested_in_compound_statements_come_in_source_order():
    tree = ast.parse(textwrap.dedent('''
        try:
            def a(): "1"
        except ImportError:
            def b(): "2"
        else:
            def c(): "3"
        finally:
            def d(): "4"
        if x:
            def e(): "5"
        elif y:
            with z:
                def f(): "6"
        for i in ():
            async def g(): "7"
        match w:
            case 1:
                class H: "8"
        while True:
            key = lambda: "not a docstring"
        async def outer():
            "9"
            async with v:
                def inner(): "10"
    '''))
    assert _docstrings(tree) == [str(n) for n in range(1, 11)]


def test_stdlib_include_code_adds_the_source(ws):
    ref = run(ws, StdlibSource(max_files=5, include_code=True))
    code = {origin: text for origin, text in texts(ref).items() if origin.endswith("#source")}
    assert code
    for origin, text in code.items():
        assert text == (_stdlib_root() / origin.removesuffix("#source")).read_text()


# ---- files ---------------------------------------------------------------------------


def test_files_reads_every_format_recursively(ws, tmp_path):
    root = tmp_path / "corpus"
    write(root / "a.txt", "plain text")
    write(root / "b.md", "# markdown")
    write(root / "c.jsonl", jsonl({"text": "line one", "n": 1}, {"text": "line two"}))
    write(root / "d.json", json.dumps([{"text": "array zero"}, {"text": "array one"}]))
    write(root / "e.csv", 'text,label\n"comma, quoted",x\nsecond row,y\n')
    pq.write_table(pa.table({"text": ["pq zero", "pq one"], "n": [0, 1]}), root / "f.parquet")
    write(root / "g.jsonl.gz", gzip.compress(jsonl({"text": "gzipped"}).encode()))
    write(root / "h.txt.zst", zstandard.ZstdCompressor().compress("zstd text".encode()))
    write(root / "sub" / "i.txt", "nested")
    write(root / ".hidden.txt", "hidden files are skipped")

    ref = run(ws, FilesSource(paths=[str(root)]))

    assert texts(ref) == {
        f"{root}/a.txt": "plain text",
        f"{root}/b.md": "# markdown",
        f"{root}/c.jsonl:1": "line one",
        f"{root}/c.jsonl:2": "line two",
        f"{root}/d.json#0": "array zero",
        f"{root}/d.json#1": "array one",
        f"{root}/e.csv:2": "comma, quoted",
        f"{root}/e.csv:3": "second row",
        f"{root}/f.parquet#0": "pq zero",
        f"{root}/f.parquet#1": "pq one",
        f"{root}/g.jsonl.gz:1": "gzipped",
        f"{root}/h.txt.zst": "zstd text",
        f"{root}/sub/i.txt": "nested",
    }
    assert ref.counts["quarantined"] == 0


def test_python_files_are_read_as_python_decodes_them(ws, tmp_path):
    root = tmp_path / "code"
    write(root / "plain.py", 'def greet():\n    return "h\u00e9llo"\n')
    write(root / "latin.py", '# -*- coding: latin-1 -*-\nname = "caf\u00e9"\n'.encode("latin-1"))
    write(root / "crlf.py", b"x = 1\r\n")
    write(root / "windows.py", "x = 1\n".encode("utf-16"))
    write(root / "odd.py", b"# coding: no-such-codec\nx = 1\n")
    write(root / "rot.py", b"# coding: rot13\nx = 1\n")  # a codec, but not of text
    write(root / "broken.py", b'name = "caf\xe9"\n')  # Latin-1 without a coding line

    ref = run(ws, FilesSource(paths=[str(root)]))

    assert texts(ref) == {
        f"{root}/plain.py": 'def greet():\n    return "h\u00e9llo"\n',
        f"{root}/latin.py": '# -*- coding: latin-1 -*-\nname = "caf\u00e9"\n',
        f"{root}/crlf.py": "x = 1\n",  # newlines as Python reads them
    }
    details = {row["origin"]: (row["reason"], row["detail"]) for row in pq.read_table(ref.dir / QUARANTINE).to_pylist()}
    assert details == {
        f"{root}/odd.py": ("bad-encoding", "unknown encoding: no-such-codec"),
        f"{root}/rot.py": ("bad-encoding", "'rot13' is not a text encoding; "
                                           "use codecs.decode() to handle arbitrary codecs"),
        f"{root}/broken.py": ("bad-encoding", "invalid or missing encoding declaration"),
        f"{root}/windows.py": ("bad-encoding", "UTF-16, which Python does not read as source: save it as UTF-8"),
    }


def test_files_globs_and_text_field(ws, tmp_path):
    write(tmp_path / "x" / "one.jsonl", jsonl({"content": "first"}))
    write(tmp_path / "y" / "two.jsonl", jsonl({"content": "second"}))
    write(tmp_path / "y" / "skip.txt", "not matched")

    ref = run(ws, FilesSource(paths=[str(tmp_path / "**" / "*.jsonl")], text_field="content"))

    assert sorted(texts(ref).values()) == ["first", "second"]


def test_json_file_of_lines_is_read_as_jsonl(ws, tmp_path):
    path = write(tmp_path / "rows.json", jsonl({"text": "a"}, {"text": "b"}))
    assert texts(run(ws, FilesSource(paths=[str(path)]))) == {f"{path}:1": "a", f"{path}:2": "b"}


def test_bad_files_are_quarantined_and_good_ones_come_through(ws, tmp_path):
    root = tmp_path / "mixed"
    write(root / "good.txt", "a good document")
    write(root / "binary.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    write(root / "latin1.txt", "café".encode("latin-1"))
    write(root / "windows.txt", "Grüße aus Windows\n".encode("utf-16"))  # byte-order mark first
    write(root / "windows-be.md", "\ufeff# big-endian".encode("utf-16-be"))
    write(root / "windows.jsonl", jsonl({"text": "in UTF-16"}, {"text": "\u00e9t\u00e9 \U0001f600"}).encode("utf-16"))
    write(root / "windows.csv", b"\xfe\xff" + 'text,n\r\nrow one,1\r\n"two, quoted",2\r\n'.encode("utf-16-be"))
    good16 = jsonl({"text": "before the bad bytes"}).encode("utf-16")
    write(root / "half.jsonl", good16 + b"\x00\xd8A\x00\n\x00")
    odd16 = "an odd byte at the end".encode("utf-16")
    write(root / "nomark.txt", "UTF-16 without its byte-order mark".encode("utf-16-le"))
    write(root / "nomark.py", 'print("no byte-order mark")\n'.encode("utf-16-le"))
    write(root / "odd.txt", odd16 + b"!")
    write(root / "empty.txt", "")
    write(root / "blank.md", "  \n\t\n")
    write(root / "notes.pdf", "%PDF-1.7")
    write(root / "broken.jsonl.gz", b"this is not gzip")
    (root / "dangling.txt").symlink_to(root / "moved-away.txt")
    write(root / "lines.jsonl", jsonl({"text": "good line"}) + '{"text": "unterminated\n' + jsonl(
        ["not", "an", "object"], {"text": None}, {"text": 42}, {"title": "no text"}, {"text": "\ud800"},
        {"text": "last good line"},
    ))  # fmt: skip

    ref = run(ws, FilesSource(paths=[str(root)]))

    assert texts(ref) == {
        f"{root}/good.txt": "a good document",
        f"{root}/windows.txt": "Grüße aus Windows\n",
        f"{root}/windows-be.md": "# big-endian",
        f"{root}/windows.jsonl:1": "in UTF-16",
        f"{root}/windows.jsonl:2": "\u00e9t\u00e9 \U0001f600",
        f"{root}/windows.csv:2": "row one",
        f"{root}/windows.csv:3": "two, quoted",
        f"{root}/half.jsonl:1": "before the bad bytes",
        f"{root}/lines.jsonl:1": "good line",
        f"{root}/lines.jsonl:8": "last good line",
    }
    assert quarantined(ref) == {
        f"{root}/binary.txt": "binary",
        f"{root}/nomark.txt": "binary",
        f"{root}/nomark.py": "binary",
        f"{root}/latin1.txt": "invalid-utf8",
        f"{root}/half.jsonl": "invalid-utf16",
        f"{root}/odd.txt": "invalid-utf16",
        f"{root}/empty.txt": "empty",
        f"{root}/blank.md": "empty",
        f"{root}/notes.pdf": "unsupported-extension",
        f"{root}/broken.jsonl.gz": "unreadable",
        f"{root}/dangling.txt": "unreadable",
        f"{root}/lines.jsonl:2": "malformed-json",
        f"{root}/lines.jsonl:3": "malformed-json",
        f"{root}/lines.jsonl:4": "missing-field",
        f"{root}/lines.jsonl:5": "not-text",
        f"{root}/lines.jsonl:6": "missing-field",
        f"{root}/lines.jsonl:7": "invalid-utf8",
    }
    rows = {row["origin"]: row for row in pq.read_table(ref.dir / QUARANTINE).to_pylist()}
    assert rows[f"{root}/lines.jsonl:2"]["detail"].startswith("line 2, column")
    assert rows[f"{root}/lines.jsonl:2"]["sample"].startswith('{"text": "unterminated')
    assert rows[f"{root}/half.jsonl"]["detail"].startswith(f"byte {len(good16)}: illegal UTF-16 surrogate; lines from")
    assert rows[f"{root}/odd.txt"]["detail"].startswith(f"byte {len(odd16)}: truncated data")
    assert rows[f"{root}/nomark.txt"]["detail"].endswith("looks like UTF-16 without a byte-order mark; save it as "
                                                         "UTF-8 (or UTF-16 with one)")
    assert rows[f"{root}/nomark.py"]["detail"].endswith("without a byte-order mark; save it as UTF-8")  # only
    assert rows[f"{root}/binary.txt"]["detail"] == "NUL bytes in the first 8192 bytes"
    assert ref.manifest()["quarantine"] == {"malformed-json": 2, "missing-field": 2, "empty": 2, "binary": 3,
                                            "invalid-utf8": 2, "unsupported-extension": 1, "unreadable": 2,
                                            "not-text": 1, "invalid-utf16": 2}  # fmt: skip
    assert ref.counts["quarantined"] == 17


def _damaged_gzip() -> bytes:
    """A gzip file whose header is sound and whose compressed data is not."""
    data = bytearray(gzip.compress(" ".join(f"word{n}" for n in range(20_000)).encode(), mtime=0))
    data[40:60] = bytes(range(200, 220))
    return bytes(data)


def test_odd_files_and_records_are_quarantined_without_stopping_the_stage(ws, tmp_path):
    root = tmp_path / "odd"
    write(root / "good.txt", "a good document")
    write(Path(os.fsdecode(bytes(root) + b"/caf\xe9.txt")), "a name in Latin-1")  # not UTF-8
    write(root / "damaged.txt.gz", _damaged_gzip())
    write(root / "numbers.jsonl", jsonl({"text": "fine"}) + '{"text": "x", "n": ' + "1" * 5000 + "}\n"
          + "[" * 100_000 + "\n")
    write(root / "numbers.json", '[{"text": "y", "n": ' + "1" * 5000 + "}]")
    write(root / "empty.csv", "")

    ref = run(ws, FilesSource(paths=[str(root)]))

    assert texts(ref) == {f"{root}/good.txt": "a good document", f"{root}/caf\\xe9.txt": "a name in Latin-1",
                          f"{root}/numbers.jsonl:1": "fine"}
    assert quarantined(ref) == {
        f"{root}/damaged.txt.gz": "unreadable",
        f"{root}/numbers.jsonl:2": "malformed-json",
        f"{root}/numbers.jsonl:3": "malformed-json",
        f"{root}/numbers.json": "malformed-json",
        f"{root}/empty.csv": "empty",
    }
    rows = {row["origin"]: row["detail"] for row in pq.read_table(ref.dir / QUARANTINE).to_pylist()}
    assert rows[f"{root}/numbers.jsonl:2"].startswith("line 2: Exceeds the limit (4300 digits)")
    assert rows[f"{root}/numbers.jsonl:3"] == "line 3: nested too deep to parse"
    assert rows[f"{root}/damaged.txt.gz"].startswith("error: Error -3 while decompressing data")


def test_a_huge_max_doc_chars_reads_small_files(ws, tmp_path):
    path = write(tmp_path / "small.txt.gz", gzip.compress(b"a small document"))
    ref = run(ws, FilesSource(paths=[str(path), str(write(tmp_path / "small.md", "# small"))]), max_doc_chars=1 << 40)
    assert sorted(texts(ref).values()) == ["# small", "a small document"]


def test_csv_byte_that_is_not_utf8_loses_only_its_row(ws, tmp_path):
    rows = [f"row {number} {'x' * 100}" for number in range(200)]  # past the decoder's 8 KB read-ahead
    rows[150] = "caf\xe9"
    path = write(tmp_path / "rows.csv", b"text,label\n" + b"".join(
        (row.encode("latin-1") if number == 150 else row.encode()) + b",y\n" for number, row in enumerate(rows)
    ))  # fmt: skip

    ref = run(ws, FilesSource(paths=[str(path)]))

    assert texts(ref) == {f"{path}:{number + 2}": row for number, row in enumerate(rows) if number != 150}
    [bad] = pq.read_table(ref.dir / QUARANTINE).to_pylist()
    assert (bad["origin"], bad["reason"]) == (f"{path}:152", "invalid-utf8")
    assert bad["detail"] == "line 152: byte 0xe9 is not UTF-8"
    assert bad["sample"] == "caf\ufffd"


@pytest.mark.parametrize("fmt", ["jsonl", "json"])
def test_records_without_text_field_are_quarantined_even_first(ws, tmp_path, fmt):
    records = [{"title": "no text"}, {"title": "nor here"}, {"text": "kept"}, {"title": "later"}]
    data = json.dumps(records) if fmt == "json" else jsonl(*records)
    path = write(tmp_path / f"rows.{fmt}", data)

    ref = run(ws, FilesSource(paths=[str(path)]))

    origin = (lambda row: f"{path}#{row}") if fmt == "json" else (lambda row: f"{path}:{row + 1}")
    assert texts(ref) == {origin(2): "kept"}
    assert quarantined(ref) == {origin(0): "missing-field", origin(1): "missing-field", origin(3): "missing-field"}


def test_text_field_absent_from_the_first_records_stops_the_stage(ws, tmp_path, monkeypatch):
    monkeypatch.setattr("tasks.collect.FIELD_PROBE", 3)
    path = write(tmp_path / "rows.jsonl", jsonl(*[{"body": "b"}] * 3, {"text": "too late to tell"}))
    with pytest.raises(StageError, match=r"rows\.jsonl: no field 'text'; fields there: body\."):
        run(ws, FilesSource(paths=[str(path)]))


def test_a_table_without_text_field_beside_ones_with_it_is_quarantined(ws, tmp_path):
    """In a folder of several tables, one with other columns is bad input, not a wrong setting."""
    root = tmp_path / "mixed"
    write(root / "a.jsonl", jsonl({"text": "kept"}))
    write(root / "b.csv", "x,y\n1,2\n")
    write(root / "c.txt", "plain text")
    write(root / "d.jsonl", "not json\n" + jsonl({"body": "x"}))  # one row for the file, not one more per line
    write(root / "e.jsonl", "not json\n" + jsonl({"text": "after a bad line"}))
    ref = run(ws, FilesSource(paths=[str(root)]))
    assert texts(ref) == {f"{root}/a.jsonl:1": "kept", f"{root}/c.txt": "plain text",
                          f"{root}/e.jsonl:2": "after a bad line"}
    assert quarantined(ref) == {f"{root}/b.csv": "missing-field", f"{root}/d.jsonl": "missing-field",
                                f"{root}/e.jsonl:1": "malformed-json"}
    assert ref.counts["quarantined"] == 3
    rows = {row["origin"]: row["detail"] for row in pq.read_table(ref.dir / QUARANTINE).to_pylist()}
    assert rows[f"{root}/b.csv"] == "no field 'text' in its records; fields there: x, y"
    for name in ("d.jsonl", "e.jsonl"):
        (root / name).unlink()
    (root / "a.jsonl").unlink()  # no table has it: the setting is what is wrong
    with pytest.raises(StageError, match=r"b\.csv: no field 'text'; fields there: x, y\. Set text_field"):
        run(ws, FilesSource(paths=[str(root)]))


def test_linked_folders_are_followed_each_real_folder_once(ws, tmp_path):
    shared = write(tmp_path / "shared" / "notes.txt", "shared notes").parent
    root = tmp_path / "corpus"
    write(root / "own.txt", "own")
    (root / "linked").symlink_to(shared, target_is_directory=True)
    (root / "linked-again").symlink_to(shared, target_is_directory=True)
    (root / "loop").symlink_to(root, target_is_directory=True)

    assert texts(run(ws, FilesSource(paths=[str(root)]))) == {
        f"{root}/linked/notes.txt": "shared notes",
        f"{root}/own.txt": "own",
    }


def test_quarantine_table_exists_and_is_empty_for_clean_input(ws, tmp_path):
    ref = run(ws, FilesSource(paths=[str(write(tmp_path / "a.txt", "fine"))]))
    table = pq.read_table(ref.dir / QUARANTINE)
    assert table.num_rows == 0
    assert table.column_names == ["source", "origin", "reason", "detail", "sample"]


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet", "hf"])
def test_missing_text_field_names_the_fields_that_exist(ws, tmp_path, fmt):
    rows = {"body": ["hello"], "title": ["t"]}
    path = tmp_path / f"data.{fmt}"
    if fmt == "jsonl":
        write(path, jsonl({"body": "hello", "title": "t"}))
    elif fmt == "csv":
        write(path, "body,title\nhello,t\n")
    elif fmt == "parquet":
        pq.write_table(pa.table(rows), path)
    else:
        datasets.Dataset.from_dict(rows).save_to_disk(str(path))
    source = HFSource(path=str(path)) if fmt == "hf" else FilesSource(paths=[str(path)])

    with pytest.raises(StageError, match=r"no field 'text'; fields there: body, title"):
        run(ws, source)


def test_user_errors_are_one_clear_line(ws, tmp_path, monkeypatch):
    missing = tmp_path / "nowhere" / "corpus.txt"
    with pytest.raises(StageError, match=f"input path does not exist: {missing}"):
        run(ws, FilesSource(paths=[str(missing)]))
    with pytest.raises(StageError, match=r"unsupported file type: .*notes\.pdf; supported: \.txt, \.md"):
        run(ws, FilesSource(paths=[str(write(tmp_path / "notes.pdf", "%PDF"))]))
    with pytest.raises(StageError, match=r"no files match"):
        run(ws, FilesSource(paths=[str(tmp_path / "*.nothing")]))
    with pytest.raises(StageError, match=r"no documents collected; quarantined by reason: empty \(1\)$"):
        run(ws, FilesSource(paths=[str(write(tmp_path / "empty.txt", ""))]))
    (tmp_path / "no-files").mkdir()
    with pytest.raises(StageError, match=r"no documents collected: the sources hold no files or records$"):
        run(ws, FilesSource(paths=[str(tmp_path / "no-files")]))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StageError, match=rf"input path does not exist: corpus \(relative to the current directory: "
                                         rf"{tmp_path / 'corpus'}\)"):
        run(ws, FilesSource(paths=["corpus"]))
    assert not list((ws / "collect").glob("*/manifest.json"))


def test_a_folder_that_cannot_be_listed_stops_the_stage_naming_it(ws, tmp_path, monkeypatch):
    write(tmp_path / "in" / "a.txt", "readable")
    write(tmp_path / "in" / "locked" / "b.txt", "behind a folder without permission")
    scandir = os.scandir

    def refusing(path="."):  # as for a folder of another user without read permission
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refusing)
    with pytest.raises(StageError, match=r"in/locked: cannot list this folder \(Permission denied\); make it readable"):
        run(ws, FilesSource(paths=[str(tmp_path / "in")]))


def test_huge_document_is_quarantined_as_too_long(ws, tmp_path):
    write(tmp_path / "in" / "big.jsonl", jsonl({"text": "before"}, {"text": "y" * BIG}, {"text": "after"}))
    write(tmp_path / "in" / "big.txt", "x" * BIG)

    for limit in (20_000_000, 1000):  # the default, and one small enough to skip the line unread
        ref = run(ws, FilesSource(paths=[str(tmp_path / "in")]), max_doc_chars=limit)
        assert sorted(texts(ref).values()) == ["after", "before"]
        assert set(quarantined(ref).values()) == {"too-long"}
        assert ref.counts["quarantined"] == 2


def test_a_document_at_the_limit_is_kept_whatever_its_record_takes(ws, tmp_path):
    text = "\u4e2d" * 1000  # escaped by json.dumps: 6 bytes a character, 6,000 for the text
    root = tmp_path / "in"
    write(root / "zh.jsonl", jsonl({"text": text, "meta": "m" * 5000}))
    long = "x" * 200_000
    write(root / "rows.csv", f"text\nfirst\n{long}\nafter one\nafter two\n")
    ref = run(ws, FilesSource(paths=[str(root)]), max_doc_chars=1000)
    assert texts(ref) == {f"{root}/zh.jsonl:1": text, f"{root}/rows.csv:2": "first", f"{root}/rows.csv:4": "after one",
                          f"{root}/rows.csv:5": "after two"}
    assert quarantined(ref) == {f"{root}/rows.csv:3": "too-long"}


def test_a_categorical_parquet_text_column_is_text(ws, tmp_path):
    pq.write_table(pa.table({"text": pa.array(["a b", "c d", "a b"]).dictionary_encode()}), tmp_path / "cat.parquet")
    ref = run(ws, FilesSource(paths=[str(tmp_path / "cat.parquet")]))
    assert sorted(texts(ref).values()) == ["a b", "a b", "c d"]


MEMORY_PROBE = """
import resource, sys
from tasks.collect import CollectConfig, FilesSource, collect
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
ref = collect(CollectConfig(sources=[FilesSource(paths=[sys.argv[1]])], max_doc_chars=60_000_000), sys.argv[2])
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(ref.counts["docs"], grown * 1024)
"""


def test_50mb_line_comes_through_in_a_few_times_its_size(tmp_path):
    folder = tmp_path / "in"
    write(folder / "big.txt", "x" * BIG)
    write(folder / "small.jsonl", jsonl({"text": "beside it"}))

    result = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(folder), str(tmp_path / "ws")],
        cwd=REPO_ROOT, capture_output=True, text=True, check=True,
    )  # fmt: skip
    docs, grown = map(int, result.stdout.split())

    assert docs == 2
    assert grown < 4 * BIG


# ---- Hugging Face datasets -----------------------------------------------------------


def test_hf_dataset_saved_to_disk(ws, tmp_path):
    plain = tmp_path / "plain"
    datasets.Dataset.from_dict({"text": ["zero", "one", "", "three"], "n": [0, 1, 2, 3]}).save_to_disk(str(plain))
    splits = tmp_path / "splits"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"body": ["train row"]}),
        "validation": datasets.Dataset.from_dict({"body": ["val zero", "val one", "val two"]}),
    }).save_to_disk(str(splits))  # fmt: skip

    ref = run(
        ws,
        HFSource(name="plain", path=str(plain)),
        HFSource(name="val", path=str(splits), split="validation", text_field="body", max_docs=2),
    )

    assert texts(ref) == {f"{plain}#0": "zero", f"{plain}#1": "one", f"{plain}#3": "three",
                          f"{splits}:validation#0": "val zero", f"{splits}:validation#1": "val one"}  # fmt: skip
    assert quarantined(ref) == {f"{plain}#2": "empty"}
    assert ref.manifest()["sources"] == {"plain": {"docs": 3, "bytes": 12, "quarantined": 1},
                                         "val": {"docs": 2, "bytes": 15, "quarantined": 0}}  # fmt: skip
    with pytest.raises(StageError, match=r"has no split 'test'; splits: train, validation"):
        run(ws, HFSource(path=str(splits), split="test"))
    with pytest.raises(StageError, match=r"is not a dataset written by save_to_disk"):
        run(ws, HFSource(path=str(tmp_path)))


def test_hf_hub_dataset_unavailable_offline_is_a_clear_error(ws, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # as the CLI runs unless told otherwise
    with pytest.raises(StageError, match=r"cannot open dataset no-such-user/no-such-dataset:train.*"
                                         r"set HF_HUB_OFFLINE=0 and HF_DATASETS_OFFLINE=0"):
        run(ws, HFSource(path="no-such-user/no-such-dataset"))


# ---- URLs ----------------------------------------------------------------------------


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder; answers 503 to the next `failures[path]` requests for a path, and
    sends the paths in `unsized` with a Content-Length header that is no number."""

    def do_GET(self):
        self.server.requests.append(self.path)
        if self.server.failures.get(self.path, 0):
            self.server.failures[self.path] -= 1
            self.send_error(503)
            return
        if self.path in self.server.unsized:
            self.send_response(200)
            self.send_header("Content-Length", "\u00b2")  # a digit to str.isdigit, none to int()
            self.end_headers()
            self.wfile.write((Path(self.directory) / self.path.lstrip("/")).read_bytes())
            return
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    folder = tmp_path / "www"
    folder.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(folder)))
    httpd.requests, httpd.failures, httpd.unsized = [], {}, set()
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield SimpleNamespace(folder=folder, url=f"http://127.0.0.1:{httpd.server_port}", httpd=httpd)
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def test_url_text_and_jsonl(ws, server):
    write(server.folder / "book", "a plain-text book")
    write(server.folder / "rows.jsonl.gz", gzip.compress(jsonl({"text": "row one"}, {"text": "row two"}).encode()))
    book, rows = f"{server.url}/book", f"{server.url}/rows.jsonl.gz"

    ref = run(ws, UrlSource(urls=[book, rows]))

    assert texts(ref) == {book: "a plain-text book", f"{rows}:1": "row one", f"{rows}:2": "row two"}
    assert not [path for path in ref.dir.rglob("*") if "downloads" in str(path)]


def test_url_retries_transient_errors(ws, server):
    write(server.folder / "flaky.txt", "worth the wait")
    server.httpd.failures["/flaky.txt"] = 2

    ref = run(ws, UrlSource(urls=[f"{server.url}/flaky.txt"], retries=2, backoff_s=0))

    assert list(texts(ref).values()) == ["worth the wait"]
    assert server.httpd.requests == ["/flaky.txt"] * 3


def test_url_client_error_is_not_retried(ws, server):
    with pytest.raises(StageError, match=rf"cannot fetch {server.url}/missing.txt: HTTP 404"):
        run(ws, UrlSource(urls=[f"{server.url}/missing.txt"], retries=3, backoff_s=0))
    assert server.httpd.requests == ["/missing.txt"]


def test_unreachable_url_fails_after_retries_naming_it(ws):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/corpus.txt"

    with pytest.raises(StageError, match=rf"cannot fetch {url} after 3 attempts: .*refused"):
        run(ws, UrlSource(urls=[url], retries=2, backoff_s=0))


def test_url_over_max_bytes_is_quarantined(ws, server):
    write(server.folder / "big.txt", "z" * 5000)
    write(server.folder / "small.txt", "fits")

    ref = run(ws, UrlSource(urls=[f"{server.url}/big.txt", f"{server.url}/small.txt"], max_bytes=1000))

    assert texts(ref) == {f"{server.url}/small.txt": "fits"}
    assert quarantined(ref) == {f"{server.url}/big.txt": "too-large"}
    server.httpd.unsized |= {"/big.txt", "/small.txt"}  # the size is then counted as the body comes
    ref = run(ws, UrlSource(urls=[f"{server.url}/big.txt", f"{server.url}/small.txt"], max_bytes=1000), refresh=1)
    assert texts(ref) == {f"{server.url}/small.txt": "fits"}
    assert quarantined(ref) == {f"{server.url}/big.txt": "too-large"}


# ---- stage contract ------------------------------------------------------------------


def test_second_run_is_a_cache_hit(ws, tmp_path):
    source = FilesSource(paths=[str(write(tmp_path / "a.txt", "same"))])
    first = run(ws, source)
    second = run(ws, source)
    assert not first.cached and second.cached
    assert second.model_copy(update={"cached": False}) == first
    assert second.manifest()["started"] == first.manifest()["started"]
    assert len(list((ws / "collect").iterdir())) == 2  # the output and its lock file


def test_changed_input_file_recollects(ws, tmp_path):
    path = write(tmp_path / "a.txt", "version one")
    source = FilesSource(paths=[str(path)])
    first = run(ws, source)

    write(path, "version two, longer")
    second = run(ws, source)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    third = run(ws, source)

    assert len({first.fingerprint, second.fingerprint, third.fingerprint}) == 3
    assert list(texts(second).values()) == ["version two, longer"]


def test_shards_roll_over_and_stream_in_order(ws, tmp_path):
    for n in range(5):
        write(tmp_path / "docs" / f"{n}.txt", f"document {n}")

    ref = run(ws, FilesSource(name="notes", paths=[str(tmp_path / "docs")]), shard_docs=2)

    assert [path.name for path in shard_paths(ref)] == ["shard-00000.parquet", "shard-00001.parquet",
                                                        "shard-00002.parquet"]  # fmt: skip
    assert [pq.read_metadata(path).num_rows for path in shard_paths(ref)] == [2, 2, 1]
    docs = list(iter_documents(ref, batch_size=1))
    assert [doc["text"] for doc in docs] == [f"document {n}" for n in range(5)]
    origin = str(tmp_path / "docs" / "0.txt")
    assert docs[0] == {"id": hashlib.sha1(f"notes\0{origin}".encode()).hexdigest()[:20], "text": "document 0",
                       "source": "notes", "origin": origin}  # fmt: skip
    assert ref.counts == {"docs": 5, "bytes": 50, "shards": 3, "quarantined": 0}


def test_documents_are_named_alike_however_their_path_is_spelled(ws, tmp_path, monkeypatch):
    """Ids (and so the split) come from the files' absolute paths, and a file two entries name is read once."""
    for n in range(3):
        write(tmp_path / "docs" / f"{n}.txt", f"document {n}")
    monkeypatch.chdir(tmp_path)
    spellings = [["docs"], ["./docs/", "docs/1.txt"], [str(tmp_path / "docs")], ["../" + tmp_path.name + "/docs/*.txt"]]
    seen = []
    for paths in spellings:
        ref = run(ws, FilesSource(name="notes", paths=paths))
        seen.append([(doc["id"], doc["origin"]) for doc in iter_documents(ref)])
    assert seen[0] == seen[1] == seen[2] == seen[3]
    assert [origin for _, origin in seen[0]] == [str(tmp_path / "docs" / f"{n}.txt") for n in range(3)]


def test_config_validation():
    assert [source.kind for source in CollectConfig().sources] == ["stdlib"]
    with pytest.raises(ValidationError, match="source names must be unique"):
        CollectConfig(sources=[FilesSource(paths=["a"]), FilesSource(paths=["b"])])
    with pytest.raises(ValidationError):
        UrlSource(urls=["ftp://example.com/file.txt"])
    for url, reason in [("http://[::1/x.txt", "not a valid URL: Invalid IPv6 URL"),
                        ("https://example.com:99999/x", "not a valid URL: Port out of range"),
                        ("http://exa mple.com/x", "space or control character; percent-encode it"),
                        ("http:///x.txt", "names no host")]:  # fmt: skip
        with pytest.raises(ValidationError, match=re.escape(reason)):
            UrlSource(urls=[url])
    assert UrlSource(urls=["http://example.com/a%20b.txt"]).urls == ["http://example.com/a%20b.txt"]
    with pytest.raises(ValidationError):
        CollectConfig(shard_size=10)
    parsed = CollectConfig.model_validate({"sources": [{"kind": "files", "paths": ["x"]}, {"kind": "stdlib"}]})
    assert [type(source) for source in parsed.sources] == [FilesSource, StdlibSource]
