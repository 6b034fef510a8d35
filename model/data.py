"""Batches for training: token windows for pretraining, padded examples for fine-tuning.

Pretraining reads the flat token files of the tokenize stage (raw uint16/uint32 arrays,
a BOS token before every document) through numpy memmaps, so memory stays flat however
large the corpus is. Windows of `seq_len + 1` tokens start at every document start and
then every `seq_len` tokens further while the document lasts (`_window_starts`); a window
may run on into the documents after it (packing), so no token is wasted on padding, and
each document's beginning is seen at a window's start. Only the windows' starts (an int64
and a file number per window) live in RAM; they are found by scanning each file in chunks.

Both loaders visit their items in a seeded shuffled order that is redrawn each epoch
(generator seeded with `seed + epoch`). Their whole state is the position
(epoch, index) in that order, so a resumed run continues with exactly the batches it
would have seen. Under DDP each rank takes an interleaved slice of the same order
(`order[rank::world_size]`, cut to equal lengths), so ranks never see the same item in
an epoch and all take the same number of steps.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

TOKEN_DTYPES = ("uint16", "uint32")
SCAN_CHUNK = 1 << 24
IGNORE_INDEX = -100

Batch = tuple[torch.Tensor, torch.Tensor]


def _token_dtype(dtype: Any) -> np.dtype:
    chosen = np.dtype(dtype)
    if chosen.name not in TOKEN_DTYPES:
        raise ValueError(f"token files must be {' or '.join(TOKEN_DTYPES)}, got {chosen.name}")
    return chosen


def _open_tokens(path: str | Path, dtype: np.dtype) -> np.ndarray:
    """A read-only memmap of a token file (an empty array for an empty file)."""
    size = Path(path).stat().st_size
    if size % dtype.itemsize:
        raise ValueError(f"{path}: {size} bytes is not a whole number of {dtype.name} tokens")
    if size == 0:
        return np.empty(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def _window_starts(tokens: np.ndarray, bos_id: int, seq_len: int) -> np.ndarray:
    """Where windows of `seq_len + 1` tokens begin: at every document start (a `bos_id`), then
    every `seq_len` tokens further while the document lasts; a window that would run past
    the end of the file is moved back to end there.

    A document longer than a window is thus trained on whole, not only its beginning:
    per epoch every token of the file after the first BOS is a target at least once.
    """
    found = []
    for begin in range(0, len(tokens), SCAN_CHUNK):
        found.append(np.flatnonzero(tokens[begin : begin + SCAN_CHUNK] == bos_id) + begin)
    bos = np.concatenate(found).astype(np.int64) if found else np.empty(0, dtype=np.int64)
    ends = np.append(bos[1:], len(tokens))
    pieces = -(-(ends - bos) // seq_len)  # windows per document
    first = np.cumsum(pieces) - pieces  # index of each document's first window
    starts = np.repeat(bos, pieces) + seq_len * (np.arange(pieces.sum()) - np.repeat(first, pieces))
    last = len(tokens) - seq_len - 1  # the last start whose window fits
    return np.unique(np.minimum(starts, last)) if last >= 0 else np.empty(0, dtype=np.int64)


def _shifted(rows: np.ndarray) -> Batch:
    tokens = torch.from_numpy(rows)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


class _ShuffledOrder:
    """A seeded per-epoch shuffle of `size` items, dealt in batches to one DDP rank."""

    def __init__(self, size: int, batch_size: int, seed: int, rank: int, world_size: int, what: str,
                 lengths: np.ndarray | None = None, length_window: int = 1):
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size or length_window < 1:
            raise ValueError(f"need batch_size >= 1, 0 <= rank < world_size and length_window >= 1, got {batch_size}, "
                             f"{rank}, {world_size}, {length_window}")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.lengths, self.length_window = lengths, length_window
        self.per_rank = size // world_size
        self.batches_per_epoch = self.per_rank // batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"only {size} {what}: one batch needs {batch_size} per rank on {world_size} rank(s)"
            )
        self.epoch = 0
        self.index = 0
        self._dealt: tuple[int, np.ndarray] | None = None

    def _slice(self) -> np.ndarray:
        if self._dealt is None or self._dealt[0] != self.epoch:
            generator = np.random.default_rng(self.seed + self.epoch)
            order = generator.permutation(self.size)
            mine = order[: self.per_rank * self.world_size][self.rank :: self.world_size]
            if self.lengths is not None and self.length_window > 1:
                mine = self._by_length(mine, generator)
            self._dealt = (self.epoch, mine)
        return self._dealt[1]

    def _by_length(self, order: np.ndarray, generator: np.random.Generator) -> np.ndarray:
        """Each run of `length_window` batches of `order` sorted by item length and dealt
        again as batches in a shuffled order: batches of similar lengths (less padding),
        still drawn from the whole shuffled data. Items past the last whole batch stay last."""
        span = self.length_window * self.batch_size
        whole = self.batches_per_epoch * self.batch_size
        regrouped = []
        for start in range(0, whole, span):
            window = order[start : min(start + span, whole)]
            window = window[np.argsort(self.lengths[window], kind="stable")]
            batches = window.reshape(-1, self.batch_size)
            regrouped.append(batches[generator.permutation(len(batches))].reshape(-1))
        return np.concatenate([*regrouped, order[whole:]])

    def next(self) -> np.ndarray:
        if self.index + self.batch_size > self.batches_per_epoch * self.batch_size:
            self.epoch += 1
            self.index = 0
        picked = self._slice()[self.index : self.index + self.batch_size]
        self.index += self.batch_size
        return picked

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "size": self.size,
                "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue where `state` left off. Written with another number of ranks, the position
        is the same count of the epoch's items on all ranks together (rank r takes every
        world_size-th item), so a run resumed on more or fewer processes goes on with the
        items it had not reached; with length grouping, the batches of the one length window
        it stopped in are dealt again differently, so a few of its items may repeat or be skipped."""
        if state["seed"] != self.seed or state["size"] != self.size:
            raise ValueError(
                f"loader state is for seed {state['seed']} over {state['size']} items, "
                f"this loader has seed {self.seed} over {self.size}: the data or seed changed"
            )
        dealt = int(state["index"]) * int(state.get("world_size", self.world_size))
        if dealt % self.world_size:
            raise ValueError(f"loader state is {dealt} items into its epoch, which {self.world_size} ranks cannot "
                             "share evenly: resume with the number of processes that wrote it")
        self.epoch, self.index = int(state["epoch"]), dealt // self.world_size


