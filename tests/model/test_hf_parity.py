"""Our forward pass against transformers' DeepseekV3ForCausalLM on exported weights."""

import json

import pytest
import torch
import transformers

from model.hf import export_hf, import_hf
from model.transformer import Transformer
from tests.model.helpers import CONFIGS, config


def perturb_router_bias(model: Transformer) -> None:
    """Non-zero selection biases, so the parity check covers them too."""
    for moe in model.moe_layers():
        moe.gate.e_score_correction_bias.normal_(0, 0.05)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_transformers(name, tmp_path):
    torch.manual_seed(0)
    ours = Transformer(config(name)).eval()
    perturb_router_bias(ours)
    export_hf(ours, tmp_path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(theirs).__name__ == "DeepseekV3ForCausalLM"
    ids = torch.randint(0, ours.config.vocab_size, (2, 40))
    with torch.no_grad():
        expected = theirs(ids).logits
        got = ours(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_import_round_trip(tmp_path):
    torch.manual_seed(1)
    ours = Transformer(config("grouped")).eval()
    perturb_router_bias(ours)
    export_hf(ours, tmp_path)
    back = import_hf(tmp_path).eval()
    ids = torch.randint(0, ours.config.vocab_size, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, ours(ids).logits, atol=0, rtol=0)


@pytest.mark.parametrize("key", ["type", "rope_type"])
def test_import_reads_the_older_rope_settings(tmp_path, key):
    """Configs written before transformers 5 keep rope_theta and rope_scaling at the top."""
    torch.manual_seed(2)
    ours = Transformer(config("yarn")).eval()
    export_hf(ours, tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    rope = written.pop("rope_parameters")
    assert rope["rope_type"] == "yarn"
    written["rope_theta"] = rope.pop("rope_theta")
    written["rope_scaling"] = {key: rope.pop("rope_type"), **rope}
    (tmp_path / "config.json").write_text(json.dumps(written))
    back = import_hf(tmp_path).eval()
    assert back.config.rope_scaling == ours.config.rope_scaling and back.config.rope_theta == ours.config.rope_theta
    ids = torch.randint(0, ours.config.vocab_size, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, ours(ids).logits, atol=0, rtol=0)
