import hashlib
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from model.checkpoint import (
    Checkpoint,
    CheckpointError,
    capture_rng,
    load_checkpoint,
    load_latest,
    restore_rng,
    save_checkpoint,
)
from tests.processes import dead_pid


def trained():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(16, 4), nn.Linear(4, 16))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.tensor([1, 2, 3])).sum().backward()
    optimizer.step()
    return model, optimizer


def save(root, step, keep_last=3, **extra):
    model, optimizer = trained()
    return save_checkpoint(
        root,
        step,
        model_state=model.state_dict(),
        optimizer_state=optimizer.state_dict(),
        extra={"step_seen": step, **extra},
        keep_last=keep_last,
    )


def steps(root):
    return sorted(p.name for p in Path(root).iterdir() if not p.name.startswith("."))


def test_round_trip(tmp_path):
    model, optimizer = trained()
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    state = {
        **model.state_dict(),
        "tied": model[0].weight,  # the same tensor under a second name
        "transposed": base.t(),  # not contiguous
        "slice": base[1],  # overlaps another tensor's memory
        "base": base,
        "half": torch.ones(3, dtype=torch.bfloat16),
    }
    extra = {"loader": {"epoch": 1, "index": 96}, "config": {"dim": 4, "name": "tiny"}, "lr": 0.001}
    path = save_checkpoint(tmp_path, 123, model_state=state, optimizer_state=optimizer.state_dict(), extra=extra)
    assert path == tmp_path / "step-000123"
    assert sorted(p.name for p in path.iterdir()) == ["meta.json", "model.safetensors", "optimizer.pt", "rng.pt"]

    loaded = load_latest(tmp_path)
    assert isinstance(loaded, Checkpoint)
    assert loaded.step == 123 and loaded.path == path and loaded.extra == extra
    assert loaded.model_state.keys() == state.keys()
    for name, tensor in state.items():
        assert torch.equal(loaded.model_state[name], tensor), name
        assert loaded.model_state[name].dtype == tensor.dtype
    assert loaded.model_state["tied"] is loaded.model_state["0.weight"]

    fresh = torch.optim.AdamW(nn.Sequential(nn.Embedding(16, 4), nn.Linear(4, 16)).parameters(), lr=1e-2)
    fresh.load_state_dict(loaded.optimizer_state)
    for key, value in optimizer.state_dict()["state"][0].items():
        assert torch.equal(fresh.state_dict()["state"][0][key], value)


def test_rng_states_restore(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    save_checkpoint(tmp_path, 1, model_state={}, optimizer_state={}, extra={})
    expected = (random.random(), np.random.rand(), torch.rand(2))
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    restore_rng(load_latest(tmp_path).rng)
    got = (random.random(), np.random.rand(), torch.rand(2))
    assert expected[:2] == got[:2] and torch.equal(expected[2], got[2])


def test_capture_restore_in_memory():
    state = capture_rng()
    first = (random.random(), np.random.rand(), torch.rand(1))
    restore_rng(state)
    assert (random.random(), np.random.rand()) == first[:2]
    assert torch.equal(torch.rand(1), first[2])


def test_keep_last(tmp_path):
    for step in (10, 20, 30, 40, 50):
        save(tmp_path, step, keep_last=2)
    assert steps(tmp_path) == ["step-000040", "step-000050"]
    assert load_latest(tmp_path).step == 50


def test_later_steps_from_an_abandoned_timeline_are_dropped(tmp_path):
    for step in (1, 2, 3):
        save(tmp_path, step)
    save(tmp_path, 2, note="resumed from step 1")
    assert steps(tmp_path) == ["step-000001", "step-000002"]
    assert load_latest(tmp_path).extra["note"] == "resumed from step 1"


def test_same_step_is_replaced(tmp_path):
    save(tmp_path, 7, note="first")
    save(tmp_path, 7, note="second")
    assert steps(tmp_path) == ["step-000007"]
    assert load_latest(tmp_path).extra["note"] == "second"


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_byte(path):
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda d: truncate(d / "model.safetensors"), "model.safetensors does not match its checksum"),
        (lambda d: flip_byte(d / "optimizer.pt"), "optimizer.pt does not match its checksum"),
        (lambda d: (d / "rng.pt").unlink(), "FileNotFoundError"),
        (lambda d: truncate(d / "meta.json"), "JSONDecodeError"),
    ],
)
def test_damaged_newest_falls_back_to_previous(tmp_path, damage, reason):
    save(tmp_path, 1)
    save(tmp_path, 2)
    damage(tmp_path / "step-000002")
    warnings = []
    loaded = load_latest(tmp_path, on_warning=warnings.append)
    assert loaded.step == 1
    assert len(warnings) == 1 and "step-000002" in warnings[0] and reason in warnings[0]


def test_all_damaged_gives_none(tmp_path, caplog):
    save(tmp_path, 1)
    truncate(tmp_path / "step-000001" / "model.safetensors")
    assert load_latest(tmp_path) is None
    assert "skipping checkpoint" in caplog.text
    with pytest.raises(CheckpointError, match="checksum"):
        load_checkpoint(tmp_path / "step-000001")


def test_nothing_there(tmp_path):
    assert load_latest(tmp_path / "missing") is None
    assert load_latest(tmp_path) is None


