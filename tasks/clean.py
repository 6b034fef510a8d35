"""The clean stage: normalise, filter, scrub, deduplicate and decontaminate documents.

A pretraining corpus is only as good as what survives this stage. Every document is
normalised (Unicode NFC, control characters removed, whitespace tidied), judged by
Gopher-style quality heuristics, scrubbed of e-mail and IP addresses, and dropped if
it repeats an earlier document exactly or nearly (MinHash LSH), or shares a long word
span with text we evaluate on (the validation split and the held-out instruction
sets). Each drop is counted by reason, and a few samples per reason are kept in
`quarantine.parquet`, so thresholds can be judged by looking at what they remove.

The train/validation split is decided here, by a stable hash of the document id, so
that validation documents can be decontaminated against and every later stage sees
the same split (the `split` column).

The input is read in two streaming passes (validation n-grams first, then filtering)
and the output is written shard by shard, one output shard per input shard. The
per-document work runs in worker processes for inputs of 8 MiB or more (so a script
that calls `clean` needs the usual `if __name__ == "__main__":` guard); duplicates are
decided in input order in the main process, so the output never depends on the
number of workers.
"""

from __future__ import annotations

import hashlib
import ipaddress
import multiprocessing
import re
import sys
import unicodedata
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from itertools import filterfalse, repeat
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import rensa
from pydantic import Field

from tasks import dedup
from tasks.dedup import NearDuplicates, Overlap, Words, minhash
from tasks.settings import Settings
from tasks.stage import Ref, StageError, code_version, cpu_cores, fingerprint, run_stage, workspace

QUARANTINE = "quarantine.parquet"
SAMPLE_CHARS = 10_000  # of a quarantined sample: enough to judge a filter by; a too_long one is over max_chars
EMAIL = "<EMAIL>"
IP = "<IP>"
BATCH_ROWS = 256
# Inputs smaller than this are cleaned in-process: starting worker processes would cost more.
PARALLEL_MIN_BYTES = 8 << 20
STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
BULLETS = ("-", "*", "\u2022", "\u2023", "\u25e6", "\u2043")
ELLIPSES = ("...", "\u2026")


