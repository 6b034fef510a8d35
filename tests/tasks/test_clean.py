"""The clean stage: normalisation, filters, PII scrubbing, dedup, decontamination, outputs."""

from __future__ import annotations

import ast
import functools
import random
import sysconfig
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks import clean as clean_module
from tasks.clean import (
    FILTERS,
    SAMPLE_CHARS,
    CleanConfig,
    clean,
    drop_reasons,
    normalize,
    quality_failures,
    quarantine,
    scrub_pii,
    split_note,
    split_of,
)
from tasks.dedup import NearDuplicates, Words, minhash
from tasks.stage import Ref, StageError

LINES = [
    "The quick brown fox jumps over a lazy dog near the river bank.",
    "Engineers write careful documentation so that other people can use their tools.",
    "Small language models learn grammar from clean text with very few errors.",
    "Every morning she walks to the market and buys fresh bread for breakfast.",
    "Rain fell on the quiet village while children played games inside their homes.",
    "A good compiler reports errors early and explains how to fix them.",
    "Old maps show roads that no longer exist between the northern towns.",
    "Gardeners plant tomatoes in spring when the soil becomes warm enough.",
]
BASE = "\n".join(LINES[:4])
STDLIB_MODULES = [
    "turtle.py", "_pydecimal.py", "typing.py", "doctest.py", "difflib.py", "logging/__init__.py",
    "inspect.py", "_pyio.py", "statistics.py", "threading.py", "tkinter/__init__.py", "unittest/mock.py",
    "ipaddress.py", "xml/etree/ElementTree.py", "email/message.py", "tarfile.py", "codecs.py",
]  # fmt: skip


def write_collect(directory: Path, docs: list[tuple[str, str]], shards: int = 1) -> Ref:
    """A collect-stage output: `shards` Parquet shards of (id, text, source, origin)."""
    directory.mkdir(parents=True, exist_ok=True)
    for index in range(shards):
        part = docs[index::shards]
        table = pa.table(
            {
                "id": [doc_id for doc_id, _ in part],
                "text": [text for _, text in part],
                "source": ["test"] * len(part),
                "origin": [f"memory:{doc_id}" for doc_id, _ in part],
            }
        )
        pq.write_table(table, directory / f"shard-{index:05d}.parquet")
    return Ref(stage="collect", path=str(directory), fingerprint=f"test-{directory.name}", counts={})


def output(ref: Ref) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(path) for path in sorted(ref.dir.glob("shard-*.parquet"))], ignore_index=True)


@functools.cache
def stdlib_words() -> list[str]:
    """The words of the docstrings of a few large standard-library modules, in order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    words: list[str] = []
    for name in STDLIB_MODULES:
        path = root / name
        if path.exists():
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    words += (ast.get_docstring(node) or "").split()
    return words


def good_docs(count: int, words_per_doc: int = 150) -> list[str]:
    """Distinct real-ish documents: stretches of stdlib docstring text sharing no 8-word span."""
    words, seen, docs = stdlib_words(), set(), []
    for start in range(0, len(words) - words_per_doc, words_per_doc):
        doc = " ".join(words[start : start + words_per_doc])
        tokens = Words(doc).tokens
        grams = {tuple(tokens[i : i + 8]) for i in range(len(tokens) - 7)}
        if not grams & seen:
            docs.append(doc)
            seen |= grams
        if len(docs) == count:
            return docs
    raise AssertionError(f"only {len(docs)} distinct stretches of stdlib docstrings")


# --- normalisation and PII ------------------------------------------------------------


def test_normalize_unicode_controls_and_whitespace():
    raw = "Cafe\u0301\x00 bar\x07\r\n\tindented  and   spaced   \n\n\n\n\n\n  keep indent\u00a0here\x1b"
    assert normalize(raw) == "Café bar\n\tindented and spaced\n\n\n  keep indent here"


def test_normalize_is_idempotent():
    text = normalize("a  b \n\n\n\n\nc\u2028d")
    assert normalize(text) == text


def test_scrub_pii_replaces_and_counts():
    text = (
        "Mail jane.doe@example.com or ops@mail.example.org; hosts 192.168.0.1 and 10.0.0.255, "
        "v6 2001:db8::8a2e:370:7334 and fe80::1."
    )
    scrubbed, counts = scrub_pii(text)
    assert scrubbed == "Mail <EMAIL> or <EMAIL>; hosts <IP> and <IP>, v6 <IP> and <IP>."
    assert counts == {"email": 2, "ip": 4}


def test_scrub_pii_leaves_lookalikes_alone():
    text = ("@property\nversion 3.11, 999.1.1.1, at 12:30:45, slice a[1::2], data[4096::16], buf[1024::2], "
            "C++ std::vector, e.g.::")
    assert scrub_pii(text) == (text, {"email": 0, "ip": 0})


def test_scrub_pii_finds_addresses_inside_long_runs_of_their_characters():
    """The patterns are bounded as addresses are: a long run of such characters (a percent-
    encoded URL) costs a bounded scan per position, and the address in it is still found."""
    url = "https://example.org/" + "%E4%B8%AD" * 2000
    text = f"{url} mail john.doe+x@mail.example.co.uk and 2001:db8::1 or 2001::10:20\tend\t\t\t\nnext"
    assert scrub_pii(text) == (f"{url} mail <EMAIL> and <IP> or <IP>\tend\t\t\t\nnext", {"email": 1, "ip": 2})
    assert normalize("a" + "\t" * 5000 + "b  \t\nc") == "a" + "\t" * 5000 + "b\nc"


# --- quality filters --------------------------------------------------------------------


def repeated(gram: str, fillers: int, reps: int = 10) -> str:
    """`gram` followed by `fillers` distinct words, `reps` times: only `gram`'s n-grams repeat."""
    out = []
    for rep in range(reps):
        out.append(" ".join([gram] + [f"w{rep:01d}{i:02d}" for i in range(fillers)]))
    return "The " + " ".join(out)


