"""The tokenize stage: the tokenizer itself, its transformers files, and the token files."""

from __future__ import annotations

import ast
import json
import random
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pydantic
import pytest

import tasks.tokenize
from tasks import chat
from tasks.clean import CleanConfig, clean
from tasks.stage import Ref, StageError
from tasks.tokenize import (
    TokenData,
    TokenizeConfig,
    load_tokenizer,
    load_tokens,
    save_tokenizer,
    tiktoken_encoding,
    dtype_for,
    token_files,
    tokenize,
    train_tokenizer,
    vocabulary_note,
)
from tests.tasks.test_clean import good_docs, output, write_collect

UNICODE = "Grüße, 世界! naïve café — 😀 ∑x² \t tabs\n\nand 12345 digits, \u200b zero-width, العربية."
SMALL = TokenizeConfig(vocab_size=400)


@pytest.fixture(scope="module")
def texts():
    return good_docs(60, 120)


@pytest.fixture(scope="module")
def tokenizer(texts):
    return train_tokenizer(iter([texts, [UNICODE]]), SMALL)


@pytest.fixture
def collected(tmp_path, texts):
    return write_collect(tmp_path / "collect", [(f"doc-{i}", text) for i, text in enumerate(texts)], shards=2)


@pytest.fixture
def cleaned(ws, collected):
    return clean(collected, CleanConfig(val_fraction=0.2), ws)


def test_special_tokens_come_first(tokenizer):
    assert [tokenizer.token_to_id(token) for token in chat.SPECIAL_TOKENS] == list(range(7))
    assert tokenizer.get_vocab_size() == SMALL.vocab_size


def test_digits_are_split_one_by_one(tokenizer):
    tokens = tokenizer.encode("x = 2024 + 77", add_special_tokens=False).tokens
    assert [t for t in tokens if any(c.isdigit() for c in t)] == ["2", "0", "2", "4", "7", "7"]


@pytest.mark.parametrize("text", [UNICODE, "  leading spaces\n\n\ntrailing  ", "ελληνικά και русский", ""])
def test_round_trip(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False).ids) == text


def test_special_tokens_are_atomic_and_text_is_not_special(tokenizer):
    ids = tokenizer.encode(f"{chat.USER}hi{chat.END}", add_special_tokens=False).ids
    assert ids[0] == tokenizer.token_to_id(chat.USER) and ids[-1] == tokenizer.token_to_id(chat.END)
    assert tokenizer.encode("hi", add_special_tokens=False).ids == ids[1:-1]


def test_transformers_loads_it_with_the_chat_template(tokenizer, tmp_path):
    import transformers
    save_tokenizer(tokenizer, tmp_path)
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == (chat.BOS, chat.EOS, chat.PAD)
    assert loaded.pad_token_id == tokenizer.token_to_id(chat.PAD)
    rendered = loaded.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert rendered == "<|bos|><|user|>hi<|end|><|assistant|>"
    assert loaded.encode(UNICODE, add_special_tokens=False) == tokenizer.encode(UNICODE, add_special_tokens=False).ids
    assert loaded.decode(loaded.encode(UNICODE, add_special_tokens=False)) == UNICODE


def documents(ref: Ref, split: str, tokens: np.ndarray) -> list[np.ndarray]:
    """The token stream cut at BOS: one array per document (BOS dropped)."""
    bos = TokenData(ref).bos_id
    assert tokens[0] == bos
    starts = np.flatnonzero(tokens == bos)
    return [tokens[start + 1 : end] for start, end in zip(starts, [*starts[1:], len(tokens)])]


def test_token_files(ws, cleaned):
    ref = tokenize(cleaned, SMALL, ws)
    manifest = ref.manifest()
    tokenizer = load_tokenizer(ref)
    table = output(cleaned)
    assert manifest["dtype"] == "uint16" and manifest["vocab_size"] == SMALL.vocab_size
    assert manifest["special_tokens"] == {token: i for i, token in enumerate(chat.SPECIAL_TOKENS)}
    for split in ("train", "validation"):
        expected = table[table["split"] == split]["text"].tolist()
        assert expected, split
        tokens = load_tokens(ref, split)
        assert tokens.dtype == np.uint16 and token_files(ref, split) == [ref.dir / f"{split}.bin"]
        docs = documents(ref, split, tokens)
        assert [tokenizer.decode(doc.tolist()) for doc in docs] == expected
        reference = tokenizer.encode_batch(expected, add_special_tokens=False)
        assert [doc.tolist() for doc in docs] == [encoding.ids for encoding in reference]
        summary = manifest["splits"][split]
        assert summary["tokens"] == len(tokens) == manifest["counts"][f"{split}_tokens"]
        assert summary["documents"] == len(expected) == manifest["counts"][f"{split}_documents"]
        assert summary["bytes"] == sum(len(text.encode()) for text in expected)
        assert summary["bytes_per_token"] == pytest.approx(summary["bytes"] / summary["tokens"], abs=1e-4)
    data = TokenData(ref)
    assert data.bytes_per_token("validation") > 1 and data.files("train") == [ref.dir / "train.bin"]
    assert manifest["encoding"]["encoder"].startswith("tiktoken")


def test_tiktoken_encoding_gives_the_tokenizers_ids(tokenizer, texts):
    code = (Path(ast.__file__).read_text() + Path(json.__file__).read_text())[:60_000]
    rng = random.Random(0)
    shuffled = "".join(rng.sample(UNICODE * 20 + code[:4000], 5000))
    corpus = [*texts, UNICODE, code, shuffled, "", " ", "\n\n\t", "x" * 5000, "1234567890" * 50]
    fast = tiktoken_encoding(tokenizer).encode_ordinary_batch(corpus)
    assert fast == [encoding.ids for encoding in tokenizer.encode_batch(corpus, add_special_tokens=False)]