class CleanConfig(Settings):
    """Thresholds of the clean stage.

    Quality defaults start from Gopher (Rae et al. 2021) and are loosened where short,
    code-heavy documentation needs it: on the standard-library docstring corpus the stage
    keeps about 85% of the documents and 96% of the text (the drops are mostly one-line
    docstrings), while random symbols, repeated lines and keyboard mash go. There is no
    language filter: no language-identification library with an offline model is a
    dependency.
    """

    min_chars: int = Field(48, ge=0, description="Drop documents shorter than this many characters.")
    max_chars: int = Field(1_000_000, ge=1, description="Drop documents longer than this many characters.")
    min_words: int = Field(8, ge=0, description="Drop documents with fewer whitespace-separated words (Gopher: 50).")
    min_mean_word_length: float = Field(3.0, ge=0, description="Drop documents whose mean word length is below this.")
    max_mean_word_length: float = Field(
        12.0, ge=0, description="Drop documents whose mean word length is above this (Gopher: 10; code has long names)."
    )
    max_symbol_word_ratio: float = Field(
        0.1, ge=0, description="Drop documents with more '#' and ellipsis symbols per word than this."
    )
    min_alpha_word_fraction: float = Field(
        0.7, ge=0, le=1, description="Drop documents where fewer words than this contain a letter (Gopher: 0.8)."
    )
    min_stop_words: int = Field(
        1,
        ge=0,
        description="Drop documents containing fewer distinct English stop words (the, be, to, of, and, that, have, "
        "with; Gopher: 2). Catches keyboard mash and word lists.",
    )
    max_bullet_line_fraction: float = Field(
        0.9, ge=0, le=1, description="Drop documents where more lines than this start with a bullet."
    )
    max_ellipsis_line_fraction: float = Field(
        0.3, ge=0, le=1, description="Drop documents where more lines than this end with an ellipsis."
    )
    max_duplicate_line_fraction: float = Field(
        0.4, ge=0, le=1, description="Drop documents where more lines than this repeat an earlier line (Gopher: 0.3)."
    )
    max_duplicate_line_char_fraction: float = Field(
        0.4, ge=0, le=1, description="Drop documents with more characters than this in repeated lines (Gopher: 0.2)."
    )
    max_duplicate_paragraph_fraction: float = Field(
        0.4, ge=0, le=1, description="Drop documents where more paragraphs than this repeat earlier ones (Gopher: 0.3)."
    )
    max_duplicate_paragraph_char_fraction: float = Field(
        0.4,
        ge=0,
        le=1,
        description="Drop documents with more characters than this in repeated paragraphs (Gopher: 0.2).",
    )
    max_top_2gram_fraction: float = Field(
        0.3, ge=0, le=1, description="Drop documents whose commonest word 2-gram covers more of the text (Gopher: 0.2)."
    )
    max_top_3gram_fraction: float = Field(
        0.28,
        ge=0,
        le=1,
        description="Drop documents whose commonest word 3-gram covers more of the text (Gopher: 0.18).",
    )
    max_top_4gram_fraction: float = Field(
        0.26,
        ge=0,
        le=1,
        description="Drop documents whose commonest word 4-gram covers more of the text (Gopher: 0.16).",
    )
    near_dup_threshold: float = Field(
        0.8, gt=0, le=1, description="Estimated Jaccard similarity of word shingles that makes a near-duplicate."
    )
    shingle_words: int = Field(5, ge=1, description="Words per shingle for near-deduplication.")
    num_perm: int = Field(128, ge=8, le=8192,
                          description="MinHash permutations (signature length) for near-deduplication.")
    minhash_seed: int = Field(42, ge=0, lt=2**64, description="Seed of the MinHash permutations (0 to 2**64 - 1).")
    decontam_ngram: int = Field(
        13, ge=1, description="Drop documents sharing this many consecutive words with validation or evaluation text."
    )
    decontam_min_words: int = Field(
        5,
        ge=1,
        description="Evaluation texts shorter than this many words are ignored by decontamination; longer ones that "
        "are shorter than the n-gram size are matched as whole phrases.",
    )
    val_fraction: float = Field(
        0.05, ge=0, lt=1, description="Fraction of documents (by a stable hash of their id) in the validation split."
    )
    quarantine_samples: int = Field(
        20, ge=0, description="Dropped documents kept per reason in quarantine.parquet, each cut to its first "
        f"{SAMPLE_CHARS:,} characters.")
    workers: int = Field(
        0,
        ge=0,
        description="Processes judging documents in parallel (0: one per CPU core); inputs under 8 MiB use one. "
        "The output does not depend on it.",
    )


# reason -> the config field that bounds it. The field's prefix says which side is
# bounded and the rest names the measure computed by `text_stats`.
FILTERS = {
    "too_short": "min_chars",
    "too_long": "max_chars",
    "too_few_words": "min_words",
    "short_words": "min_mean_word_length",
    "long_words": "max_mean_word_length",
    "symbols": "max_symbol_word_ratio",
    "non_alpha_words": "min_alpha_word_fraction",
    "few_stop_words": "min_stop_words",
    "bullet_lines": "max_bullet_line_fraction",
    "ellipsis_lines": "max_ellipsis_line_fraction",
    "duplicate_lines": "max_duplicate_line_fraction",
    "duplicate_line_chars": "max_duplicate_line_char_fraction",
    "duplicate_paragraphs": "max_duplicate_paragraph_fraction",
    "duplicate_paragraph_chars": "max_duplicate_paragraph_char_fraction",
    "top_2gram": "max_top_2gram_fraction",
    "top_3gram": "max_top_3gram_fraction",
    "top_4gram": "max_top_4gram_fraction",
}