FILTER_CASES = {
    "too_short": ("Birds sing songs of the bright morning sun", {}),
    "too_long": (BASE, {"max_chars": 100}),
    "too_few_words": ("The beautiful butterflies gathered around the flowers", {}),
    "short_words": ("to be or go an if in on at by my up so no we he it is do as of me us am ox", {}),
    "long_words": (
        "the internationalization of electroencephalographs counterrevolutionary uncharacteristically "
        "incomprehensibilities telecommunications misinterpretations disproportionately compartmentalization",
        {},
    ),
    "symbols": (BASE + " #alpha #beta #gamma #delta #epsilon #zeta", {}),
    "non_alpha_words": (BASE + " " + " ".join(str(1000 + 7 * i) for i in range(25)), {}),
    "few_stop_words": (
        "Quick brown foxes jump over lazy dogs while birds sing loudly in tall green trees near quiet rivers.",
        {},
    ),
    "bullet_lines": ("\n".join(f"- {line}" for line in LINES[:4]), {}),
    "ellipsis_lines": ("\n".join(line[:-1] + "..." if i % 2 else line for i, line in enumerate(LINES[:4])), {}),
    "duplicate_lines": ("\n".join(f"{line}\nYes." for line in LINES[:4]) + "\nYes.", {}),
    "duplicate_line_chars": (
        "\n".join([LINES[4] + " " + LINES[5]] * 3 + [f"Short note {i} about the day." for i in range(8)]),
        {},
    ),
    "duplicate_paragraphs": (
        "\n\n".join(f"Note.\n\n{LINES[2 * i]}\n{LINES[2 * i + 1]}" for i in range(4)) + "\n\nNote.",
        {},
    ),
    # A repeated paragraph is repeated lines too; relax the line filter to see the paragraph one alone.
    "duplicate_paragraph_chars": (
        "\n\n".join([f"{LINES[4]}\n{LINES[5]}", "Tea is hot.", f"{LINES[4]}\n{LINES[5]}", "Snow is cold."]),
        {"max_duplicate_line_char_fraction": 1.0},
    ),
    "top_2gram": (repeated("red fox", 2), {}),
    "top_3gram": (repeated("red fox ran", 3), {}),
    "top_4gram": (repeated("red fox ran far", 7), {}),
}


def test_every_filter_has_a_case():
    assert set(FILTER_CASES) == set(FILTERS)


def test_base_document_passes():
    assert quality_failures("\n".join(LINES), CleanConfig()) == []


@pytest.mark.parametrize("reason", list(FILTER_CASES))
def test_filter_trips_alone(reason):
    text, overrides = FILTER_CASES[reason]
    failures = quality_failures(normalize(text), CleanConfig(**overrides))
    assert [name for name, _ in failures] == [reason], failures


