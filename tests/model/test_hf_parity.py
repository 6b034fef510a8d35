"""Our forward pass against transformers' DeepseekV3ForCausalLM on exported weights."""

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
