import io

import pytest
import torch
from torch import nn

from model.muon import GroupedMuon
from model.optim import CombinedOptimizer, build_optimizer, split_params


class Norm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class Gate(nn.Module):
    def __init__(self, dim, experts):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(experts, dim) * 0.02)
        self.register_buffer("e_score_correction_bias", torch.zeros(experts))


class Block(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.input_layernorm = Norm(dim)
        self.q_proj = nn.Linear(dim, dim, bias=True)
        self.gate = Gate(dim, 4)

    def forward(self, x):
        return x + self.q_proj(self.input_layernorm(x)) + 0 * (x @ self.gate.weight.T).sum()


class Tiny(nn.Module):
    def __init__(self, vocab=32, dim=8):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList([Block(dim)])
        self.pos_embed = nn.Parameter(torch.zeros(4, dim))
        self.norm = Norm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.frozen = nn.Parameter(torch.ones(dim, dim), requires_grad=False)

    def forward(self, ids):
        x = self.embed_tokens(ids) + self.pos_embed[: ids.shape[1]]
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


def names(named):
    return sorted(name for name, _ in named)


def test_adamw_split_decays_only_matrices():
    split = split_params(Tiny())
    assert names(split.decay) == ["layers.0.gate.weight", "layers.0.q_proj.weight", "lm_head.weight"]
    assert names(split.no_decay) == [
        "embed_tokens.weight",
        "layers.0.input_layernorm.weight",
        "layers.0.q_proj.bias",
        "norm.weight",
        "pos_embed",
    ]
    assert split.muon == []


def test_muon_split_keeps_embeddings_and_head_on_adamw():
    split = split_params(Tiny(), muon=True)
    assert names(split.muon) == ["layers.0.gate.weight", "layers.0.q_proj.weight"]
    assert names(split.decay) == ["lm_head.weight"]
    assert "embed_tokens.weight" in names(split.no_decay)


def test_tied_head_counts_as_embedding():
    class HeadFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.lm_head = nn.Linear(8, 32, bias=False)
            self.tok = nn.Embedding(32, 8)
            self.tok.weight = self.lm_head.weight

    split = split_params(HeadFirst(), muon=True)
    assert names(split.no_decay) == ["lm_head.weight"]
    assert split.decay == [] and split.muon == []


def test_build_adamw_groups_and_fused_on_cpu():
    model = Tiny()
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    assert isinstance(opt, torch.optim.AdamW)
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["decay"]["weight_decay"] == 0.1
    assert groups["no_decay"]["weight_decay"] == 0.0
    assert groups["decay"]["betas"] == (0.9, 0.95)
    assert groups["decay"]["fused"] is True and not groups["decay"]["foreach"]
    covered = {id(p) for g in opt.param_groups for p in g["params"]}
    assert covered == {id(p) for p in model.parameters() if p.requires_grad}


def test_multi_tensor_path_can_be_chosen():
    opt = build_optimizer(Tiny(), lr=1e-3, weight_decay=0.1, fused=False)
    assert all(g["foreach"] and not g["fused"] for g in opt.param_groups)


def run_steps(opt, model, steps=3):
    ids = torch.tensor([[1, 2, 3, 4]])
    for _ in range(steps):
        opt.zero_grad()
        model(ids).logsumexp(-1).mean().backward()
        opt.step()


def test_muon_combined_optimizer_trains_and_round_trips_state():
    torch.manual_seed(0)
    model = Tiny()
    opt = build_optimizer(model, lr=1e-2, weight_decay=0.1, kind="muon")
    assert isinstance(opt, CombinedOptimizer)
    assert isinstance(opt.optimizers[0], GroupedMuon)
    assert [g["name"] for g in opt.param_groups] == ["muon", "decay", "no_decay"]
    before = model.layers[0].q_proj.weight.detach().clone()
    run_steps(opt, model)
    assert not torch.equal(before, model.layers[0].q_proj.weight)

    for group in opt.param_groups:
        group["lr"] = 5e-3
    assert all(g["lr"] == 5e-3 for o in opt.optimizers for g in o.param_groups)

    clone = Tiny()
    clone.load_state_dict(model.state_dict())
    clone_opt = build_optimizer(clone, lr=1e-2, weight_decay=0.1, kind="muon")
    saved = io.BytesIO()
    torch.save(opt.state_dict(), saved)
    saved.seek(0)
    clone_opt.load_state_dict(torch.load(saved, weights_only=True))
    run_steps(opt, model, 2)
    run_steps(clone_opt, clone, 2)
    for a, b in zip(model.parameters(), clone.parameters()):
        assert torch.equal(a, b)


def test_combined_state_must_match():
    opt = build_optimizer(Tiny(), lr=1e-3, weight_decay=0.1, kind="muon")
    with pytest.raises(ValueError, match="optimizers"):
        opt.load_state_dict({"optimizers": [opt.optimizers[0].state_dict()]})


def test_unknown_kind():
    with pytest.raises(ValueError, match="sgd"):
        build_optimizer(Tiny(), lr=1e-3, weight_decay=0.1, kind="sgd")
