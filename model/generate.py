"""Text generation over the latent (MLA) cache: greedy, temperature, top-k, top-p,
stop tokens, a batch of prompts (left-padded), a token-by-token stream, and a cache in
the model's dtype or a narrower one (`CACHE_DTYPES`)."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Sequence

import torch

from model.moe import Experts
from model.perf import cpp_compiler
from model.transformer import Transformer

# the decode cache's element type by name; "auto" keeps the model's dtype. bf16 halves an fp32
# cache and fp8 (e4m3) quarters it; both round the cached keys and values, so greedy answers
# can change (`model.attention.LatentCache`)
CACHE_DTYPES: dict[str, torch.dtype | None] = {"auto": None, "bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}


def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token ids [B] from logits [B, vocab]; temperature 0 means greedy, as does one
    below fp32's smallest normal number, which the division would round to 0 (its limit)."""
    if temperature < torch.finfo(torch.float32).smallest_normal:
        return logits.argmax(dim=-1)
    logits = logits.float()
    # the largest made 0 first: a tiny temperature then sends the others to -inf rather than
    # the largest to inf, which softmax would turn into NaN
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the tokens before it already reach top_p (always keep the first)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p
        drop[:, 0] = False  # also when top_p rounds to 0 in the logits' dtype
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# graphs compiled decoding may keep for `Transformer.forward_cached`: one per model config, cache
# dtype and batch class (one prompt or more), against torch's default of 8 per function
RECOMPILE_LIMIT = 64


@functools.cache
def _compiled_forward_cached() -> Callable[..., torch.Tensor]:
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    return torch.compile(Transformer.forward_cached, fullgraph=True, dynamic=True)


def compiled_step(model: Transformer) -> Callable[..., torch.Tensor]:
    """`model.forward_cached` compiled with torch.compile (inductor), for decoding.

    A decoded token makes ~340 small calls; eagerly each costs a few µs of dispatch, about
    half of a demo model's token on a CPU. Compiled, they run as a few fused loops. The
    first call compiles (~15 s for the demo model on 2 cores; a few seconds once torch's
    disk cache holds the kernels). The cache position is a symbolic size; one prompt
    against several, and each cache dtype, compile once more. Models of one config share
    their graphs (the weights are inputs). The results equal eager decoding's up to rounding.
    """
    return functools.partial(_compiled_forward_cached(), model)


@torch.inference_mode()
def decode_steps(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    cache_dtype: torch.dtype | None = None,
    compile: bool = False,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every prompt, step by step ([B] per step); the cache holds
    `cache_dtype` (None: the model's dtype). With `compile`, the steps after the prompt of a
    batch of up to `Experts.DECODE_ROWS` prompts run through `compiled_step`, with a mask and
    over a cache of the model's whole context, so that shapes do not change from one
    generation to the next; larger batches decode eagerly."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if max_new_tokens < 0 or not 0 <= temperature < math.inf or top_k < 0 or not 0 < top_p <= 1:
        raise ValueError(f"generation needs max_new_tokens >= 0, a finite temperature >= 0, top_k >= 0 and "
                         f"0 < top_p <= 1; got {max_new_tokens}, {temperature}, {top_k} and {top_p}")
    longest = max(len(p) for p in prompts)
    limit = model.config.max_position_embeddings
    if longest + max_new_tokens > limit:
        raise ValueError(
            f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"max_position_embeddings={limit}"
        )
    device = model.embed_tokens.weight.device
    total = longest + max_new_tokens
    pads = torch.tensor([longest - len(p) for p in prompts], device=device)
    padded = any(len(p) < longest for p in prompts)
    ids = torch.tensor(
        [[model.config.pad_token_id] * (longest - len(p)) + list(p) for p in prompts], device=device
    )
    slots = torch.arange(total, device=device)
    visible = slots[None, :] >= pads[:, None]  # [B, total]: slots holding real tokens
    compile = compile and len(prompts) <= Experts.DECODE_ROWS
    if compile and device.type == "cpu" and cpp_compiler() is None:
        raise ValueError("compiled decoding needs a C++ compiler on a CPU (torch.compile builds its kernels "
                         "with $CXX, g++ or clang++) and none was found: install one or decode eagerly")
    caches = model.new_caches(len(prompts), limit if compile else total, cache_dtype)
    step_forward = compiled_step(model) if compile else model.forward_cached
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None

    positions = (slots[None, :longest] - pads[:, None]).clamp(min=0)
    causal = slots[:longest, None] >= slots[None, :longest]
    # real tokens never see padding; a pad token sees only itself (so no row is empty)
    mask = (visible[:, None, :longest] & causal[None]) | torch.eye(longest, dtype=torch.bool, device=device)
    was_training = model.training
    model.eval()
    try:
        logits = model.forward_cached(ids, positions, caches, 0, mask)[:, -1]
        for step in range(max_new_tokens):
            token = sample_next(logits, temperature, top_k, top_p, generator)
            yield token
            if step + 1 == max_new_tokens:
                break
            start = longest + step
            positions = (start - pads)[:, None]
            # without padding every slot is visible (compiled: a mask all the same, one graph fewer)
            step_mask = visible[:, None, : start + 1] if padded or compile else None
            logits = step_forward(token[:, None], positions, caches, start, step_mask)[:, -1]
    finally:
        model.train(was_training)


def generate(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_ids: Sequence[int] = (),
    seed: int | None = None,
    cache_dtype: torch.dtype | None = None,
    compile: bool = False,
) -> list[list[int]]:
    """Completions (without the prompt) for a batch of prompts; each stops after a stop id
    (the stop id itself is not returned)."""
    out: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    stops = set(stop_ids)
    for tokens in decode_steps(model, prompts, max_new_tokens, temperature, top_k, top_p, seed, cache_dtype, compile):
        for row, token in enumerate(tokens.tolist()):
            if done[row]:
                continue
            if token in stops:
                done[row] = True
            else:
                out[row].append(token)
        if all(done):
            break
    return out


def stream(
    model: Transformer,
    prompt: Sequence[int],
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_ids: Sequence[int] = (),
    seed: int | None = None,
    cache_dtype: torch.dtype | None = None,
    compile: bool = False,
) -> Iterator[int]:
    """Yield one prompt's completion token by token, ending at a stop id."""
    for tokens in decode_steps(model, [prompt], max_new_tokens, temperature, top_k, top_p, seed, cache_dtype, compile):
        token = int(tokens[0])
        if token in stop_ids:
            return
        yield token
