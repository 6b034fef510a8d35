"""The tokenize stage: train a byte-level BPE tokenizer and turn the corpus into token files.

The tokenizer is GPT-4-style: text is pre-split with the cl100k pattern (except that
numbers split into single digits, which helps small models with arithmetic), then
mapped to bytes, so any string round-trips. The chat special tokens of `tasks.chat`
are reserved first and get ids 0..6 in every tokenizer the pipeline builds. Merges are
learned from the train split only (an even sample of it on big corpora).

Each split becomes one flat file of token ids (`train.bin`, `validation.bin`), uint16
when the vocabulary fits, with BOS before every document, written batch by batch so
memory stays flat; `load_tokens` maps them with numpy. The corpus is encoded with
tiktoken built from the trained merges (3-4x less CPU than `tokenizers` for the same
ids); a sample of documents is also encoded by `tokenizers`, the reference, and one
disagreement switches the whole encoding to it. Corpus text that spells a
special token stays text. Next to the token files lie `tokenizer.json` and the small
config files that let `transformers.AutoTokenizer` load the directory with the chat
template.

Always import this module as `tasks.tokenize`: a `tokenize.py` on `sys.path` would
shadow the standard library's module.
"""

from __future__ import annotations

import functools
import hashlib
import heapq
import json
import logging
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pyarrow.parquet as pq
import tiktoken
from pydantic import Field
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from tasks import chat
from tasks.clean import read_batches, shards
from tasks.settings import Settings
from tasks.stage import Ref, StageError, code_version, cpu_cores, fingerprint, run_stage, workspace

SPLITS = ("train", "validation")
TOKENIZER = "tokenizer.json"
BATCH_ROWS = 256
ENCODE_BYTES = 1 << 18
CHECK_RATE = 0.02  # fraction of documents that the reference tokenizer encodes too
# cl100k's pre-tokenisation pattern with numbers split into single digits (\p{N}, not \p{N}{1,3}).
PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
MIN_VOCAB = len(chat.SPECIAL_TOKENS) + 256
log = logging.getLogger(__name__)


MAX_VOCAB = 2**20  # four times the largest vocabularies in use (about 256k)


class TokenizeConfig(Settings):
    """How the tokenizer is trained and the corpus encoded."""

    vocab_size: int = Field(
        4096,
        ge=MIN_VOCAB + 1,
        # the BPE trainer allocates in proportion (tens of bytes per entry) before it learns anything
        le=MAX_VOCAB,
        description=f"Vocabulary size: special tokens, 256 bytes, then learned merges; at most {MAX_VOCAB:,}.",
    )
    min_frequency: int = Field(2, ge=1, lt=2**64, description="A pair must occur at least this often to be merged.")
    train_max_bytes: int | None = Field(
        8_000_000,
        ge=1,
        description="Train the tokenizer on an even sample of the train split that just reaches this many bytes "
        "(all of it when empty; at least one document). Bounds the time and memory of training; merges for "
        "vocabularies up to ~32k are well estimated from a few MB.",
    )


def vocabulary_note(config: TokenizeConfig, counts: dict[str, int]) -> str | None:
    """What to know when the tokenizer learned fewer tokens than asked (tokenize's `counts`):
    the model's vocabulary is then the smaller one."""
    if counts["vocab_size"] >= config.vocab_size:
        return None
    return (f"tokenize: the corpus gave a vocabulary of {counts['vocab_size']:,}, not the {config.vocab_size:,} of "
            f"tokenize.vocab_size: no other pair occurs min_frequency={config.min_frequency} times in the text the "
            "tokenizer learns from; the model takes the smaller vocabulary")


