"""Greedy decoding: KV-cache bytes per token and tokens/s of our latent-cache
generation (`model.generate.generate`) against transformers' `generate` on the same
weights (exported with `model.hf.export_hf`), same prompts, same number of new tokens.

    python -m benchmarks.decode --config demo --batch 1 --prompt 64 --new 128 [--kv-cache-dtype fp8] [--compile]

`--kv-cache-dtype` narrows our cache (bf16 or fp8); transformers keeps its cache in the
model's fp32. A narrower cache rounds the cached keys and values, so the completions of the
two sides may then part.

`--compile` compiles both sides' decoding with torch.compile: ours with `generate(...,
compile=True)`, transformers' the way its `generate` offers (a static cache and a
`CompileConfig` told to compile on this device too). The first, untimed run of each side
compiles; its time is printed.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from benchmarks.arguments import count
from benchmarks.common import machine, named_setup, table
from model.generate import CACHE_DTYPES, generate
from model.hf import export_hf
from model.transformer import Transformer


def hf_cache_bytes_per_token(cache, tokens: int) -> int:
    """Bytes per token (batch row) over all layers of a transformers cache holding `tokens` tokens."""
    total = 0
    for layer in cache.layers:
        for tensor in (layer.keys, layer.values):
            total += tensor.numel() * tensor.element_size()
    return total // (tokens * cache.layers[0].keys.shape[0])


def per_head_cache_bytes_per_token(model: Transformer, element_size: int) -> int:
    """What a standard per-head K/V cache would hold: every head's key and value, every layer."""
    c = model.config
    return c.num_hidden_layers * c.num_attention_heads * (c.qk_head_dim + c.v_head_dim) * element_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", choices=["demo", "4x"], default="demo",
                        help="the model compared: the demo preset's, or one about four times larger")
    parser.add_argument("--batch", type=count(1), default=1, help="prompts decoded together")
    parser.add_argument("--prompt", type=count(1), default=64, help="prompt tokens")
    parser.add_argument("--new", type=count(2), default=128,
                        help="new tokens per prompt (at least 2: the first comes with the prefill)")
    parser.add_argument("--rounds", type=count(1), default=3, help="timed runs per side, alternating")
    parser.add_argument("--threads", type=count(1), default=torch.get_num_threads(), help="torch threads")
    parser.add_argument("--kv-cache-dtype", choices=list(CACHE_DTYPES), default="auto",
                        help="our decode cache's element type (auto: the model's fp32)")
    parser.add_argument("--compile", action="store_true", help="compile both sides' decoding (torch.compile)")
    args = parser.parse_args()

    import transformers

    transformers.utils.logging.disable_progress_bar()  # its weight-loading bar, between our result lines
    torch.set_num_threads(args.threads)
    setup = named_setup(args.config)
    context = setup.model.max_position_embeddings
    if args.prompt + args.new > context:
        parser.error(f"--prompt {args.prompt} + --new {args.new} is over the model's context of {context} tokens")
    torch.manual_seed(0)
    ours = Transformer(setup.model).eval()
    with tempfile.TemporaryDirectory() as directory:
        export_hf(ours, directory)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(1)
    prompts = torch.randint(3, setup.model.vocab_size, (args.batch, args.prompt), generator=generator)
    cache_dtype = CACHE_DTYPES[args.kv_cache_dtype]

    compiled = {}
    if args.compile:
        compile_config = transformers.CompileConfig()
        compile_config._compile_all_devices = True  # transformers' own switch for compiling off CUDA
        compiled = {"cache_implementation": "static", "compile_config": compile_config}

    def run_ours(new: int) -> list[list[int]]:
        return generate(ours, prompts.tolist(), max_new_tokens=new, cache_dtype=cache_dtype, compile=args.compile)

    def run_theirs(new: int):
        with torch.no_grad():
            return theirs.generate(
                prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new, min_new_tokens=new,
                do_sample=False, return_dict_in_generate=True, pad_token_id=setup.model.pad_token_id, **compiled,
            )

    sides = {"hf": run_theirs, "ours": run_ours}
    results, warm_up = {}, {}
    for name, run in sides.items():  # also the warm-up (and compilation)
        start = time.perf_counter()
        results[name] = run(args.new)
        warm_up[name] = time.perf_counter() - start
    # per round and side: the whole generation, and the prompt plus one token (prefill)
    seconds: dict[str, list[tuple[float, float]]] = {name: [] for name in sides}
    for r in range(args.rounds):
        for name in sides if r % 2 == 0 else reversed(list(sides)):
            times = []
            for new in (args.new, 1):
                start = time.perf_counter()
                sides[name](new)
                times.append(time.perf_counter() - start)
            seconds[name].append(tuple(times))
    generated = {name: statistics.median([args.batch * args.new / whole for whole, _ in values])
                 for name, values in seconds.items()}
    decoded = {name: statistics.median([args.batch * (args.new - 1) / (whole - prefill) for whole, prefill in values])
               for name, values in seconds.items()}
    hf_tokens = results["hf"].sequences[:, args.prompt:].tolist()
    context = args.prompt + args.new - 1  # the last token is sampled, never cached
    hf_bytes = hf_cache_bytes_per_token(results["hf"].cache, context)
    ours_bytes = sum(cache.bytes_per_token() for cache in ours.new_caches(1, 1, cache_dtype))

    print(f"machine: {machine()}")
    print(f"config {args.config}: batch {args.batch}, prompt {args.prompt} tokens, {args.new} new tokens, greedy, "
          f"fp32, our KV cache {args.kv_cache_dtype}, {'compiled' if args.compile else 'eager'}; same weights; "
          f"completions identical: {hf_tokens == results['ours']}")
    print(table([("generate tokens/s", generated["hf"], generated["ours"], "(higher is better; prefill included)"),
                 ("decode tokens/s", decoded["hf"], decoded["ours"], "(higher is better; after the prefill)"),
                 ("KV cache bytes/token", hf_bytes, ours_bytes, "(lower is better; all layers)")]))
    per_head = per_head_cache_bytes_per_token(ours, 4)
    if args.compile:
        print(f"first run (compiles): transformers {warm_up['hf']:.1f} s, ours {warm_up['ours']:.1f} s")
    print(f"a per-head K/V cache (2 x heads x head_dim per layer) would hold {per_head:,} bytes/token: "
          f"ours is {ours_bytes / per_head:.3f}x of that")


if __name__ == "__main__":
    main()