def test_junk_dropped_and_docstrings_kept():
    rng = random.Random(0)
    junk = {
        "symbols": " ".join("".join(rng.choice("#$%^&*()[]{}<>!?~|") for _ in range(6)) for _ in range(60)),
        "repeated_lines": "\n".join(["BUY NOW click here to win"] * 30),
        "keyboard_mash": " ".join(
            "".join(rng.choice("asdfghjklqwertyuiopzxcvbnm") for _ in range(rng.randint(3, 9))) for _ in range(80)
        ),
    }
    for name, text in junk.items():
        assert quality_failures(normalize(text), CleanConfig()), name
    docs = good_docs(60)
    kept = [doc for doc in docs if not quality_failures(normalize(doc), CleanConfig())]
    assert len(kept) >= 0.9 * len(docs)  # the drops are stretches of repetitive doctest output


# --- split ------------------------------------------------------------------------------


def test_split_is_stable_and_proportional():
    ids = [f"doc-{i}" for i in range(4000)]
    splits = [split_of(doc_id, 0.1) for doc_id in ids]
    assert splits == [split_of(doc_id, 0.1) for doc_id in ids]
    assert 0.08 < splits.count("validation") / len(ids) < 0.12
    assert {split_of(doc_id, 0.0) for doc_id in ids} == {"train"}


@pytest.mark.parametrize(
    "train, validation, note",
    [((95_000, 30), (5_000, 2), None),  # 5% of the tokens, as asked
     ((98_000, 30), (2_000, 1), None),  # 2%: within three times less
     ((48_000, 27), (43_000, 1), "the validation split holds 47.3% of the tokens (1 of 28 documents) for "
                                 "val_fraction=0.05: documents are split whole"),
     ((99_900, 30), (100, 1), "holds 0.1% of the tokens (1 of 31 documents)"),
     ((90_000, 9), (0, 0), "no document of 9 fell into the validation split (val_fraction=0.05)")],
)  # fmt: skip
def test_a_validation_split_far_from_val_fraction_is_noted(train, validation, note):
    counts = {"train_tokens": train[0], "train_documents": train[1], "validation_tokens": validation[0],
              "validation_documents": validation[1]}
    said = split_note(0.05, counts)
    assert said is None if note is None else note in said
    assert split_note(0.0, {**counts, "validation_tokens": 0, "validation_documents": 0}) is None  # none asked


# --- near-duplicates --------------------------------------------------------------------


def shingles(text: str, k: int) -> set[tuple[str, ...]]:
    tokens = Words(text).tokens
    return {tuple(tokens[i : i + k]) for i in range(len(tokens) - k + 1)}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b)


def edited(text: str, rng: random.Random, replace: int, delete: int) -> str:
    words = text.split()
    for _ in range(replace):
        words[rng.randrange(len(words))] = f"edit{rng.randrange(10**6)}"
    for _ in range(delete):
        del words[rng.randrange(len(words))]
    return " ".join(words)


def test_near_duplicates_recall_and_precision():
    config = CleanConfig()
    rng = random.Random(1)
    base = good_docs(200)
    light = [edited(doc, rng, replace=1, delete=1) for doc in base[:100]]  # ~1% of words edited
    heavy = [edited(doc, rng, replace=50, delete=10) for doc in base[100:150]]  # a quarter edited
    docs = base + light + heavy
    rng.shuffle(docs)
    sets = [shingles(doc, config.shingle_words) for doc in docs]
    threshold = config.near_dup_threshold
    truth = {i for i in range(len(docs)) if any(jaccard(sets[i], sets[j]) >= threshold for j in range(i))}
    assert len(truth) >= 95  # the planted light copies (a copy may come before its original)

    index = NearDuplicates(config.near_dup_threshold, config.num_perm)
    found = set()
    for i, doc in enumerate(docs):
        signature = minhash(Words(doc), config.shingle_words, config.num_perm, config.minhash_seed)
        if index.check(str(i), signature):
            found.add(i)
    hits = len(found & truth)
    assert hits / len(truth) >= 0.95, (hits, len(truth))
    assert hits / len(found) >= 0.95, (hits, len(found))


# --- the stage --------------------------------------------------------------------------


@pytest.fixture
def corpus():
    return [(f"doc-{i}", text) for i, text in enumerate(good_docs(40, 120))]