class _Resumable:
    """What both loaders expose about their position in the shuffled order."""

    _order: _ShuffledOrder

    @property
    def batches_per_epoch(self) -> int:
        return self._order.batches_per_epoch

    @property
    def epoch(self) -> int:
        return self._order.epoch

    def state_dict(self) -> dict[str, int]:
        """The position (epoch, index) plus the seed and item count it is valid for."""
        return self._order.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._order.load_state_dict(state)


class TokenWindows(_Resumable):
    """Shuffled, resumable batches of `seq_len + 1`-token windows that start at document
    starts and continue through long documents (see `_window_starts`)."""

    def __init__(
        self,
        files: Sequence[str | Path],
        dtype: Any,
        seq_len: int,
        bos_id: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ):
        if seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        token_dtype = _token_dtype(dtype)
        self.seq_len = seq_len
        self.batch_size = batch_size
        self._tokens = [_open_tokens(path, token_dtype) for path in files]
        starts = [_window_starts(tokens, bos_id, seq_len) for tokens in self._tokens]
        self._file_of = np.repeat(np.arange(len(starts), dtype=np.int32), [len(s) for s in starts])
        self._start_of = np.concatenate(starts) if starts else np.empty(0, dtype=np.int64)
        self._order = _ShuffledOrder(
            len(self._start_of), batch_size, seed, rank, world_size, f"document-aligned windows of {seq_len + 1} tokens"
        )

    @property
    def windows(self) -> int:
        """How many windows the files hold (before the split across ranks)."""
        return len(self._start_of)

    def next_batch(self) -> Batch:
        """(inputs, targets), both LongTensor[batch_size, seq_len]; targets are inputs shifted by one."""
        picked = self._order.next()
        rows = np.empty((len(picked), self.seq_len + 1), dtype=np.int64)
        for row, item in enumerate(picked):
            start = self._start_of[item]
            rows[row] = self._tokens[self._file_of[item]][start : start + self.seq_len + 1]
        return _shifted(rows)