_NEWLINES = str.maketrans({"\r": "\n", "\u2028": "\n", "\u2029": "\n\n"})
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_UNICODE_SPACE = re.compile(r"[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
# a run starts only after a non-blank (the lookbehind): else each of a long run's blanks inside a
# line would start a scan to the run's end, and 20,000 tabs took 2 s
_TRAILING_SPACE = re.compile(r"(?<![ \t])[ \t]+$", re.MULTILINE)
_SPACE_RUN = re.compile(r"  (?<=\S  ) *")  # two or more spaces after a non-space; starts with a literal to be fast
_BLANK_LINES = re.compile(r"\n{4,}")
_LETTER = re.compile(r"[^\W\d_]")
# parts as long as e-mail allows (64 characters before the @, labels of 63): unbounded, each
# position of a long run of such characters (a percent-encoded URL) scanned to the run's end,
# 6 s for a 72,000-character line
_EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63})*\.[A-Za-z]{2,63}\b")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?!\w|\.\d)")
_IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:]|\.\d)")
# Cheap tests (starting with a literal, which `re` scans for quickly) that gate the full patterns.
_IPV4_HINT = re.compile(r"\.\d{1,3}\.\d")
_IPV6_HINT = re.compile(r"::|:[0-9A-Fa-f]{1,4}:[0-9A-Fa-f]{1,4}:")


def split_of(doc_id: str, val_fraction: float) -> Literal["train", "validation"]:
    """The split of a document: a stable hash of its id, the same on every machine and run."""
    bucket = int.from_bytes(hashlib.blake2b(doc_id.encode(), digest_size=8).digest(), "big")
    return "validation" if bucket < val_fraction * 2**64 else "train"


def split_note(val_fraction: float, counts: dict[str, int]) -> str | None:
    """What to know when the validation split (tokenize's `counts`) holds a share of the
    tokens far from `val_fraction` (three times more or less), or nothing: the split is by
    whole documents, so few documents, or a few long ones, cannot be split finer."""
    validation, documents = counts["validation_tokens"], counts["train_documents"] + counts["validation_documents"]
    share = validation / max(1, counts["train_tokens"] + validation)
    if not validation and val_fraction > 0:
        return (f"clean: no document of {documents} fell into the validation split (val_fraction={val_fraction}): "
                "training reports no validation loss; raise clean.val_fraction or add documents")
    if validation and not val_fraction / 3 <= share <= 3 * val_fraction:
        return (f"clean: the validation split holds {share:.1%} of the tokens ({counts['validation_documents']} of "
                f"{documents} documents) for val_fraction={val_fraction}: documents are split whole, so a few long "
                "ones decide it; add documents, or change clean.val_fraction to draw others")
    return None


def normalize(text: str) -> str:
    """NFC, no control characters but newline and tab, no trailing or repeated inner spaces,
    at most two consecutive blank lines. Leading indentation is kept (code examples need it)."""
    text = _CONTROL.sub("", text.replace("\r\n", "\n").translate(_NEWLINES))
    if not text.isascii():
        text = _UNICODE_SPACE.sub(" ", unicodedata.normalize("NFC", text))
    if " \n" in text or "\t\n" in text:
        text = _TRAILING_SPACE.sub("", text)
    text = _SPACE_RUN.sub(" ", text)
    if "\n\n\n\n" in text:
        text = _BLANK_LINES.sub("\n\n\n", text)
    return text.strip()


def _is_ipv6(candidate: str) -> bool:
    # Five hex digits at least, and not two decimal numbers alone, so slices such as
    # `a[10::2]` and `data[4096::16]` are left alone.
    groups = [group for group in candidate.split(":") if group]
    if sum(map(len, groups)) < 5 or (len(groups) < 3 and all(group.isdigit() for group in groups)):
        return False
    try:
        ipaddress.IPv6Address(candidate)
    except ValueError:
        return False
    return True


def scrub_pii(text: str) -> tuple[str, dict[str, int]]:
    """Replace e-mail addresses with <EMAIL> and IPv4/IPv6 addresses with <IP>; count them."""
    emails = ipv4 = ipv6 = 0
    if "@" in text:
        text, emails = _EMAIL.subn(EMAIL, text)
    if _IPV4_HINT.search(text):
        text, ipv4 = _IPV4.subn(IP, text)

    def replace_ipv6(match: re.Match) -> str:
        nonlocal ipv6
        if _is_ipv6(match.group()):
            ipv6 += 1
            return IP
        return match.group()

    if _IPV6_HINT.search(text):
        text = _IPV6.sub(replace_ipv6, text)
    return text, {"email": emails, "ip": ipv4 + ipv6}