def test_stage_outputs_manifest_and_quarantine(ws, tmp_path, corpus):
    dup_id, dup_text = corpus[3]
    docs = corpus + [
        ("exact-copy", dup_text.replace(" ", "  ") + "   \n"),  # the same once normalised
        ("near-copy", edited(dup_text, random.Random(2), replace=1, delete=0)),
        ("junk", "\n".join(["BUY NOW click here to win"] * 30)),
        ("pii", "\n".join(LINES) + "\nContact admin@example.com from 10.1.2.3."),
    ]
    ref = clean(write_collect(tmp_path / "collect", docs), CleanConfig(val_fraction=0.2), ws)
    manifest = ref.manifest()
    counts = manifest["counts"]
    assert counts["docs_in"] == len(docs)
    assert counts["docs_out"] + counts["dropped"] == len(docs)
    assert counts["dropped"] == sum(manifest["drop_reasons"].values())
    assert manifest["drop_reasons"]["exact_duplicate"] == 1
    assert manifest["drop_reasons"]["near_duplicate"] == 1
    assert manifest["pii_replacements"] == {"email": 1, "ip": 1}

    table = output(ref)
    assert counts["docs_out"] == len(table)
    assert counts["bytes_out"] == sum(len(text.encode()) for text in table["text"])
    assert {"id", "text", "source", "origin", "split"} <= set(table.columns)
    assert set(table["id"]).isdisjoint({"exact-copy", "near-copy", "junk"})
    assert (table["split"] == [split_of(doc_id, 0.2) for doc_id in table["id"]]).all()
    assert "admin@example.com" not in "".join(table["text"])
    assert manifest["splits"]["validation"]["documents"] == (table["split"] == "validation").sum()

    samples = quarantine(ref)
    assert list(samples.columns) == ["id", "source", "reason", "detail", "text"]
    by_id = samples.set_index("id")
    assert by_id.loc["near-copy", "reason"] == "near_duplicate"
    assert dup_id in by_id.loc["near-copy", "detail"]
    assert by_id.loc["junk", "reason"] == "duplicate_lines"
    assert by_id.loc["exact-copy", "detail"] == f"same normalised text as document {dup_id}"
    reasons = drop_reasons(ref)
    assert dict(zip(reasons["reason"], reasons["documents"])) == manifest["drop_reasons"]


def test_quarantine_keeps_a_bounded_sample(ws, tmp_path):
    long = "\n".join(LINES * 30)
    docs = [(f"short-{i}", f"Too short {i}.") for i in range(30)] + [("ok", "\n".join(LINES)), ("long", long)]
    config = CleanConfig(quarantine_samples=5, val_fraction=0, max_chars=SAMPLE_CHARS)
    ref = clean(write_collect(tmp_path / "collect", docs), config, ws)
    assert ref.manifest()["drop_reasons"] == {"too_short": 30, "too_long": 1}
    samples = quarantine(ref).set_index("id")
    assert len(samples) == 6
    assert samples.loc["long", "text"] == long[:SAMPLE_CHARS]  # each sample is bounded too
    assert samples.loc["long", "detail"].endswith(f"; text cut to its first {SAMPLE_CHARS:,} of {len(long):,} characters")


def test_decontamination(ws, tmp_path, corpus):
    eval_text = corpus[0][1]  # held out: its 13-grams must not reach training
    span = " ".join(eval_text.split()[20:33])  # 13 words of it
    short_eval = "Reverse the words of this short sentence"  # 7 words: matched as a whole phrase
    with_address = "Write to alice@example.com from 10.0.0.7 about it"  # scrubbed in documents
    docs = [
        ("has-span", corpus[1][1] + " " + span + " " + corpus[2][1]),
        ("has-12", corpus[3][1] + " " + " ".join(span.split()[:12]) + " " + corpus[4][1]),
        ("has-phrase", corpus[5][1] + " so reverse the words of this short sentence now"),
        ("clean", corpus[6][1]),
        ("has-address", corpus[7][1] + " then write to alice@example.com from 10.0.0.7 about it."),
    ]
    upstream = write_collect(tmp_path / "collect", docs)
    ref = clean(upstream, CleanConfig(val_fraction=0), ws, eval_texts=[eval_text, short_eval, with_address])
    samples = quarantine(ref).set_index("id")
    assert set(samples.index) == {"has-span", "has-phrase", "has-address"}
    assert (samples["reason"] == "contaminated").all()
    assert set(output(ref)["id"]) == {"has-12", "clean"}


