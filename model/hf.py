"""HF interchange: write a directory that transformers loads as `DeepseekV3ForCausalLM`,
and read such a directory back.

The layout is transformers 5's (`rope_parameters`, each layer's experts as two stacked
tensors). transformers 4 loads it without an error but with the routed experts left at random
and the rope settings at their defaults: its export needs transformers 5 or later.

Our parameter names are HF's without the `model.` prefix, so export is a rename.
MTP modules have no HF counterpart and are left out (`num_mtp_layers: 0`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from model.checkpoint import save_tensors
from model.config import ModelConfig
from model.transformer import Transformer

WEIGHTS = "model.safetensors"


def hf_config(config: ModelConfig) -> dict:
    """`config.json` for transformers' DeepseekV3Config."""
    moe = config.n_routed_experts > 0
    rope = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling:
        scaling = {k: v for k, v in config.rope_scaling.items() if k not in ("type", "rope_type")}
        rope = {"rope_type": "yarn", "rope_theta": config.rope_theta, **scaling}
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "moe_intermediate_size": config.moe_intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_attention_heads,
        "n_shared_experts": config.n_shared_experts,
        "n_routed_experts": config.n_routed_experts if moe else 1,
        "num_experts_per_tok": config.num_experts_per_tok if moe else 1,
        "first_k_dense_replace": config.first_k_dense_replace if moe else config.num_hidden_layers,
        "n_group": config.n_group if moe else 1,
        "topk_group": config.topk_group if moe else 1,
        "routed_scaling_factor": config.routed_scaling_factor,
        "norm_topk_prob": config.norm_topk_prob,
        "kv_lora_rank": config.kv_lora_rank,
        "q_lora_rank": config.q_lora_rank or None,
        "qk_rope_head_dim": config.qk_rope_head_dim,
        "qk_nope_head_dim": config.qk_nope_head_dim,
        "v_head_dim": config.v_head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "initializer_range": config.initializer_range,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_parameters": rope,
        "rope_interleave": False,
        "attention_bias": False,
        "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "num_mtp_layers": 0,
        "use_cache": True,
        "dtype": "float32",
    }


def to_hf_name(name: str) -> str:
    return name if name.startswith("lm_head.") else f"model.{name}"


def export_hf(model: Transformer, out_dir: str | Path) -> Path:
    """Write `config.json` and `model.safetensors` (fp32, MTP excluded) into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = model.config
    tensors = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("mtp.") or (config.tie_word_embeddings and name == "lm_head.weight"):
            continue
        tensors[to_hf_name(name)] = tensor.detach().to(torch.float32).contiguous().cpu()
    save_tensors(tensors, out / WEIGHTS, {"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config(config), indent=2))
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
                    "pad_token_id": config.pad_token_id}, indent=2)
    )
    return out


def import_hf(directory: str | Path) -> Transformer:
    """Load an exported directory back into our model (MTP modules freshly initialised). The
    rope settings are read in transformers 5's form (`rope_parameters`) or in the older one
    (`rope_theta` and `rope_scaling`, whose YaRN says `type` or `rope_type`)."""
    src = Path(directory)
    hf = json.loads((src / "config.json").read_text())
    rope = hf.get("rope_parameters") or {"rope_theta": hf.get("rope_theta", 10000.0), **(hf.get("rope_scaling") or {})}
    kind = rope.get("rope_type", rope.get("type"))
    scaling = {k: v for k, v in rope.items() if k not in ("rope_type", "type", "rope_theta")}
    moe = hf["first_k_dense_replace"] < hf["num_hidden_layers"]
    config = ModelConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        moe_intermediate_size=hf["moe_intermediate_size"],
        num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=hf["num_attention_heads"],
        n_shared_experts=hf["n_shared_experts"],
        n_routed_experts=hf["n_routed_experts"] if moe else 0,
        num_experts_per_tok=hf["num_experts_per_tok"],
        first_k_dense_replace=hf["first_k_dense_replace"],
        n_group=hf["n_group"],
        topk_group=hf["topk_group"],
        routed_scaling_factor=hf["routed_scaling_factor"],
        norm_topk_prob=hf["norm_topk_prob"],
        kv_lora_rank=hf["kv_lora_rank"],
        q_lora_rank=hf["q_lora_rank"] or 0,
        qk_rope_head_dim=hf["qk_rope_head_dim"],
        qk_nope_head_dim=hf["qk_nope_head_dim"],
        v_head_dim=hf["v_head_dim"],
        max_position_embeddings=hf["max_position_embeddings"],
        initializer_range=hf.get("initializer_range", 0.02),
        rms_norm_eps=hf["rms_norm_eps"],
        rope_theta=rope["rope_theta"],
        rope_scaling={"type": "yarn", **scaling} if kind == "yarn" else None,
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        bos_token_id=hf["bos_token_id"],
        eos_token_id=hf["eos_token_id"],
        pad_token_id=hf["pad_token_id"],
    )
    model = Transformer(config)
    weights = {
        (name[len("model."):] if name.startswith("model.") else name): tensor
        for name, tensor in load_file(str(src / WEIGHTS)).items()
    }
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [m for m in missing if not m.startswith("mtp.") and not (config.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"{src} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model