def _repetition(items: list[str]) -> tuple[float, float]:
    """Fraction of items repeating an earlier one, and fraction of characters in them."""
    counts = Counter(items)
    repeated_chars = sum(len(item) * (count - 1) for item, count in counts.items() if count > 1)
    return (len(items) - len(counts)) / max(len(items), 1), repeated_chars / max(sum(map(len, items)), 1)


def _top_ngram_fractions(words: Words, sizes: tuple[int, ...]) -> dict[int, float]:
    """For each n, the share of word characters covered by the most frequent n-gram (Gopher)."""
    fractions = dict.fromkeys(sizes, 0.0)
    lengths = np.fromiter(map(len, words.tokens), dtype=np.int64, count=len(words.tokens))
    ends = np.concatenate([[0], np.cumsum(lengths)])
    for n in sorted(sizes):
        grams = words.grams(n)
        ordered = np.sort(grams)
        starts = np.flatnonzero(np.concatenate([[True], ordered[1:] != ordered[:-1]]))
        counts = np.diff(np.append(starts, ordered.size))
        top = int(np.argmax(counts))
        if counts[top] < 2:
            break  # no n-gram repeats, so no longer one does
        first = int(np.argmax(grams == ordered[starts[top]]))
        fractions[n] = counts[top] * (ends[first + n] - ends[first]) / ends[-1]
    return fractions


def text_stats(text: str, words: Words | None = None) -> dict[str, float]:
    """The measures the quality filters bound, named as in `FILTERS`' config fields."""
    words = words or Words(text)
    split = text.split()
    count = max(len(split), 1)
    lines = list(filter(None, map(str.strip, text.split("\n"))))
    paragraphs = list(filter(None, map(str.strip, text.split("\n\n"))))
    # Most words are purely alphabetic; only the others need the regular expression.
    no_letter = list(map(_LETTER.search, filterfalse(str.isalpha, split))).count(None)
    line_share, line_chars = _repetition(lines)
    paragraph_share, paragraph_chars = _repetition(paragraphs)
    top = _top_ngram_fractions(words, (2, 3, 4))
    return {
        "chars": len(text),
        "words": len(split),
        "mean_word_length": sum(map(len, split)) / count,
        "symbol_word_ratio": (text.count("#") + sum(text.count(e) for e in ELLIPSES)) / count,
        "alpha_word_fraction": 1 - no_letter / count,
        "stop_words": len(STOP_WORDS.intersection(words.tokens)),
        "bullet_line_fraction": sum(map(str.startswith, lines, repeat(BULLETS))) / max(len(lines), 1),
        "ellipsis_line_fraction": sum(map(str.endswith, lines, repeat(ELLIPSES))) / max(len(lines), 1),
        "duplicate_line_fraction": line_share,
        "duplicate_line_char_fraction": line_chars,
        "duplicate_paragraph_fraction": paragraph_share,
        "duplicate_paragraph_char_fraction": paragraph_chars,
        "top_2gram_fraction": top[2],
        "top_3gram_fraction": top[3],
        "top_4gram_fraction": top[4],
    }


def quality_failures(text: str, config: CleanConfig, words: Words | None = None) -> list[tuple[str, str]]:
    """Every quality filter the text fails, as (reason, detail), in `FILTERS` order."""
    stats = text_stats(text, words)
    failures = []
    for reason, field in FILTERS.items():
        side, measure = field.split("_", 1)
        value, bound = stats[measure], getattr(config, field)
        if (value < bound) if side == "min" else (value > bound):
            sign = "<" if side == "min" else ">"
            failures.append((reason, f"{measure.replace('_', ' ')} {value:.3g} {sign} {bound}"))
    return failures


def shards(ref: Ref) -> list[Path]:
    """The Parquet shards of a collect or clean output, in order."""
    found = sorted(ref.dir.glob("shard-*.parquet"))
    if not found:
        raise StageError(f"no shard-*.parquet files in {ref.dir}; run the {ref.stage} stage again")
    return found


