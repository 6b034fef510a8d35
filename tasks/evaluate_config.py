"""The evaluate stage's settings, apart from `tasks.evaluate` so that a pipeline config is
checked (`tasks.config`) without loading torch: a mistyped value fails in a second."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import Field

from tasks.settings import Settings

# what `tasks.evaluate` measures on each model (written with a _base and a _tuned suffix), and
# on the fine-tuning run (written as is)
MODEL_METRICS = ("val_loss", "val_bpb", "val_max_vio", "exact_match_mean")
RUN_METRICS = ("max_vio_final",)


def metric_names(families: Sequence[str]) -> list[str]:
    """Every name `primary_metric` may take for a run with these instruction families: a
    model's metric with a _base or _tuned suffix, or without one (the fine-tuned model's)."""
    per_model = [*MODEL_METRICS, *(f"exact_match_{family}" for family in families)]
    return [*(f"{name}{suffix}" for name in per_model for suffix in ("", "_tuned", "_base")), *RUN_METRICS]


class EvaluateConfig(Settings):
    """What to measure on the base and fine-tuned models, and how much of it."""

    max_new_tokens: int = Field(32, ge=1, description="Most tokens generated for one answer or sample.")
    batch_size: int = Field(32, ge=1, description="Prompts or validation windows per forward pass.")
    max_examples_per_family: int = Field(
        100, ge=1, description="Held-out instruction problems scored per task family (the first of the test split)."
    )
    val_batches: int = Field(16, ge=1, description="Validation batches the loss is averaged over.")
    seq_len: int = Field(
        256, ge=8, description="Tokens per validation window (capped at the model's max_position_embeddings)."
    )
    primary_metric: str = Field(
        "exact_match_mean",
        description="Metric that decides promotion over the champion: a metrics.json name; without a _base/_tuned "
        "suffix it means the fine-tuned model's. Names with loss, bpb or max_vio are better when lower.",
    )
    prompts: list[str] = Field(
        default_factory=lambda: ["def ", "Return the", "The module"],
        description="Text the models continue as in pretraining (greedy samples).",
    )
    chat_prompts: list[str] = Field(
        default_factory=lambda: ["Convert 3 kilometers to meters.", "What is 12 + 7?", "Reverse the word 'stone'."],
        description="Instructions the models answer as a user turn in the chat format (greedy samples).",
    )
    next_token_prompts: list[str] = Field(
        default_factory=lambda: ["import ", "def __init__(self", "Return the"],
        description="Prompts whose most likely next tokens are listed for both models.",
    )
    top_k_tokens: int = Field(5, ge=1, description="Next-token candidates listed per prompt.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where to run the models.")
    kv_cache_dtype: Literal["auto", "bf16", "fp8"] = Field(
        "auto",
        description="Element type of the decode cache when the models generate: auto (the model's), bf16 or fp8 "
        "(e4m3, a quarter of fp32). Narrower caches round the cached keys and values; evaluate with one to see "
        "what that costs. A run evaluated with one registers nothing: served models decode with their own dtype.",
    )