def test_leftover_temp_dir_is_ignored_then_cleaned(tmp_path):
    save(tmp_path, 1)
    leftover = tmp_path / f".step-000002.tmp-{dead_pid()}-abcd1234"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half written")
    assert load_latest(tmp_path).step == 1
    save(tmp_path, 3)
    assert not leftover.exists()
    assert load_latest(tmp_path).step == 3


def test_extra_must_be_json(tmp_path):
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path, 1, model_state={}, optimizer_state={}, extra={"when": object()})
    assert list(tmp_path.iterdir()) == []


class Payload:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path(self.marker).touch, ())


def test_pickled_objects_are_never_loaded(tmp_path):
    save(tmp_path, 1)
    path = save(tmp_path, 2)
    marker = tmp_path / "executed"
    torch.save({"state": {}, "param_groups": [], "evil": Payload(marker)}, path / "optimizer.pt")
    meta = json.loads((path / "meta.json").read_text())
    meta["sha256"]["optimizer.pt"] = hashlib.sha256((path / "optimizer.pt").read_bytes()).hexdigest()  # a consistent, hostile checkpoint
    (path / "meta.json").write_text(json.dumps(meta))

    warnings = []
    loaded = load_latest(tmp_path, on_warning=warnings.append)
    assert loaded.step == 1
    assert "UnpicklingError" in warnings[0]
    assert not marker.exists()
    assert os.listdir(path)  # the hostile checkpoint is reported, not deleted


def test_save_and_load_model_round_trip(tmp_path):
    from model.checkpoint import load_model, save_model
    from model.config import ModelConfig
    from model.transformer import Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                    kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                                    intermediate_size=48, moe_intermediate_size=16, tie_word_embeddings=True))
    model.moe_layers()[0].gate.e_score_correction_bias.fill_(0.25)
    save_model(model, tmp_path)
    back = load_model(tmp_path)
    assert back.config == model.config
    assert back.lm_head.weight is back.embed_tokens.weight
    for name, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_weights_get_the_permissions_of_any_new_file(tmp_path, umask):
    from model.checkpoint import save_tensors

    before = os.umask(umask)
    try:
        save_tensors({"w": torch.zeros(2)}, tmp_path / "w.safetensors", {"format": "pt"})
        (tmp_path / "config.json").write_text("{}")
        checkpoint = save(tmp_path / "checkpoints", 1)
    finally:
        os.umask(before)
    expected = (tmp_path / "config.json").stat().st_mode
    assert oct((tmp_path / "w.safetensors").stat().st_mode) == oct(expected) == oct(0o100666 & ~umask)
    assert all(oct(path.stat().st_mode) == oct(expected) for path in checkpoint.iterdir()), checkpoint


@pytest.mark.parametrize("damage", ["truncate", "config", "missing", "shape"])
def test_a_damaged_model_directory_is_a_checkpoint_error(tmp_path, damage):
    from model.checkpoint import MODEL_CONFIG_FILE, MODEL_FILE, load_model, save_model
    from model.transformer import Transformer
    from tests.model.helpers import config

    save_model(Transformer(config()), tmp_path)
    weights = tmp_path / MODEL_FILE
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "config":
        (tmp_path / MODEL_CONFIG_FILE).write_text('{"hidden_size": ')
    elif damage == "missing":
        weights.unlink()
    else:  # weights of another model: the message names a mismatch, not only torch's "Error(s) in loading ...:"
        changed = json.loads((tmp_path / MODEL_CONFIG_FILE).read_text())
        (tmp_path / MODEL_CONFIG_FILE).write_text(json.dumps({**changed, "vocab_size": changed["vocab_size"] + 1}))
    with pytest.raises(CheckpointError, match=f"cannot load the model in {tmp_path}") as caught:
        load_model(tmp_path)
    assert "\n" not in str(caught.value)
    if damage == "shape":
        assert "for Transformer: size mismatch for " in str(caught.value)


def test_a_long_error_in_one_line_keeps_a_cause():
    from model.checkpoint import ONE_LINE_CHARS, one_line

    assert one_line("first\nsecond") == "first"
    assert one_line("Error(s) in loading state_dict for T:\n\tsize mismatch for a.\n\tsize mismatch for b.") == \
        "Error(s) in loading state_dict for T: size mismatch for a."
    download = "The following failures occurred while downloading artifacts from file:///x:\n##### File m #####\n" \
               "[Errno 28] No space left on device: '/cache/m'\n"
    assert one_line(download).endswith("file:///x: [Errno 28] No space left on device: '/cache/m'")
    html = ("failures … from http://mlflow:5000/m:\n##### File m #####\n"
            "error code 502 != 200. body: '<html>\r\n</html>\r\n'")
    assert one_line(html) == "failures … from http://mlflow:5000/m: error code 502 != 200. body: '<html>"
    long = one_line("Missing key(s): " + ", ".join(f'"layers.{i}.weight"' for i in range(100)))
    assert len(long) == ONE_LINE_CHARS and long.endswith("…")


def test_weights_that_cannot_be_written_are_an_os_error(tmp_path, monkeypatch):
    """safetensors raises its own error on a full disk: callers that report OSErrors report it too."""
    from safetensors import SafetensorError

    from model import checkpoint

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(checkpoint, "save_file", full)
    with pytest.raises(OSError) as caught:
        checkpoint.save_tensors({"w": torch.zeros(2)}, tmp_path / "w.safetensors", {"format": "pt"})
    assert (caught.value.errno, caught.value.strerror) == (28, "No space left on device")