def read_batches(path: Path, columns: list[str] | None = None, rows: int = BATCH_ROWS) -> Iterator[pa.RecordBatch]:
    """Record batches of a shard. Read without pre-buffering or reader threads: those make
    pyarrow keep memory in proportion to the data read, and memory must stay flat."""
    yield from pq.ParquetFile(path, pre_buffer=False).iter_batches(batch_size=rows, columns=columns, use_threads=False)


def _documents(batch: pa.RecordBatch) -> list[tuple[str, str]]:
    return list(zip(batch.column("id").to_pylist(), batch.column("text").to_pylist()))


@dataclass
class Verdict:
    """One document judged on its own: its cleaned text, split, and why it goes (if it does)."""

    text: str
    split: str
    raw_bytes: int
    pii: dict[str, int]
    drop: tuple[str, str] | None
    digest: bytes = b""
    signature: rensa.RMinHash | None = None


class _Judge:
    """The per-document work: normalise, scrub, filter, decontaminate, sign for dedup.

    Its state is read-only once the reference n-grams are indexed, so worker processes
    each hold a copy and judge batches in parallel.
    """

    def __init__(self, config: CleanConfig, eval_texts: list[str]):
        self.config = config
        self.eval_grams = Overlap(config.decontam_ngram, config.decontam_min_words)
        # Validation documents are long enough for whole n-grams; the phrase rule is for short eval texts.
        self.val_grams = Overlap(config.decontam_ngram, config.decontam_ngram)
        for text in eval_texts:  # scrubbed as documents are, so an address in both still matches
            self.eval_grams.add(Words(scrub_pii(normalize(text))[0]))

    def index_validation(self, paths: list[Path]) -> int:
        """First pass: the n-grams of every validation document that this stage keeps, as far as
        a document alone decides it (a quality filter or an evaluation text drops it: then it
        is no reference, and training documents sharing its spans stay). Returns the input's
        size in bytes."""
        size = 0
        self.eval_grams.freeze()
        for path in paths:
            for batch in read_batches(path, ["id", "text"]):
                for doc_id, raw in _documents(batch):
                    size += len(raw.encode())
                    if split_of(doc_id, self.config.val_fraction) == "validation":
                        _, _, words, drop = self._alone(raw)
                        if drop is None:
                            self.val_grams.add(words)
        self.val_grams.freeze()
        return size

    def _alone(self, raw: str) -> tuple[str, dict[str, int], Words, tuple[str, str] | None]:
        """A document normalised and scrubbed (text, PII counts, words), and why it goes as far
        as it decides that alone: a quality filter, or a span of an evaluation text."""
        text, pii = scrub_pii(normalize(raw))
        words = Words(text)
        failures = quality_failures(text, self.config, words)
        if failures:
            return text, pii, words, failures[0]
        if self.eval_grams.contains(words):
            return text, pii, words, ("contaminated", f"{self._span} an evaluation set")
        return text, pii, words, None

    @property
    def _span(self) -> str:
        return f"shares a {self.config.decontam_ngram}-word span with"

    def __call__(self, doc_id: str, raw: str) -> Verdict:
        config = self.config
        text, pii, words, drop = self._alone(raw)
        judged = Verdict(text, split_of(doc_id, config.val_fraction), len(raw.encode()), pii, drop)
        if drop is None and judged.split == "train" and self.val_grams.contains(words):
            judged.drop = "contaminated", f"{self._span} the validation split"
        if judged.drop is None:
            judged.digest = hashlib.blake2b(text.encode(), digest_size=16).digest()
            judged.signature = minhash(words, config.shingle_words, config.num_perm, config.minhash_seed)
        return judged

    def batch(self, documents: list[tuple[str, str]]) -> list[Verdict]:
        return [self(doc_id, raw) for doc_id, raw in documents]


_worker_judge: _Judge | None = None


def _start_worker(judge: _Judge) -> None:
    global _worker_judge
    _worker_judge = judge


def _judge_in_worker(documents: list[tuple[str, str]]) -> list[Verdict]:
    assert _worker_judge is not None
    return _worker_judge.batch(documents)