def new_tokenizer() -> Tokenizer:
    """An untrained tokenizer with the pipeline's pre-tokenisation and decoding."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def train_tokenizer(batches: Iterator[list[str]], config: TokenizeConfig) -> Tokenizer:
    """Learn BPE merges from batches of texts; the special tokens take ids 0..6."""
    tokenizer = new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=config.vocab_size,
        min_frequency=config.min_frequency,
        special_tokens=chat.SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(batches, trainer)
    return tokenizer


def write_tokenizer_json(tokenizer: Tokenizer, path: Path) -> None:
    """`Tokenizer.save`'s bytes, written by Python: a failed write (a full disk) is then an
    OSError, where `Tokenizer.save` raises a bare Exception."""
    path.write_text(tokenizer.to_str(pretty=True), encoding="utf-8")


def save_tokenizer(tokenizer: Tokenizer, out: Path) -> None:
    """Write tokenizer.json plus what `transformers.AutoTokenizer.from_pretrained` needs."""
    write_tokenizer_json(tokenizer, out / TOKENIZER)
    for name, content in chat.hf_tokenizer_files().items():
        (out / name).write_text(json.dumps(content, indent=2))


def load_tokenizer(ref_or_dir: Ref | str | Path) -> Tokenizer:
    """The tokenizer of a tokenize output (a `Ref` or its directory)."""
    directory = ref_or_dir.dir if isinstance(ref_or_dir, Ref) else Path(ref_or_dir)
    return chat.read_tokenizer(directory / TOKENIZER)


def dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype("<u2" if vocab_size <= 2**16 else "<u4")


def token_files(ref: Ref, split: str) -> list[Path]:
    """The token files of one split, in order."""
    return [ref.dir / name for name in ref.manifest()["files"][split]]


def load_tokens(ref: Ref, split: str) -> np.memmap:
    """The token stream of one split, memory-mapped (read-only); documents start with BOS."""
    (path,) = token_files(ref, split)
    dtype = np.dtype(ref.manifest()["dtype"])
    if path.stat().st_size == 0:
        return np.empty(0, dtype=dtype)  # type: ignore[return-value]
    return np.memmap(path, dtype=dtype, mode="r")


def _shards(ref: Ref) -> list[Path]:
    paths = shards(ref)
    if "split" not in pq.read_schema(paths[0]).names:
        raise StageError(f"{ref.dir} has no `split` column; tokenize takes the output of the clean stage")
    return paths


def _batches(paths: list[Path], columns: list[str]) -> Iterator[list[list[Any]]]:
    """The given columns of every batch of every shard, as Python lists, in order."""
    for path in paths:
        for batch in read_batches(path, columns, rows=BATCH_ROWS):
            yield [batch.column(name).to_pylist() for name in columns]


def _rank(doc_id: str, purpose: bytes) -> int:
    """A stable pseudo-random 64-bit rank of a document, independent of the train/validation
    hash and of the ranks given for another `purpose`."""
    return int.from_bytes(hashlib.blake2b(doc_id.encode(), digest_size=8, person=purpose).digest(), "big")


def _sampled(doc_id: str, rate: float, purpose: bytes) -> bool:
    """A stable pseudo-random choice of about `rate` of the documents."""
    return _rank(doc_id, purpose) < rate * 2**64


def _rank_limit(paths: list[Path], max_bytes: int) -> int:
    """The highest rank the tokenizer's sample takes: the train documents of lowest rank, up
    to the first whose bytes bring the sample to `max_bytes` (every one when the split is
    smaller). The sample is so never empty, however few and large the documents; a heap of
    the chosen ones, largest rank on top, keeps memory to the sample's document count."""
    chosen: list[tuple[int, int]] = []  # (-rank, bytes)
    total = 0
    for ids, texts, splits in _batches(paths, ["id", "text", "split"]):
        for doc_id, text, split in zip(ids, texts, splits):
            rank = _rank(doc_id, b"tokenizer")
            if split != "train" or (total >= max_bytes and rank > -chosen[0][0]):
                continue
            size = len(text.encode())
            heapq.heappush(chosen, (-rank, size))
            total += size
            while total - chosen[0][1] >= max_bytes:  # reached without the highest rank
                total -= heapq.heappop(chosen)[1]
    return -chosen[0][0] if chosen else -1


def _training_texts(paths: list[Path], max_bytes: int | None, used: Counter) -> Iterator[list[str]]:
    """Batches of train-split texts: all of them, or an even sample of about `max_bytes`
    (`_rank_limit`).

    `used` counts the documents and bytes handed to the trainer."""
    limit = 2**64 if max_bytes is None else _rank_limit(paths, max_bytes)
    for ids, texts, splits in _batches(paths, ["id", "text", "split"]):
        chosen = [
            text for doc_id, text, split in zip(ids, texts, splits)
            if split == "train" and _rank(doc_id, b"tokenizer") <= limit
        ]  # fmt: skip
        used["documents"] += len(chosen)
        used["bytes"] += sum(len(text.encode()) for text in chosen)
        if chosen:
            yield chosen