def test_encoding_falls_back_to_the_tokenizer_when_tiktoken_disagrees(ws, cleaned, monkeypatch):
    class Wrong:
        def encode_ordinary_batch(self, texts, num_threads):
            return [[0] for _ in texts]

    monkeypatch.setattr(tasks.tokenize, "tiktoken_encoding", lambda _: Wrong())
    monkeypatch.setattr(tasks.tokenize, "CHECK_RATE", 0.5)
    ref = tokenize(cleaned, SMALL, ws)
    assert ref.manifest()["encoding"]["encoder"] == "tokenizers"
    assert "tiktoken_mismatch" in ref.manifest()["encoding"]
    expected = output(cleaned)
    expected = expected[expected["split"] == "train"]["text"].tolist()
    tokenizer = load_tokenizer(ref)
    docs = documents(ref, "train", load_tokens(ref, "train"))
    assert [doc.tolist() for doc in docs] == [e.ids for e in tokenizer.encode_batch(expected, add_special_tokens=False)]


def test_special_token_text_in_the_corpus_stays_text(ws, tmp_path, texts):
    spelled = f"A document that spells {chat.BOS} and {chat.END} in its text, with the usual words."
    docs = [(f"doc-{i}", text) for i, text in enumerate(texts)] + [("spells", spelled)]
    cleaned = clean(write_collect(tmp_path / "collect", docs), CleanConfig(val_fraction=0), ws)
    ref = tokenize(cleaned, SMALL, ws)
    assert output(cleaned)["id"].iloc[-1] == "spells"
    tokens = load_tokens(ref, "train")
    assert (tokens == TokenData(ref).bos_id).sum() == ref.counts["train_documents"] == len(output(cleaned))
    assert not np.isin(tokens, [load_tokenizer(ref).token_to_id(chat.END)]).any()
    assert load_tokenizer(ref).decode(documents(ref, "train", tokens)[-1].tolist()) == spelled


def test_dtype_fits_the_vocabulary():
    assert dtype_for(2**16) == np.uint16 and dtype_for(2**16 + 1) == np.uint32


def test_a_vocabulary_smaller_than_asked_is_noted_and_a_huge_one_refused(tokenizer):
    """The BPE trainer runs out of pairs to merge on a small corpus (the model then takes the
    smaller vocabulary), and allocates a huge one's tables before it starts."""
    learned = tokenizer.get_vocab_size()
    assert vocabulary_note(SMALL, {"vocab_size": learned}) is None
    wide = TokenizeConfig(vocab_size=100_000)
    assert vocabulary_note(wide, {"vocab_size": learned}) == (
        f"tokenize: the corpus gave a vocabulary of {learned:,}, not the 100,000 of tokenize.vocab_size: no other "
        "pair occurs min_frequency=2 times in the text the tokenizer learns from; the model takes the smaller "
        "vocabulary")
    with pytest.raises(pydantic.ValidationError, match="less than or equal to 1048576"):
        TokenizeConfig(vocab_size=10**9)


def test_train_max_bytes_samples_the_train_split(ws, cleaned):
    full = tokenize(cleaned, SMALL, ws).manifest()["tokenizer_training"]
    capped = tokenize(cleaned, SMALL.model_copy(update={"train_max_bytes": full["bytes"] // 3}), ws)
    used = capped.manifest()["tokenizer_training"]
    assert 0 < used["documents"] < full["documents"]
    assert full["bytes"] // 6 < used["bytes"] < full["bytes"] // 3 * 2
    train_ids = output(cleaned).query("split == 'train'")["id"]
    assert full["documents"] == len(train_ids)
    one = tokenize(cleaned, SMALL.model_copy(update={"train_max_bytes": 1}), ws).manifest()["tokenizer_training"]
    assert one["documents"] == 1  # however small the budget, the sample is never empty


def test_rerun_is_cached_and_clean_config_reaches_the_fingerprint(ws, collected, cleaned, texts):
    first = tokenize(cleaned, SMALL, ws)
    again = tokenize(cleaned, SMALL, ws)
    assert again.cached and (again.fingerprint, again.manifest()) == (first.fingerprint, first.manifest())
    # tokenize keys on what clean kept: a stricter filter that drops nothing more changes nothing here
    same = clean(collected, CleanConfig(val_fraction=0.2, min_words=20), ws)
    assert same.fingerprint != cleaned.fingerprint and same.counts["docs_out"] == cleaned.counts["docs_out"]
    assert tokenize(same, SMALL, ws).fingerprint == first.fingerprint
    stricter = clean(collected, CleanConfig(val_fraction=0.2), ws, eval_texts=[texts[0]])  # drops doc-0
    assert stricter.counts["docs_out"] < cleaned.counts["docs_out"]
    assert tokenize(stricter, SMALL, ws).fingerprint != first.fingerprint
    assert tokenize(cleaned, TokenizeConfig(vocab_size=401), ws).fingerprint != first.fingerprint


def test_split_is_the_clean_split(ws, cleaned):
    ref = tokenize(cleaned, SMALL, ws)
    table = output(cleaned)
    counts = pd.Series(table["split"]).value_counts()
    assert ref.counts["validation_documents"] == counts["validation"]
    assert ref.counts["train_documents"] == counts["train"]


def test_upstream_without_split_column_is_a_stage_error(ws, tmp_path):
    (tmp_path / "raw").mkdir()
    pq.write_table(pa.table({"id": ["a"], "text": ["hello"]}), tmp_path / "raw" / "shard-00000.parquet")
    with pytest.raises(StageError, match="split"):
        tokenize(Ref(stage="collect", path=str(tmp_path / "raw"), fingerprint="raw"), SMALL, ws)
