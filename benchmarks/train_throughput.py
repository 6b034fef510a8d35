"""Training-step throughput and peak memory: tinyseek against transformers'
DeepseekV3ForCausalLM built from the same config with the same weights.

One step = forward, loss, backward, gradient clipping, AdamW step (the same fused
`torch.optim.AdamW` for both, as the trainer takes it), plus our router-bias update.
MTP is switched off (num_nextn_predict_layers=0) so that both models compute the same
thing. Each model lives in its own process, loaded from the same exported weights (peak
RSS is then its own); timed bursts alternate between them after a warm-up. Last, this
process runs one forward pass of each model and sums the tensors it keeps for backward
(activations and cast weights: an exact figure, where the peak RSS moves with the allocator).

    python -m benchmarks.train_throughput --config demo --precision bf16 --steps 6
    python -m benchmarks.train_throughput --allocator retain   # both without page faults from malloc
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from benchmarks.arguments import count
from benchmarks.common import (
    RETAINING_MALLOC, Worker, alternate, hf_model, machine, named_setup, peak_rss_bytes, random_batch, saved_bytes, serve, table,
    training_step,
)
from model.hf import WEIGHTS, export_hf
from model.perf import fast_precision
from model.transformer import Transformer

MODULE = "benchmarks.train_throughput"


def build(side: str, weights: str, config_name: str) -> torch.nn.Module:
    """One side's model built from our config (transformers' through `hf_config`), with the
    weights `export_hf` wrote into the directory `weights`."""
    config = named_setup(config_name).model
    tensors = load_file(str(Path(weights) / WEIGHTS))
    if side == "hf":
        model = hf_model(config)
    else:
        model = Transformer(config)
        tensors = {name.removeprefix("model."): tensor for name, tensor in tensors.items()}
    model.load_state_dict(tensors, strict=True)
    return model


def worker(args: argparse.Namespace) -> None:
    import transformers  # noqa: F401  (both sides import it before the memory baseline)

    torch.set_num_threads(args.threads)
    setup = named_setup(args.config)
    baseline = peak_rss_bytes()
    model = build(args.side, args.weights, args.config).train()
    if args.compile:
        model = torch.compile(model)
    inputs, targets = random_batch(setup.model.vocab_size, args.micro_batch, setup.seq_len, seed=args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, fused=True)
    step = training_step(model, inputs, targets, args.precision, optimizer)

    def steps(request: dict) -> dict:
        start = time.perf_counter()
        for _ in range(request["n"]):
            step()
        return {"seconds": time.perf_counter() - start}

    params = sum(p.numel() for p in model.parameters())
    serve({"params": params, "baseline_rss": baseline, "tokens_per_step": inputs.numel()}, steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", choices=["demo", "4x"], default="demo",
                        help="the model compared: the demo preset's, or one about four times larger")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                        help="bf16: autocast on both sides; fp32: none; auto: the one the demo trains in here "
                             "(`model.perf.fast_precision`)")
    parser.add_argument("--steps", type=count(1), default=3, help="steps per timed burst")
    parser.add_argument("--rounds", type=count(1), default=4, help="timed bursts per model, alternating")
    parser.add_argument("--warmup", type=count(0), default=2, help="untimed steps per model first")
    parser.add_argument("--threads", type=count(1), default=torch.get_num_threads(), help="torch threads per side")
    parser.add_argument("--micro-batch", type=count(0), default=0, help="0: the preset's micro_batch")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the batch")
    parser.add_argument("--allocator", choices=["default", "retain"], default="default",
                        help="retain: both processes keep freed memory (glibc `RETAINING_MALLOC`), so no step "
                             "page-faults fresh memory in")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--side", choices=["ours", "hf"], help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.compile and args.warmup < 2:
        parser.error("--compile needs --warmup 2 or more: torch.compile compiles again at the second step")

    torch.set_num_threads(args.threads)
    chosen = ""
    if args.precision == "auto":
        args.precision, why = fast_precision(torch.device("cpu"))
        chosen = f" (auto: {why})"
    setup = named_setup(args.config)
    batch = args.micro_batch or setup.micro_batch
    common = ["--config", args.config, "--precision", args.precision, "--threads", str(args.threads),
              "--micro-batch", str(batch), "--seed", str(args.seed)] + (["--compile"] if args.compile else [])
    print(f"machine: {machine()}")
    print(f"config {args.config}: batch {batch} x {setup.seq_len} tokens, {args.precision}{chosen}"
          f"{', torch.compile' if args.compile else ''}; MTP excluded (num_nextn_predict_layers=0) so both "
          f"models compute the same loss; fused AdamW for both; {args.allocator} allocator for both")
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as weights:
        export_hf(Transformer(setup.model), weights)
        env = RETAINING_MALLOC if args.allocator == "retain" else None
        workers = {side: Worker(MODULE, ["--side", side, "--weights", weights, *common], env)
                   for side in ("hf", "ours")}
        params = {side: w.ready["params"] for side, w in workers.items()}
        print(f"parameters: transformers {params['hf']:,}, tinyseek {params['ours']:,}")
        alternate(workers, 1, op="steps", n=args.warmup)
        timed = alternate(workers, args.rounds, op="steps", n=args.steps)
        finals = {side: w.close() for side, w in workers.items()}
        # in this process, after the workers' peak memory is read: one forward pass of each model
        inputs, targets = random_batch(setup.model.vocab_size, batch, setup.seq_len, seed=args.seed)
        saved = {side: saved_bytes(build(side, weights, args.config).train(), inputs, targets, args.precision) / 2**20
                 for side in workers}
    tokens = workers["ours"].ready["tokens_per_step"] * args.steps
    rate = {side: statistics.median([tokens / r["seconds"] for r in timed[side]]) for side in workers}
    growth = {side: (finals[side]["peak_rss"] - workers[side].ready["baseline_rss"]) / 2**20 for side in workers}
    print(table([("training tokens/s", rate["hf"], rate["ours"], "(higher is better)"),
                 ("peak memory MiB", growth["hf"], growth["ours"],
                  "(lower is better; peak RSS over the imports: weights, grads, AdamW state, activations)"),
                 ("saved for backward MiB", saved["hf"], saved["ours"], "(lower is better; one forward pass, eager)")]))


if __name__ == "__main__":
    main()