@functools.cache
def byte_of_char() -> dict[str, int]:
    """The byte each character of a byte-level BPE token stands for: the inverse of GPT-2's
    map (printable Latin-1 bytes are themselves, the other 68 are U+0100 onwards, in order)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [byte for byte in range(256) if byte not in printable]
    return {chr(byte): byte for byte in printable} | {chr(256 + i): byte for i, byte in enumerate(others)}


def show_token(tokenizer: Tokenizer, token_id: int) -> str:
    """A token as a reader can see it: special tokens as they are, text quoted with escapes
    (so spaces and newlines show), bytes that are only part of a character as bytes."""
    token = tokenizer.id_to_token(token_id)
    if token is None:
        return f"<unknown id {token_id}>"
    if token_id in tokenizer.get_added_tokens_decoder():
        return token
    alphabet = byte_of_char()
    if not all(char in alphabet for char in token):
        return repr(tokenizer.decode([token_id]))
    raw = bytes(alphabet[char] for char in token)
    try:
        return repr(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return repr(raw)


def tiktoken_encoding(tokenizer: Tokenizer) -> tiktoken.Encoding:
    """The trained BPE as a tiktoken encoding with the same pre-tokenisation and ids.

    tiktoken merges the adjacent pair whose joined bytes have the lowest rank; the BPE
    trainer numbers each merged token in merge order, so with rank = id both apply the
    same merges (checked on samples by `_Encoder`). Special tokens are left out: corpus
    text is encoded as ordinary text."""
    byte_of = byte_of_char()
    special = set(chat.SPECIAL_TOKENS)
    ranks = {
        bytes(byte_of[char] for char in token): token_id
        for token, token_id in tokenizer.get_vocab().items()
        if token not in special
    }
    return tiktoken.Encoding("tinyseek", pat_str=PATTERN, mergeable_ranks=ranks, special_tokens={})


class EncoderMismatch(Exception):
    """tiktoken and the reference tokenizer encoded a sampled document differently."""


class _Encoder:
    """Encodes batches of documents to id lists: with tiktoken on every CPU core, checking
    the sampled documents against the reference tokenizer, or with the reference alone."""

    def __init__(self, tokenizer: Tokenizer, fast: bool):
        self.tokenizer = tokenizer
        self.fast = tiktoken_encoding(tokenizer) if fast else None
        self.threads = cpu_cores()
        self.checked = 0

    @property
    def name(self) -> str:
        return f"tiktoken {tiktoken.__version__}" if self.fast else "tokenizers"

    def _reference(self, texts: list[str]) -> list[list[int]]:
        return [encoding.ids for encoding in self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)]

    def __call__(self, ids: list[str], texts: list[str]) -> list[list[int]]:
        if self.fast is None:
            return self._reference(texts)
        encoded = self.fast.encode_ordinary_batch(texts, num_threads=self.threads)
        sample = [row for row, doc_id in enumerate(ids) if _sampled(doc_id, CHECK_RATE, b"tiktoken-check")]
        for row, reference in zip(sample, self._reference([texts[row] for row in sample])):
            if encoded[row] != reference:
                raise EncoderMismatch(f"document {ids[row]!r}")
        self.checked += len(sample)
        return encoded


class _SplitWriter:
    """Encodes one split's documents in batches of about ENCODE_BYTES of text (large enough
    for the encoder's threads, small enough to keep memory flat) and appends BOS + ids
    to the split's token file."""

    def __init__(self, path: Path, dtype: np.dtype, bos: int, encode: _Encoder):
        self.dtype, self.bos, self.encode = dtype, bos, encode
        self.handle: BinaryIO = open(path, "wb")
        self.pending_ids: list[str] = []
        self.pending: list[str] = []
        self.pending_bytes = 0
        self.tokens = self.documents = self.bytes = 0

    def add(self, doc_id: str, text: str) -> None:
        self.pending_ids.append(doc_id)
        self.pending.append(text)
        self.pending_bytes += len(text.encode())
        if self.pending_bytes >= ENCODE_BYTES:
            self._flush()

    def _flush(self) -> None:
        stream: list[int] = []
        for ids in self.encode(self.pending_ids, self.pending):
            stream.append(self.bos)
            stream += ids
        tokens = np.array(stream, dtype=self.dtype)
        self.handle.write(tokens.tobytes())
        self.tokens += tokens.size
        self.documents += len(self.pending)
        self.bytes += self.pending_bytes
        self.pending_ids, self.pending, self.pending_bytes = [], [], 0

    def close(self) -> dict[str, Any]:
        if self.pending:
            self._flush()
        self.handle.close()
        return {
            "tokens": self.tokens,
            "documents": self.documents,
            "bytes": self.bytes,
            "bytes_per_token": round(self.bytes / self.tokens, 4) if self.tokens else 0.0,
        }


