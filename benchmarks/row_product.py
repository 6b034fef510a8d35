"""One-row products, what batch-1 decoding computes, for every weight shape a decoded
token multiplies: torch's `F.linear` (its BLAS) against the row product of
`model.linear.linear`, in fp32, in alternating timed bursts.

"memory": each call reads another matrix of the shape (128 MiB of them, more than the
caches hold), as decoding does, where a token's weights are gone from cache by the next
token. "cache": the same matrix every call. The row product is measured whether or not
this machine's decoding takes it (`model.linear.ROW_PRODUCT`, by CPU vendor, printed
first), through `linear` with its checks, from `ROW_PRODUCT_MIN` weight elements on (`--min`
sets another threshold for the run: `--min 0` shows the row product on every shape); the
last column says which `linear` takes here.

    python -m benchmarks.row_product --config demo [--threads 1] [--min 0]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from benchmarks.arguments import count
from benchmarks.common import machine, named_setup
from model import linear
from model.perf import cpu_vendor
from model.moe import Experts
from model.transformer import Transformer


def weight_shapes(model: Transformer) -> list[tuple[int, int]]:
    """The distinct [out, in] shapes one decoded token multiplies a row by (an expert's per
    slice; not `kv_b_proj`, which decoding absorbs into batched matmuls)."""
    shapes = {tuple(m.weight.shape) for name, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and not name.endswith("kv_b_proj")}
    for experts in (m for m in model.modules() if isinstance(m, Experts)):
        shapes |= {tuple(experts.gate_up_proj.shape[1:]), tuple(experts.down_proj.shape[1:])}
    return sorted(shapes, key=lambda s: (s[0] * s[1], s))


def microseconds(sides: dict[str, Callable[[], object]], calls: int, rounds: int) -> dict[str, float]:
    """Median µs per call of each side, bursts of `calls` alternating between the sides."""
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(rounds):
        for name, call in sides.items():
            start = time.perf_counter()
            for _ in range(calls):
                call()
            times[name].append((time.perf_counter() - start) / calls * 1e6)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", choices=["demo", "4x"], default="demo",
                        help="the model compared: the demo preset's, or one about four times larger")
    parser.add_argument("--threads", type=count(1), default=torch.get_num_threads(), help="torch threads")
    parser.add_argument("--rounds", type=count(1), default=7, help="timed bursts per side, alternating")
    parser.add_argument("--min", type=count(0), default=linear.ROW_PRODUCT_MIN,
                        help="weight elements from which `linear` takes the row product in this run")
    args = parser.parse_args()
    linear.ROW_PRODUCT_MIN = args.min
    decoding_takes_them = linear.ROW_PRODUCT
    linear.ROW_PRODUCT = True  # measured here either way

    torch.set_num_threads(args.threads)
    model = Transformer(named_setup(args.config).model)
    print(f"machine: {machine()}")
    print(f"CPU vendor {cpu_vendor() or 'unknown'}, torch with MKL: {torch.backends.mkl.is_available()}: "
          f"decoding here takes {'row products' if decoding_takes_them else 'F.linear'} for single fp32 rows")
    print(f"config {args.config}: one fp32 row times each weight shape, µs per call (median of {args.rounds} bursts; "
          f"lower is better); rows: `linear` with row products, ratio: rows / F.linear, below 1x where they are faster")
    print(f"{'weight [out, in]':>16}  {'memory: F.linear':>16}  {'rows':>8}  {'ratio':>6}  "
          f"{'cache: F.linear':>15}  {'rows':>8}  {'ratio':>6}  linear takes here")
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for out_features, in_features in weight_shapes(model):
            copies = max(2, (128 << 20) // (out_features * in_features * 4))
            weights = [torch.randn(out_features, in_features, generator=generator) for _ in range(copies)]
            row = torch.randn(1, in_features, generator=generator)
            turn = iter(range(1 << 62))

            def cold(product: Callable) -> Callable[[], object]:
                return lambda: product(row, weights[next(turn) % copies])

            def hot(product: Callable) -> Callable[[], object]:
                return lambda: product(row, weights[0])

            blas, ours = F.linear, linear.linear
            calls = max(5, min(200, (8 << 20) // (out_features * in_features)))
            memory = microseconds({"blas": cold(blas), "ours": cold(ours)}, calls, args.rounds)
            cache = microseconds({"blas": hot(blas), "ours": hot(ours)}, calls, args.rounds)
            product = decoding_takes_them and out_features * in_features >= linear.ROW_PRODUCT_MIN
            takes = "row product" if product else "F.linear"
            print(f"{str([out_features, in_features]):>16}  {memory['blas']:>16.1f}  {memory['ours']:>8.1f}  "
                  f"{memory['ours'] / memory['blas']:>5.2f}x  {cache['blas']:>15.1f}  {cache['ours']:>8.1f}  "
                  f"{cache['ours'] / cache['blas']:>5.2f}x  {takes}")


if __name__ == "__main__":
    main()