def test_a_validation_document_that_clean_drops_decontaminates_nothing(ws, tmp_path, corpus):
    span = ("Quartz lanterns guided weary sailors past jagged cliffs while distant bells echoed across the silent "
            "harbor every winter night again")  # 20 words found nowhere else
    val = next(f"v{i}" for i in range(100) if split_of(f"v{i}", 0.3) == "validation")
    train = next(f"t{i}" for i in range(100) if split_of(f"t{i}", 0.3) == "train")
    docs = corpus + [(val, "\n".join([span] * 30)), (train, corpus[7][1][:300] + " " + span)]
    ref = clean(write_collect(tmp_path / "collect", docs), CleanConfig(val_fraction=0.3), ws)
    samples = quarantine(ref).set_index("id")
    assert val in samples.index and samples.loc[val, "reason"] != "contaminated"  # a quality filter's
    assert train in set(output(ref)["id"])  # no kept validation document holds its span


def test_train_documents_overlapping_validation_are_dropped(ws, tmp_path, corpus):
    config = CleanConfig(val_fraction=0.3)
    val = next((doc_id, text) for doc_id, text in corpus if split_of(doc_id, 0.3) == "validation")
    span = " ".join(val[1].split()[40:60])
    overlapping = next(f"x{i}" for i in range(100) if split_of(f"x{i}", 0.3) == "train")
    docs = corpus + [(overlapping, corpus[7][1][:300] + " " + span)]
    ref = clean(write_collect(tmp_path / "collect", docs), config, ws)
    samples = quarantine(ref).set_index("id")
    assert list(samples.index[samples["reason"] == "contaminated"]) == [overlapping]
    assert samples.loc[overlapping, "detail"].endswith("the validation split")
    kept = set(output(ref)["id"])
    assert val[0] in kept and overlapping not in kept


def test_empty_result_names_the_filters(ws, tmp_path):
    docs = [("a", "tiny"), ("b", "also tiny"), ("c", "\n".join(["same line here again and again"] * 20))]
    with pytest.raises(StageError) as error:
        clean(write_collect(tmp_path / "collect", docs), CleanConfig(), ws)
    assert "too_short 2 (clean.min_chars)" in str(error.value)
    assert "duplicate_lines 1 (clean.max_duplicate_line_fraction)" in str(error.value)
    assert not (ws / "clean").exists() or not any(p for p in (ws / "clean").iterdir() if not p.name.startswith("."))


def test_missing_shards_is_a_stage_error(ws, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(StageError, match="no shard"):
        clean(Ref(stage="collect", path=str(tmp_path / "empty"), fingerprint="x"), CleanConfig(), ws)


def test_rerun_is_cached_and_config_changes_fingerprint(ws, tmp_path, corpus):
    upstream = write_collect(tmp_path / "collect", corpus)
    first = clean(upstream, CleanConfig(), ws)
    manifest = first.manifest()
    again = clean(upstream, CleanConfig(workers=3), ws)  # workers never change the output
    assert again.cached and not first.cached
    assert (again.fingerprint, again.path, again.manifest()) == (first.fingerprint, first.path, manifest)
    assert clean(upstream, CleanConfig(min_words=9), ws).fingerprint != first.fingerprint
    other_eval = clean(upstream, CleanConfig(), ws, eval_texts=["held out"])
    assert other_eval.fingerprint != first.fingerprint
    # it drops nothing, so what follows keys on the same content; a text that decontaminates does not
    assert other_eval.key == first.key == first.content_hash
    assert clean(upstream, CleanConfig(), ws, eval_texts=[corpus[0][1]]).key != first.key


def test_parallel_workers_give_the_same_output(ws, tmp_path, corpus, monkeypatch):
    upstream = write_collect(tmp_path / "collect", corpus + [("copy", corpus[0][1])], shards=3)
    serial = clean(upstream, CleanConfig(), ws / "serial")
    monkeypatch.setattr(clean_module, "PARALLEL_MIN_BYTES", 0)
    parallel = clean(upstream, CleanConfig(workers=2), ws / "parallel")
    assert parallel.manifest()["workers"] == 2 and serial.manifest()["workers"] == 1
    assert parallel.fingerprint == serial.fingerprint and parallel.key == serial.key
    assert output(parallel).equals(output(serial))
    assert parallel.manifest()["drop_reasons"] == serial.manifest()["drop_reasons"]