def _encode_splits(paths: list[Path], out: Path, dtype: np.dtype, bos: int, encode: _Encoder) -> dict[str, Any]:
    """Write both splits' token files; their summaries."""
    writers = {split: _SplitWriter(out / f"{split}.bin", dtype, bos, encode) for split in SPLITS}
    for ids, texts, splits in _batches(paths, ["id", "text", "split"]):
        for doc_id, text, split in zip(ids, texts, splits):
            writers[split].add(doc_id, text)
    return {split: writer.close() for split, writer in writers.items()}


def _build(paths: list[Path], config: TokenizeConfig, out: Path) -> dict[str, Any]:
    trained_on: Counter = Counter()
    tokenizer = train_tokenizer(_training_texts(paths, config.train_max_bytes, trained_on), config)
    if trained_on["documents"] == 0:
        raise StageError("the clean output has no train-split documents to train the tokenizer on")
    save_tokenizer(tokenizer, out)
    # Corpus text that happens to spell a special token is encoded as text: only the
    # pipeline itself (BOS here, the chat format in fine-tuning) places special tokens.
    tokenizer.encode_special_tokens = True
    vocab_size = tokenizer.get_vocab_size()
    dtype = dtype_for(vocab_size)
    special = {token: tokenizer.token_to_id(token) for token in chat.SPECIAL_TOKENS}
    encoder = _Encoder(tokenizer, fast=True)
    try:
        summary = _encode_splits(paths, out, dtype, special[chat.BOS], encoder)
        encoded_by = {"encoder": encoder.name, "checked_documents": encoder.checked}
    except EncoderMismatch as mismatch:
        log.warning("tiktoken disagrees with the tokenizer on %s; encoding everything with the tokenizer", mismatch)
        summary = _encode_splits(paths, out, dtype, special[chat.BOS], _Encoder(tokenizer, fast=False))
        encoded_by = {"encoder": "tokenizers", "tiktoken_mismatch": str(mismatch)}
    return {
        "counts": {
            **{f"{split}_tokens": summary[split]["tokens"] for split in SPLITS},
            **{f"{split}_documents": summary[split]["documents"] for split in SPLITS},
            "vocab_size": vocab_size,
        },
        "dtype": dtype.name,
        "vocab_size": vocab_size,
        "special_tokens": special,
        "splits": summary,
        "files": {split: [f"{split}.bin"] for split in SPLITS},
        "layout": f"one flat little-endian {dtype.name} array of token ids per split; every document starts "
        f"with BOS (id {special[chat.BOS]}); bytes_per_token = UTF-8 text bytes / tokens including BOS",
        "tokenizer_training": {"documents": trained_on["documents"], "bytes": trained_on["bytes"]},
        "encoding": encoded_by,
    }


def tokenize(upstream: Ref, config: TokenizeConfig, root: Path | str | None = None) -> Ref:
    """Train the tokenizer on the clean output's train split and encode both splits."""
    root = workspace(root)
    paths = _shards(upstream)
    fp = fingerprint("tokenize", config.model_dump(), [upstream.key], code_version(sys.modules[__name__], chat))
    return run_stage(
        "tokenize",
        fp,
        lambda out: _build(paths, config, out),
        root=root,
        inputs={"upstream": upstream.model_dump()},
        config=config.model_dump(),
    )


class TokenData:
    """A tokenize output as training and evaluation read it: token files, dtype, the
    special token ids (named as in the model config) and bytes per token."""

    def __init__(self, ref: Ref):
        self.ref = ref
        manifest = ref.manifest()
        self.vocab_size: int = manifest["vocab_size"]
        self.dtype: str = manifest["dtype"]
        special = manifest["special_tokens"]
        self.bos_id: int = special[chat.BOS]
        self.special_ids = {"bos_token_id": special[chat.BOS], "eos_token_id": special[chat.EOS],
                            "pad_token_id": special[chat.PAD]}
        self._splits = manifest["splits"]
        self.tokenizer_dir = ref.dir

    def files(self, split: str) -> list[Path]:
        """Non-empty token files of a split."""
        return [path for path in token_files(self.ref, split) if path.stat().st_size > 0]

    def bytes_per_token(self, split: str) -> float | None:
        return self._splits[split]["bytes_per_token"] or None
