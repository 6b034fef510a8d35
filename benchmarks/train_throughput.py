"""Training-step throughput and peak memory: tinyseek against transformers'
DeepseekV3ForCausalLM built from the same config with the same weights.

One step = forward, loss, backward, gradient clipping, AdamW step (the same
`torch.optim.AdamW` for both), plus our router-bias update. MTP is switched off
(num_nextn_predict_layers=0) so that both models compute the same thing. Each
model lives in its own process (peak RSS is then its own); timed bursts alternate
between them after a warm-up.

    python -m benchmarks.train_throughput --config demo --precision bf16 --steps 6
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from benchmarks.common import Worker, alternate, hf_model, machine, median, named_setup, peak_rss_bytes, serve, table
from model.hf import to_hf_name
from model.transformer import Transformer, parameter_counts

MODULE = "benchmarks.train_throughput"


def build(side: str, config_name: str, seed: int) -> tuple[torch.nn.Module, int]:
    """The model of one side with the weights of `Transformer(config)` seeded by `seed`."""
    setup = named_setup(config_name)
    torch.manual_seed(seed)
    ours = Transformer(setup.model)
    if side == "ours":
        return ours, parameter_counts(ours)["total"]
    theirs = hf_model(setup.model)
    missing, unexpected = theirs.load_state_dict({to_hf_name(k): v for k, v in ours.state_dict().items()}, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"weights do not map onto transformers' model: {missing[:3]} {unexpected[:3]}")
    return theirs, sum(p.numel() for p in theirs.parameters())


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    setup = named_setup(args.config)
    batch = args.micro_batch or setup.micro_batch
    baseline = peak_rss_bytes()
    model, params = build(args.side, args.config, args.seed)
    model.train()
    if args.compile:
        model = torch.compile(model)
    generator = torch.Generator().manual_seed(args.seed)
    tokens = torch.randint(0, setup.model.vocab_size, (batch, setup.seq_len + 1), generator=generator)
    inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, foreach=True)
    cast = (torch.autocast("cpu", dtype=torch.bfloat16) if args.precision == "bf16" else contextlib.nullcontext())

    def loss() -> torch.Tensor:
        if args.side == "ours":
            out = model(inputs, targets)
            return out.loss + out.aux_loss
        return model(input_ids=inputs, labels=targets, shift_labels=targets).loss

    def steps(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            with cast:
                value = loss()
            value.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if args.side == "ours":
                model.update_router_bias()
        return time.perf_counter() - start

    def handle(request: dict) -> dict:
        return {"seconds": steps(request["n"])}

    serve({"params": params, "baseline_rss": baseline, "tokens_per_step": inputs.numel()}, handle)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=["demo", "4x"], default="demo")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--steps", type=int, default=3, help="steps per timed burst")
    parser.add_argument("--rounds", type=int, default=4, help="timed bursts per model, alternating")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per model first")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--micro-batch", type=int, default=0, help="0: the preset's micro_batch")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--side", choices=["ours", "hf"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    torch.set_num_threads(args.threads)
    setup = named_setup(args.config)
    batch = args.micro_batch or setup.micro_batch
    common = ["--config", args.config, "--precision", args.precision, "--threads", str(args.threads),
              "--micro-batch", str(batch), "--seed", str(args.seed)] + (["--compile"] if args.compile else [])
    print(f"machine: {machine()}")
    print(f"config {args.config}: batch {batch} x {setup.seq_len} tokens, {args.precision}"
          f"{', torch.compile' if args.compile else ''}; MTP excluded (num_nextn_predict_layers=0) so both "
          f"models compute the same loss; AdamW (foreach) for both")
    workers = {side: Worker(MODULE, ["--side", side, *common]) for side in ("hf", "ours")}
    params = {side: w.ready["params"] for side, w in workers.items()}
    print(f"parameters: transformers {params['hf']:,}, tinyseek {params['ours']:,}")
    alternate(workers, 1, op="steps", n=args.warmup)
    timed = alternate(workers, args.rounds, op="steps", n=args.steps)
    finals = {side: w.close() for side, w in workers.items()}
    tokens = workers["ours"].ready["tokens_per_step"] * args.steps
    rate = {side: median([tokens / r["seconds"] for r in timed[side]]) for side in workers}
    peak = {side: (finals[side]["peak_rss"] - workers[side].ready["baseline_rss"]) / 2**20 for side in workers}
    print(table([("training tokens/s", rate["hf"], rate["ours"], "(higher is better)"),
                 ("peak memory MiB", peak["hf"], peak["ours"], "(lower is better; RSS growth after imports)")]))


if __name__ == "__main__":
    main()
