import numpy as np
import pytest
import torch

import model.data as data
from model.data import SFTBatches, TokenWindows, eval_batches

BOS = 1


def write_docs(path, lengths, dtype="uint16", first=2):
    """A token file of documents [BOS, n, n+1, ...]: every non-BOS token is unique."""
    tokens, next_id = [], first
    for length in lengths:
        tokens += [BOS] + list(range(next_id, next_id + length))
        next_id += length
    np.asarray(tokens, dtype=dtype).tofile(path)
    return np.asarray(tokens, dtype=np.int64), next_id


@pytest.fixture
def shards(tmp_path):
    rng = np.random.default_rng(0)
    a, next_id = write_docs(tmp_path / "a.bin", rng.integers(3, 20, size=60))
    b, _ = write_docs(tmp_path / "b.bin", rng.integers(3, 20, size=40), first=next_id)
    return [tmp_path / "a.bin", tmp_path / "b.bin"], [a, b]


def expected_starts(tokens, seq_len):
    """Each document's start, then every seq_len tokens into it; a window past the end ends there."""
    bounds = [*np.flatnonzero(tokens == BOS), len(tokens)]
    last = len(tokens) - seq_len - 1
    return sorted({min(s, last) for begin, end in zip(bounds, bounds[1:]) for s in range(begin, end, seq_len)})


def drain_epoch(loader):
    return [loader.next_batch() for _ in range(loader.batches_per_epoch)]


def first_ids(batches):
    """Each window named by its first two tokens (unique in the fixtures: one at most is BOS)."""
    return [tuple(row[:2].tolist()) for inputs, _ in batches for row in inputs]


def test_windows_start_at_documents_and_targets_are_shifted(shards):
    files, tokens = shards
    loader = TokenWindows(files, "uint16", seq_len=16, bos_id=BOS, batch_size=4, seed=0)
    assert loader.windows == sum(len(expected_starts(t, 16)) for t in tokens)
    inputs, targets = loader.next_batch()
    assert inputs.dtype == targets.dtype == torch.int64
    assert inputs.shape == targets.shape == (4, 16)
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    whole = {(f, s): t[s : s + 17] for f, t in enumerate(tokens) for s in expected_starts(t, 16)}
    rows = torch.cat([inputs, targets[:, -1:]], dim=1).numpy()
    for row in rows:
        assert any(np.array_equal(row, w) for w in whole.values())


def test_long_documents_are_trained_on_whole(tmp_path):
    tokens, _ = write_docs(tmp_path / "t.bin", [40, 5, 30])  # BOS at 0, 41, 47; 78 tokens
    loader = TokenWindows([tmp_path / "t.bin"], "uint16", seq_len=16, bos_id=BOS, batch_size=1, seed=0)
    batches = drain_epoch(loader)
    # document starts, then 16 and 32 tokens into the first document and 16 into the last,
    # whose second window (63) would pass the end and ends there instead (start 61)
    assert sorted(int(inputs[0, 0]) for inputs, _ in batches) == sorted(tokens[[0, 16, 32, 41, 47, 61]].tolist())
    targets = {int(t) for _, target in batches for t in target[0]}
    assert targets == set(tokens[1:].tolist())


def test_each_window_once_per_epoch_and_reshuffled(shards):
    files, tokens = shards
    loader = TokenWindows(files, np.uint16, seq_len=8, bos_id=BOS, batch_size=1, seed=3)
    starts = [tuple(t[s : s + 2].tolist()) for t in tokens for s in expected_starts(t, 8)]
    epoch0 = first_ids(drain_epoch(loader))
    assert sorted(epoch0) == sorted(starts)
    epoch1 = first_ids(drain_epoch(loader))
    assert loader.epoch == 1
    assert sorted(epoch1) == sorted(starts) and epoch1 != epoch0


