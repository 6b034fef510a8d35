"""Finding repeated and overlapping text for the clean stage, with hashes only.

Near-deduplication and decontamination both see a document as its lowercased word
tokens with punctuation stripped. What they keep in memory are hashes, never text:
MinHash signatures and an LSH index (rensa, in Rust) for near-duplicates, sorted
arrays of 64-bit n-gram hashes for decontamination. Memory therefore grows with the
number of documents kept (about 1 KiB each: a 128-value signature and its LSH band
entries) and with the size of the reference sets, never with the corpus text.
"""

from __future__ import annotations

import re
from collections import defaultdict

import numpy as np
import rensa

_WORD = re.compile(r"\w+")
# Base of the polynomial n-gram hash (see `Words`).
_P = np.uint64(0x9E3779B97F4A7C15)
# LSH banding is chosen so a pair exactly at the threshold becomes a candidate with at
# least this probability; candidates are then verified against the signatures.
_LSH_RECALL = 0.99
# Upper bound on the size (bytes) of the n-gram prefilter bitmap: 64 MiB.
_MAX_BITMAP = 1 << 26


class Words:
    """A text as lowercased word tokens, their 64-bit hashes and (lazily) their n-gram hashes.

    An n-gram's hash is the polynomial h(w1..wn) = sum of h(wi) * P^(n-i) mod 2^64, so
    an n-gram joins two shorter ones: h(w1..wn) = h(w1..wk) * P^(n-k) + h(wk+1..wn).
    Sizes are built by halving and cached, so 13-grams take a handful of vector operations.
    """

    def __init__(self, text: str):
        self.tokens = _WORD.findall(text.lower())
        self.hashes = np.array(rensa.RMinHash.hash_token_sets([self.tokens])[0], dtype=np.uint64)
        self._grams = {1: self.hashes}

    def grams(self, n: int) -> np.ndarray:
        """Hashes of every word n-gram, in order (empty when the text has fewer than n words)."""
        if n not in self._grams:
            head, tail = n // 2, n - n // 2
            count = max(len(self.hashes) - n + 1, 0)
            shift = np.uint64(pow(int(_P), tail, 1 << 64))
            self._grams[n] = self.grams(head)[:count] * shift + self.grams(tail)[head : head + count]
        return self._grams[n]


class Overlap:
    """The word n-grams of reference texts, to find documents that share a span with them.

    A reference text contributes all its `n`-grams. A text shorter than `n` words but at
    least `min_words` long contributes its whole token sequence, which then matches as a
    contiguous phrase; shorter texts are too common to be evidence of anything and are
    ignored. Hashes are gathered in arrays and sorted once, on the first lookup. A
    lookup first probes a bitmap indexed by the low bits of the hashes (most n-grams
    miss it) and binary-searches the sorted hashes only for the few that hit.
    """

    def __init__(self, n: int, min_words: int):
        self.n = n
        self.min_words = min_words
        self._pending: dict[int, list[np.ndarray]] = defaultdict(list)
        self._sorted: dict[int, np.ndarray] = {}
        self._bitmap = np.zeros(1, dtype=bool)
        self._mask = np.uint64(0)

    def add(self, words: Words) -> None:
        if len(words.tokens) >= self.min_words:
            size = min(self.n, len(words.tokens))
            self._pending[size].append(words.grams(size))

    def __len__(self) -> int:
        self.freeze()
        return sum(len(grams) for grams in self._sorted.values())

    def freeze(self) -> None:
        """Sort the hashes added so far (done by the first lookup after an `add`)."""
        if not self._pending:
            return
        for size, parts in self._pending.items():
            self._sorted[size] = np.unique(np.concatenate([self._sorted.get(size, parts[0][:0]), *parts]))
        self._pending.clear()
        total = sum(len(grams) for grams in self._sorted.values())
        self._bitmap = np.zeros(min(1 << max(total * 8, 1).bit_length(), _MAX_BITMAP), dtype=bool)
        self._mask = np.uint64(self._bitmap.size - 1)  # the size is a power of two
        for grams in self._sorted.values():
            self._bitmap[grams & self._mask] = True

    def contains(self, words: Words) -> bool:
        """Whether the document has any reference n-gram (or phrase)."""
        self.freeze()
        for size, reference in self._sorted.items():
            grams = words.grams(size)
            hits = grams[self._bitmap[grams & self._mask]]
            if hits.size:
                where = np.minimum(np.searchsorted(reference, hits), reference.size - 1)
                if np.any(reference[where] == hits):
                    return True
        return False


def lsh_rows(threshold: float, num_perm: int) -> int:
    """Rows per LSH band: the most selective banding that still proposes a pair at the threshold."""
    usable = [rows for rows in range(1, num_perm + 1) if num_perm % rows == 0]
    recall = {rows: 1 - (1 - threshold**rows) ** (num_perm // rows) for rows in usable}
    return max(rows for rows in usable if rows == 1 or recall[rows] >= _LSH_RECALL)


def minhash(words: Words, shingle_words: int, num_perm: int, seed: int) -> rensa.RMinHash:
    """MinHash of a document's word shingles (the whole text as one shingle if it is shorter)."""
    shingles = words.grams(max(min(shingle_words, len(words.tokens)), 1))
    signature = rensa.RMinHash(num_perm, seed)
    # Each shingle hash as a bytes token; "S8" drops trailing zero bytes, which keeps tokens distinct.
    signature.update(shingles.view("S8").tolist() or [b""])
    return signature


class NearDuplicates:
    """Keep-first near-duplicate detection with MinHash LSH.

    LSH proposes candidates among the documents kept so far; a candidate is a
    near-duplicate when the signatures' estimated Jaccard similarity reaches
    `threshold`. Only signatures, ids and the index stay in memory.
    """

    def __init__(self, threshold: float, num_perm: int):
        self.threshold = threshold
        rows = lsh_rows(threshold, num_perm)
        self._lsh = rensa.RMinHashLSH(threshold, num_perm, num_perm // rows)
        self._kept: list[rensa.RMinHash] = []
        self._ids: list[str] = []

    def check(self, doc_id: str, signature: rensa.RMinHash) -> tuple[str, float] | None:
        """The kept document this one nearly duplicates, as (id, similarity); else keep it and return None."""
        best, match = 0.0, -1
        for key in self._lsh.query(signature):
            similarity = self._kept[key].jaccard(signature)
            if similarity > best:
                best, match = similarity, key
        if best >= self.threshold:
            return self._ids[match], best
        self._lsh.insert(len(self._kept), signature)
        self._kept.append(signature)
        self._ids.append(doc_id)
        return None