def _judged(judge: _Judge, paths: list[Path], workers: int) -> Iterator[tuple[int, pa.RecordBatch, list[Verdict]]]:
    """(shard index, batch, verdicts) for every input batch in order, judged by `workers` processes.

    At most two batches per worker are in flight, so memory stays bounded."""
    batches = ((index, batch) for index, path in enumerate(paths) for batch in read_batches(path))
    if workers == 1:
        for index, batch in batches:
            yield index, batch, judge.batch(_documents(batch))
        return
    # Not fork: flows run tasks in threads. A fork server imports this module once for all workers.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker, initargs=(judge,)) as pool:
        pending: deque = deque()
        for index, batch in batches:
            pending.append((index, batch, pool.submit(_judge_in_worker, _documents(batch))))
            if len(pending) > 2 * workers:
                done_index, done_batch, future = pending.popleft()
                yield done_index, done_batch, future.result()
        for done_index, done_batch, future in pending:
            yield done_index, done_batch, future.result()


class _Ledger:
    """The cross-document state: exact and near-duplicate indexes, counters, quarantine, and
    the hash of what is kept (downstream stages key on it, so a change that keeps the same
    documents, such as other evaluation texts that decontaminate nothing, rebuilds nothing)."""

    def __init__(self, config: CleanConfig):
        self.config = config
        self.near = NearDuplicates(config.near_dup_threshold, config.num_perm)
        self.seen: dict[bytes, str] = {}
        self.content = hashlib.sha256()
        self.counts: Counter = Counter()
        self.reasons: Counter = Counter()
        self.pii: Counter = Counter()
        self.quarantine: list[dict[str, str]] = []

    def drop_reason(self, doc_id: str, verdict: Verdict) -> tuple[str, str] | None:
        if verdict.drop:
            return verdict.drop
        if verdict.digest in self.seen:
            return "exact_duplicate", f"same normalised text as document {self.seen[verdict.digest]}"
        self.seen[verdict.digest] = doc_id
        match = self.near.check(doc_id, verdict.signature)
        if match:
            return "near_duplicate", f"jaccard {match[1]:.2f} with {match[0]}"
        return None

    def filter(self, batch: pa.RecordBatch, verdicts: list[Verdict]) -> pa.Table:
        """The kept rows of a batch, with cleaned text and a `split` column."""
        ids, sources = batch.column("id").to_pylist(), batch.column("source").to_pylist()
        keep = []
        for row, (doc_id, source, verdict) in enumerate(zip(ids, sources, verdicts)):
            self.counts["docs_in"] += 1
            self.counts["bytes_in"] += verdict.raw_bytes
            reason = self.drop_reason(doc_id, verdict)
            if reason:
                self._quarantine(doc_id, source, verdict.text, *reason)
                continue
            keep.append(row)
            text = verdict.text.encode()
            self.content.update(f"{doc_id}\0{verdict.split}\0{len(text)}\0".encode() + text)
            self.pii.update(verdict.pii)
            self.counts[verdict.split] += 1
            self.counts[f"{verdict.split}_bytes"] += len(text)
        table = pa.Table.from_batches([batch]).take(pa.array(keep, pa.int64()))
        column = table.schema.get_field_index("text")
        field = table.schema.field(column)
        texts = pa.array([verdicts[row].text for row in keep], field.type)
        table = table.set_column(column, field, texts)
        return table.append_column("split", pa.array([verdicts[row].split for row in keep], pa.string()))

    def _quarantine(self, doc_id: str, source: str, text: str, reason: str, detail: str) -> None:
        self.reasons[reason] += 1
        if self.reasons[reason] <= self.config.quarantine_samples:
            if len(text) > SAMPLE_CHARS:  # samples are held until the end: each stays small
                detail = f"{detail}; text cut to its first {SAMPLE_CHARS:,} of {len(text):,} characters"
                text = text[:SAMPLE_CHARS]
            self.quarantine.append({"id": doc_id, "source": source, "reason": reason, "detail": detail, "text": text})

    def summary(self) -> dict[str, Any]:
        counts = self.counts
        docs_out = counts["train"] + counts["validation"]
        if counts["docs_in"] == 0:
            raise StageError("the collected corpus is empty: nothing to clean")
        if docs_out == 0:
            removed = ", ".join(f"{reason} {count}" + (f" (clean.{FILTERS[reason]})" if reason in FILTERS else "")
                                for reason, count in self.reasons.most_common())
            raise StageError(
                f"clean removed all {counts['docs_in']} documents ({removed}); loosen those filters in the clean config"
            )
        return {
            "content_hash": self.content.hexdigest(),
            "counts": {
                "docs_in": counts["docs_in"],
                "docs_out": docs_out,
                "bytes_in": counts["bytes_in"],
                "bytes_out": counts["train_bytes"] + counts["validation_bytes"],
                "dropped": counts["docs_in"] - docs_out,
            },
            "drop_reasons": dict(self.reasons.most_common()),
            "pii_replacements": {"email": self.pii["email"], "ip": self.pii["ip"]},
            "splits": {
                split: {"documents": counts[split], "bytes": counts[f"{split}_bytes"]}
                for split in ("train", "validation")
            },
        }


