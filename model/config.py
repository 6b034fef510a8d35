"""Model configuration: one dataclass, HF `DeepseekV3Config` names where they exist.

Using the HF field names keeps export a rename, and a config that cannot work is
rejected here, at construction, with the field to fix, rather than as a shape error
deep inside a forward pass.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any


class ConfigError(ValueError):
    """A model config that cannot work; the message names the field and the fix."""


# the YaRN settings `model.rope` follows (DeepSeek-V3's); "type" or HF's "rope_type" names it
YARN_KEYS = frozenset({"type", "rope_type", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
                       "mscale", "mscale_all_dim"})


@dataclass
class ModelConfig:
    # vocabulary and width
    vocab_size: int = 4096
    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    max_position_embeddings: int = 512
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0
    # Multi-head Latent Attention
    q_lora_rank: int = 0  # 0: plain query projection
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"type": "yarn", "factor": ..., ...}
    # feed-forward: dense layers first, then DeepSeekMoE
    intermediate_size: int = 512
    first_k_dense_replace: int = 1
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 128
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    # ours: auxiliary-loss-free balancing, sequence-wise balance loss, multi-token prediction
    bias_update_speed: float = 0.001
    seq_aux_loss_alpha: float = 0.0001
    num_nextn_predict_layers: int = 1

    def __post_init__(self) -> None:
        self.validate()

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_moe_layers(self) -> int:
        return max(0, self.num_hidden_layers - self.first_k_dense_replace) if self.n_routed_experts else 0

    def is_moe_layer(self, layer_id: int) -> bool:
        return self.n_routed_experts > 0 and layer_id >= self.first_k_dense_replace

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            import difflib

            def hint(name: str) -> str:
                close = difflib.get_close_matches(name, names, 2)
                return f"{name} (did you mean {', '.join(close)}?)" if close else name

            raise ConfigError(f"unknown model config field(s): {'; '.join(map(hint, unknown))}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        def need(ok: bool, name: str, fix: str) -> None:
            if not ok:
                raise ConfigError(f"model.{name}={getattr(self, name)!r}: {fix}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "kv_lora_rank", "qk_nope_head_dim", "v_head_dim", "max_position_embeddings"):
            need(getattr(self, name) > 0, name, "must be a positive integer")
        need(self.qk_rope_head_dim > 0 and self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim",
             "RoPE rotates pairs of dimensions: use a positive even number")
        need(self.q_lora_rank >= 0, "q_lora_rank", "use 0 for a plain query projection or a positive rank")
        need(self.intermediate_size > 0 or (self.first_k_dense_replace == 0 and self.n_routed_experts > 0),
             "intermediate_size", "dense layers (the first first_k_dense_replace, or every one without routed "
             "experts) need a positive intermediate_size")
        need(0 <= self.first_k_dense_replace <= self.num_hidden_layers, "first_k_dense_replace",
             f"must be between 0 and num_hidden_layers={self.num_hidden_layers}")
        need(self.n_routed_experts >= 0, "n_routed_experts", "must be >= 0 (0 makes every layer dense)")
        # the MTP modules' layers count too: they are MoE when the experts are on
        if self.n_routed_experts and self.first_k_dense_replace < self.num_hidden_layers + self.num_nextn_predict_layers:
            need(1 <= self.num_experts_per_tok <= self.n_routed_experts, "num_experts_per_tok",
                 f"top-k must be between 1 and n_routed_experts={self.n_routed_experts}")
            need(self.moe_intermediate_size > 0, "moe_intermediate_size", "must be a positive integer")
            for name in ("hidden_size", "moe_intermediate_size"):  # grouped matmuls need 16-byte aligned rows
                need(getattr(self, name) % 8 == 0, name, "the experts' grouped matmuls need a multiple of 8")
            need(self.n_shared_experts >= 0, "n_shared_experts", "must be >= 0")
            need(self.n_group >= 1 and self.n_routed_experts % self.n_group == 0, "n_group",
                 f"must divide n_routed_experts={self.n_routed_experts}")
            need(1 <= self.topk_group <= self.n_group, "topk_group", f"must be between 1 and n_group={self.n_group}")
            per_group = self.n_routed_experts // self.n_group
            if self.n_group > 1:
                need(per_group >= 2, "n_group", "each group needs at least 2 experts (group score = top-2 sum)")
            need(self.topk_group * per_group >= self.num_experts_per_tok, "topk_group",
                 f"the {self.topk_group} selected group(s) hold {self.topk_group * per_group} experts, "
                 f"fewer than num_experts_per_tok={self.num_experts_per_tok}: raise topk_group")
        need(self.routed_scaling_factor > 0, "routed_scaling_factor", "must be positive")
        need(self.num_nextn_predict_layers >= 0, "num_nextn_predict_layers", "must be >= 0 (0 disables MTP)")
        need(self.bias_update_speed >= 0, "bias_update_speed", "must be >= 0")
        need(self.seq_aux_loss_alpha >= 0, "seq_aux_loss_alpha", "must be >= 0")
        need(self.rope_theta > 0, "rope_theta", "must be positive")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            need(0 <= getattr(self, name) < self.vocab_size, name, f"must be a token id below vocab_size={self.vocab_size}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            need(kind == "yarn", "rope_scaling", 'only {"type": "yarn", "factor": F, ...} is supported')
            factor = self.rope_scaling.get("factor", 0)
            need(isinstance(factor, (int, float)) and factor >= 1, "rope_scaling", "yarn needs factor >= 1")
            need(int(self.rope_scaling.get("original_max_position_embeddings", 0)) > 0, "rope_scaling",
                 "yarn needs original_max_position_embeddings (the context length trained before scaling)")
            # what `model.rope` reads; others (transformers' truncate, attention_factor) would be
            # exported for transformers to follow while this model ignored them
            unknown = sorted(set(self.rope_scaling) - YARN_KEYS)
            need(not unknown, "rope_scaling", f"unsupported yarn setting(s) {', '.join(unknown)}; supported: "
                 f"{', '.join(sorted(YARN_KEYS))}")
            betas = [self.rope_scaling[key] for key in ("beta_fast", "beta_slow") if key in self.rope_scaling]
            need(None not in betas, "rope_scaling", "beta_fast and beta_slow must be numbers")

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(d), times YaRN's mscale^2 when the context is extended (as DeepSeek-V3 does)."""
        scale = self.qk_head_dim**-0.5
        if self.rope_scaling and self.rope_scaling.get("mscale_all_dim"):
            mscale = yarn_mscale(self.rope_scaling["factor"], self.rope_scaling["mscale_all_dim"])
            scale *= mscale * mscale
        return scale


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0