def test_a_window_past_the_file_end_ends_there(tmp_path):
    write_docs(tmp_path / "t.bin", [10, 10, 3])  # BOS at 0, 11, 22; file is 26 tokens
    loader = TokenWindows([tmp_path / "t.bin"], "uint16", seq_len=12, bos_id=BOS, batch_size=1, seed=0)
    assert loader.windows == 3  # from 0, 11, and 13 instead of 22 (13 tokens need 13..25)
    write_docs(tmp_path / "short.bin", [5])
    with pytest.raises(ValueError, match="document-aligned windows"):
        TokenWindows([tmp_path / "short.bin"], "uint16", seq_len=12, bos_id=BOS, batch_size=1, seed=0)


def test_index_scan_crosses_chunk_boundaries(shards, monkeypatch):
    files, _ = shards
    whole = TokenWindows(files, "uint16", seq_len=8, bos_id=BOS, batch_size=2, seed=1)
    monkeypatch.setattr(data, "SCAN_CHUNK", 7)
    chunked = TokenWindows(files, "uint16", seq_len=8, bos_id=BOS, batch_size=2, seed=1)
    assert chunked.windows == whole.windows
    assert first_ids(drain_epoch(chunked)) == first_ids(drain_epoch(whole))


def test_uint32_tokens(tmp_path):
    tokens, _ = write_docs(tmp_path / "big.bin", [30] * 5, dtype="uint32", first=70_000)
    loader = TokenWindows([tmp_path / "big.bin"], "uint32", seq_len=20, bos_id=BOS, batch_size=10, seed=0)
    assert loader.windows == len(expected_starts(tokens, 20)) == 10  # 2 per document (the last moved back)
    inputs, _ = loader.next_batch()
    assert sorted(inputs[:, 0].tolist()) == sorted(tokens[expected_starts(tokens, 20)].tolist())


def test_resume_continues_with_the_same_batches(shards):
    files, _ = shards
    make = lambda: TokenWindows(files, "uint16", seq_len=8, bos_id=BOS, batch_size=8, seed=5)  # noqa: E731
    original = make()
    for _ in range(original.batches_per_epoch - 2):
        original.next_batch()
    state = original.state_dict()
    expected = [original.next_batch() for _ in range(5)]  # runs into the next epoch
    resumed = make()
    resumed.load_state_dict(state)
    got = [resumed.next_batch() for _ in range(5)]
    for (xe, ye), (xg, yg) in zip(expected, got):
        assert torch.equal(xe, xg) and torch.equal(ye, yg)
    assert resumed.epoch == 1


def test_a_run_resumed_on_another_number_of_ranks_goes_on_with_the_items_it_had_not_reached(shards):
    files, _ = shards
    make = lambda batch, rank=0, world=1: TokenWindows(  # noqa: E731
        files, "uint16", seq_len=8, bos_id=BOS, batch_size=batch, seed=5, rank=rank, world_size=world)
    single = make(8)
    for _ in range(3):
        single.next_batch()
    state = single.state_dict()
    expected = [sorted(map(tuple, single.next_batch()[0].tolist())) for _ in range(2)]
    ranks = [make(4, rank, 2) for rank in range(2)]
    for loader in ranks:
        loader.load_state_dict(state)
    for want in expected:  # the two ranks' batches make up the batch one process would have taken
        got = [row for loader in ranks for row in map(tuple, loader.next_batch()[0].tolist())]
        assert sorted(got) == want
    with pytest.raises(ValueError, match="cannot share evenly"):
        make(8, 0, 3).load_state_dict({**state, "index": 8})


def test_state_from_other_data_or_seed_is_refused(shards):
    files, _ = shards
    state = TokenWindows(files, "uint16", seq_len=8, bos_id=BOS, batch_size=2, seed=5).state_dict()
    with pytest.raises(ValueError, match="changed"):
        TokenWindows(files, "uint16", seq_len=8, bos_id=BOS, batch_size=2, seed=6).load_state_dict(state)
    with pytest.raises(ValueError, match="changed"):
        TokenWindows(files[:1], "uint16", seq_len=8, bos_id=BOS, batch_size=2, seed=5).load_state_dict(state)


