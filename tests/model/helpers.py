"""Small model configs shared by the model tests (fast on 2 cores, fp32), and a training
step's losses and gradients."""

import torch

from model.config import ModelConfig
from model.transformer import Transformer

BASE = dict(
    vocab_size=97, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, kv_lora_rank=16,
    qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=12, intermediate_size=48, moe_intermediate_size=16,
    n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
    max_position_embeddings=64, num_nextn_predict_layers=1, routed_scaling_factor=1.5,
)

CONFIGS = {
    "plain-q": {},
    "q-lora": {"q_lora_rank": 24},
    "grouped": {"q_lora_rank": 24, "n_group": 4, "topk_group": 2, "num_experts_per_tok": 3},
    "dense": {"n_routed_experts": 0, "first_k_dense_replace": 3},
    "yarn": {"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                              "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}},
}


def config(name: str = "plain-q", **overrides) -> ModelConfig:
    return ModelConfig(**{**BASE, **CONFIGS[name], **overrides})


def losses_and_grads(model: Transformer, inputs: torch.Tensor, targets: torch.Tensor):
    """The main and MTP losses of one forward pass and the gradients of their sum."""
    model.zero_grad()
    out = model(inputs, targets)
    (out.loss + out.mtp_loss).backward()
    return out.loss.detach(), out.mtp_loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}