def _workers(config: CleanConfig, input_bytes: int) -> int:
    if input_bytes < PARALLEL_MIN_BYTES:
        return 1
    if config.workers:
        return config.workers
    return cpu_cores()


def _build(paths: list[Path], config: CleanConfig, eval_texts: list[str], out: Path) -> dict[str, Any]:
    judge = _Judge(config, eval_texts)
    workers = _workers(config, judge.index_validation(paths))
    ledger = _Ledger(config)
    writer, current = None, -1
    try:
        for index, batch, verdicts in _judged(judge, paths, workers):
            if index != current:
                if writer:
                    writer.close()
                schema = pq.read_schema(paths[index]).append(pa.field("split", pa.string()))
                writer, current = pq.ParquetWriter(out / paths[index].name, schema), index
            writer.write_table(ledger.filter(batch, verdicts))
    finally:
        if writer:
            writer.close()
    summary = ledger.summary()
    samples = pd.DataFrame(ledger.quarantine, columns=["id", "source", "reason", "detail", "text"])
    samples.to_parquet(out / QUARANTINE, index=False)
    return {
        **summary,
        "decontamination": {"eval_ngrams": len(judge.eval_grams), "validation_ngrams": len(judge.val_grams)},
        "workers": workers,
        "layout": "shard-*.parquet: the input's columns (text cleaned) plus `split`; "
        "quarantine.parquet: samples of dropped documents",
    }


def eval_digest(eval_texts: list[str]) -> str:
    """Order-independent hash of the evaluation texts, part of the clean fingerprint."""
    digest = hashlib.sha256()
    for text in sorted(eval_texts):
        digest.update(text.encode() + b"\0")
    return digest.hexdigest()[:16]


def clean(upstream: Ref, config: CleanConfig, root: Path | str | None = None, eval_texts: Iterable[str] = ()) -> Ref:
    """Clean the collected shards of `upstream`; `eval_texts` are the held-out evaluation texts."""
    root = workspace(root)
    eval_texts = list(eval_texts)
    paths = shards(upstream)
    digest = eval_digest(eval_texts)
    settings = config.model_dump(exclude={"workers"})  # how many processes run does not change the output
    fp = fingerprint("clean", settings, [upstream.key, digest], code_version(sys.modules[__name__], dedup))
    return run_stage(
        "clean",
        fp,
        lambda out: _build(paths, config, eval_texts, out),
        root=root,
        inputs={"upstream": upstream.model_dump(), "eval_texts": {"count": len(eval_texts), "sha256": digest}},
        config=config.model_dump(),
    )


def drop_reasons(ref: Ref) -> pd.DataFrame:
    """The reasons table of a finished clean output (reason, documents), most frequent first."""
    reasons = ref.manifest().get("drop_reasons", {})
    return pd.DataFrame(list(reasons.items()), columns=["reason", "documents"])


def quarantine(ref: Ref) -> pd.DataFrame:
    """The quarantined samples of a finished clean output."""
    return pd.read_parquet(ref.dir / QUARANTINE)