def _consecutive_windows(files: Sequence[str | Path], dtype: np.dtype, seq_len: int) -> Iterator[np.ndarray]:
    for path in files:
        tokens = _open_tokens(path, dtype)
        for start in range(0, len(tokens) - seq_len, seq_len):
            yield tokens[start : start + seq_len + 1]


def eval_batches(
    files: Sequence[str | Path], dtype: Any, seq_len: int, batch_size: int, max_batches: int | None = None
) -> Iterator[Batch]:
    """Consecutive windows over the files in order, for a validation loss that is the same every time.

    Windows step by `seq_len` and overlap by one token, so every token after the first
    of a file is a target at most once: a file's last tokens that do not fill a whole
    window are not scored. The last batch may be smaller than `batch_size`.
    """
    windows = _consecutive_windows(files, _token_dtype(dtype), seq_len)
    for _ in itertools.count() if max_batches is None else range(max_batches):
        rows = list(itertools.islice(windows, batch_size))
        if not rows:
            return
        yield _shifted(np.stack(rows).astype(np.int64))


class SFTBatches(_Resumable):
    """Shuffled, resumable batches of chat examples, right-padded to the longest in the batch.

    Each example is `(ids, mask)` where `mask[i] == 1` marks a token the model must learn
    to produce (assistant turns). Targets are the next token where it is masked in and
    `-100` elsewhere, padding included. Padding goes on the right, so under causal
    attention no real token attends to it and no attention mask is needed. Examples are
    cut to `seq_len + 1` tokens; those left with nothing to learn are dropped (counted in
    `dropped`). Batch widths are rounded up to a multiple of `WIDTH_STEP` (within
    `seq_len`): a handful of distinct shapes instead of one per batch, which CPU matmul
    libraries that build a kernel per shape (oneDNN for bf16) reward. With `length_window`
    > 1, each run of that many shuffled batches is regrouped by example length (as
    `group_by_length` does in transformers' Trainer): less padding, but examples of one
    length range train together, so where length follows the task a batch holds fewer tasks.
    """

    WIDTH_STEP = 8

    def __init__(
        self,
        examples: Sequence[tuple[Sequence[int], Sequence[int]]],
        seq_len: int,
        batch_size: int,
        pad_id: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        length_window: int = 1,
    ):
        self.pad_id = pad_id
        self.seq_len = seq_len
        self._examples: list[tuple[np.ndarray, np.ndarray]] = []
        for ids, mask in examples:
            if len(ids) != len(mask):
                raise ValueError(f"an example has {len(ids)} ids but {len(mask)} mask values")
            ids_arr = np.asarray(ids[: seq_len + 1], dtype=np.int64)
            targets = np.where(np.asarray(mask[1 : seq_len + 1], dtype=bool), ids_arr[1:], IGNORE_INDEX)
            if (targets != IGNORE_INDEX).any():
                self._examples.append((ids_arr[:-1], targets))
        self.dropped = len(examples) - len(self._examples)
        lengths = np.array([len(inputs) for inputs, _ in self._examples])
        self._order = _ShuffledOrder(len(self._examples), batch_size, seed, rank, world_size, "usable examples",
                                     lengths, length_window)

    @property
    def examples(self) -> int:
        return len(self._examples)

    def next_batch(self) -> Batch:
        """(input_ids, targets), both LongTensor[batch_size, width]: the longest example in the
        batch rounded up to a multiple of WIDTH_STEP."""
        picked = [self._examples[i] for i in self._order.next()]
        longest = max(len(inputs) for inputs, _ in picked)
        width = min(-(-longest // self.WIDTH_STEP) * self.WIDTH_STEP, self.seq_len)
        inputs = np.full((len(picked), width), self.pad_id, dtype=np.int64)
        targets = np.full((len(picked), width), IGNORE_INDEX, dtype=np.int64)
        for row, (example_inputs, example_targets) in enumerate(picked):
            inputs[row, : len(example_inputs)] = example_inputs
            targets[row, : len(example_targets)] = example_targets
        return torch.from_numpy(inputs), torch.from_numpy(targets)