def test_ranks_get_disjoint_equal_slices(shards):
    files, _ = shards
    ranks = [TokenWindows(files, "uint16", seq_len=8, bos_id=BOS, batch_size=4, seed=2, rank=r, world_size=3) for r in range(3)]
    assert len({r.batches_per_epoch for r in ranks}) == 1
    seen = [set(first_ids(drain_epoch(r))) for r in ranks]
    assert all(len(s) == ranks[0].batches_per_epoch * 4 for s in seen)
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])


def test_too_little_data_is_a_clear_error(tmp_path):
    write_docs(tmp_path / "t.bin", [5, 5])
    with pytest.raises(ValueError, match="only 0 document-aligned windows"):
        TokenWindows([tmp_path / "t.bin"], "uint16", seq_len=64, bos_id=BOS, batch_size=1, seed=0)
    with pytest.raises(ValueError, match="uint16 or uint32"):
        TokenWindows([tmp_path / "t.bin"], "int64", seq_len=4, bos_id=BOS, batch_size=1, seed=0)


def test_eval_batches_cover_every_token_once_in_order(shards):
    files, tokens = shards
    batches = list(eval_batches(files, "uint16", seq_len=10, batch_size=3))
    targets = torch.cat([y.reshape(-1) for _, y in batches]).tolist()
    per_file = [t[1 : 1 + ((len(t) - 1) // 10) * 10].tolist() for t in tokens]
    assert targets == per_file[0] + per_file[1]
    assert all(x.shape[1] == 10 and torch.equal(x[:, 1:], y[:, :-1]) for x, y in batches)
    again = list(eval_batches(files, "uint16", seq_len=10, batch_size=3))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))


def test_eval_batches_stop_at_max_batches(shards):
    files, _ = shards
    limited = list(eval_batches(files, "uint16", seq_len=10, batch_size=3, max_batches=2))
    full = list(eval_batches(files, "uint16", seq_len=10, batch_size=3))
    assert len(limited) == 2 and len(full) > 2
    assert torch.equal(limited[1][0], full[1][0])


def sft_examples():
    # (ids, mask): a prompt (mask 0) then an answer (mask 1)
    return [
        ([1, 10, 11, 20, 21, 2], [0, 0, 0, 1, 1, 1]),
        ([1, 12, 22, 2], [0, 0, 1, 1]),
        ([1, 13, 14, 15, 23, 24, 25, 2], [0, 0, 0, 0, 1, 1, 1, 1]),
        ([1, 16, 17], [0, 0, 0]),  # nothing to learn: dropped
    ]


def test_sft_targets_mask_prompt_and_padding():
    loader = SFTBatches(sft_examples(), seq_len=32, batch_size=3, pad_id=0, seed=0)
    assert loader.examples == 3 and loader.dropped == 1
    inputs, targets = loader.next_batch()
    assert inputs.shape == targets.shape == (3, 8)  # longest example (7) rounded up to WIDTH_STEP
    rows = {int(row[1]): (row, tgt) for row, tgt in zip(inputs, targets)}
    row, tgt = rows[12]
    assert row.tolist() == [1, 12, 22, 0, 0, 0, 0, 0]
    assert tgt.tolist() == [-100, 22, 2, -100, -100, -100, -100, -100]
    row, tgt = rows[10]
    assert row.tolist() == [1, 10, 11, 20, 21, 0, 0, 0]
    assert tgt.tolist() == [-100, -100, 20, 21, 2, -100, -100, -100]
    assert rows[13][1].tolist() == [-100, -100, -100, 23, 24, 25, 2, -100]


def test_sft_truncates_to_seq_len():
    loader = SFTBatches(sft_examples(), seq_len=4, batch_size=3, pad_id=0, seed=0)
    inputs, targets = loader.next_batch()
    assert inputs.shape == (3, 4)
    rows = {int(row[1]): tgt.tolist() for row, tgt in zip(inputs, targets)}
    assert rows[13] == [-100, -100, -100, 23]


def test_sft_resume_and_ranks():
    examples = [([1, 100 + i, 200 + i, 2], [0, 0, 1, 1]) for i in range(20)]
    original = SFTBatches(examples, seq_len=8, batch_size=2, pad_id=0, seed=9, rank=1, world_size=2)
    other = SFTBatches(examples, seq_len=8, batch_size=2, pad_id=0, seed=9, rank=0, world_size=2)
    assert not set(first_ids(drain_epoch(other))) & set(first_ids(drain_epoch(original)))
    state = original.state_dict()
    expected = [original.next_batch() for _ in range(7)]
    resumed = SFTBatches(examples, seq_len=8, batch_size=2, pad_id=0, seed=9, rank=1, world_size=2)
    resumed.load_state_dict(state)
    for (xe, ye), (xg, yg) in zip(expected, [resumed.next_batch() for _ in range(7)]):
        assert torch.equal(xe, xg) and torch.equal(ye, yg)


def varied_examples(count=96, seed=0):
    """Chats of 3 to 30 tokens, each with one answer token at the end."""
    rng = np.random.default_rng(seed)
    examples = []
    for i in range(count):
        n = int(rng.integers(3, 31))
        examples.append(([1] + [100 + i] * (n - 1), [0] * (n - 1) + [1]))
    return examples


def test_length_windows_pad_less_and_still_deal_each_example_once_an_epoch():
    examples = varied_examples()
    plain = SFTBatches(examples, seq_len=32, batch_size=8, pad_id=0, seed=3)
    grouped = SFTBatches(examples, seq_len=32, batch_size=8, pad_id=0, seed=3, length_window=4)
    plain_batches, grouped_batches = drain_epoch(plain), drain_epoch(grouped)
    assert sorted(first_ids(grouped_batches)) == sorted(first_ids(plain_batches)) == [(1, 100 + i) for i in range(96)]
    assert sum(x.numel() for x, _ in grouped_batches) < 0.8 * sum(x.numel() for x, _ in plain_batches)
    # the next epoch is another order
    assert first_ids(drain_epoch(grouped)) != first_ids(grouped_batches)
    # DDP ranks still take disjoint halves
    ranks = [SFTBatches(examples, seq_len=32, batch_size=8, pad_id=0, seed=3, rank=r, world_size=2, length_window=3)
             for r in (0, 1)]
    dealt = [first_ids(drain_epoch(loader)) for loader in ranks]
    assert not set(dealt[0]) & set(dealt[1]) and len(dealt[0]) == len(dealt[1]) == 48


def test_length_window_one_is_the_plain_order_and_windows_resume_exactly():
    examples = varied_examples()
    plain = drain_epoch(SFTBatches(examples, seq_len=32, batch_size=8, pad_id=0, seed=3))
    one = drain_epoch(SFTBatches(examples, seq_len=32, batch_size=8, pad_id=0, seed=3, length_window=1))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(plain, one))
    original = SFTBatches(examples, seq_len=32, batch_size=8, pad_id=0, seed=3, length_window=4)
    for _ in range(5):
        original.next_batch()
    state = original.state_dict()
    expected = [original.next_batch() for _ in range(15)]  # into the next epoch
    resumed = SFTBatches(examples, seq_len=32, batch_size=8, pad_id=0, seed=3, length_window=4)
    resumed.load_state_dict(state)
    for (xe, _), (xg, _) in zip(expected, [resumed.next_batch() for _ in range(15)]):
        assert torch.equal(xe, xg)
    with pytest.raises(ValueError, match="length_window"):
        SFTBatches(examples, seq_len=32, batch_size=8, pad_id=0, seed=3, length_window=0)
