"""Model FLOP utilisation of a training step: achieved model FLOP/s
(`flops_per_token` x tokens/s) as a fraction of the matmul peak measured on the same
machine in the same run (`model.perf.matmul_peak_flops`), per precision.

On a GPU the fraction is also given against the datasheet dense bf16 peak of known
GPUs. MTP is switched off: `flops_per_token` does not count MTP modules, so the step
computes exactly the FLOPs it is credited with.

    python -m benchmarks.mfu                                     # demo, CPU, fp32 and bf16
    python -m benchmarks.mfu --device cuda --preset gpu-small --precision bf16 --compile
    python -m benchmarks.mfu --device cpu --tiny                 # smoke test of the above
    python -m benchmarks.mfu --profile 20                        # and where one step's time goes

A step is the preset's pretraining step: `pretrain.batch_tokens` in micro-batches of
its shape (`--grad-accum 1`: one micro-batch per optimizer step).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time

import torch

from benchmarks.arguments import count
from benchmarks.common import machine, named_setup, random_batch, training_step
from model.perf import matmul_peak_flops
from model.trainer import matmul_dtype
from model.transformer import Transformer, flops_per_token
from tasks.config import presets

# dense bf16 tensor-core peaks (no sparsity), FLOP/s, by a substring of the device name
DATASHEET_BF16 = {"H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12,
                  "L40S": 362e12, "L4": 121e12, "A10": 125e12}


def datasheet_peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in DATASHEET_BF16.items() if key in name), None)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def print_profile(step, device: torch.device, rows: int) -> None:
    """The kernels (CUDA) or operators (CPU) of one more step that take the most time."""
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # no profiler_start/stop lines from kineto's "USDT" level
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profile:
        step()
        synchronize(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(profile.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=70))


def measure(args: argparse.Namespace, precision: str, device: torch.device) -> dict[str, float]:
    """Tokens/s of training steps, the warm-up steps' extra time (compilation) and, on a
    GPU, the steps' peak memory (the model, its optimizer state and the steps' tensors)."""
    setup = named_setup(args.preset)
    torch.manual_seed(0)
    model = Transformer(setup.model).to(device).train()
    batch = args.micro_batch or setup.micro_batch
    seq_len = args.seq_len or setup.seq_len
    accum = args.grad_accum or setup.grad_accum(batch, seq_len)
    inputs, targets = random_batch(setup.model.vocab_size, batch, seq_len, device)
    net = torch.compile(model, mode=args.compile_mode) if args.compile else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
    step = training_step(net, inputs, targets, precision, optimizer, accum)
    if device.type == "cuda":  # the steps' own peak: not the matmul peak's buffers, nor an earlier precision's steps
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.warmup + args.steps):
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    peak_bytes = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    seconds = statistics.median(times[args.warmup:])
    if args.profile:
        print_profile(step, device, args.profile)
    return {"tokens_per_s": accum * inputs.numel() / seconds, "flops_per_token": flops_per_token(model, seq_len),
            "warmup_extra_s": sum(times[: args.warmup]) - args.warmup * seconds, "batch": batch, "seq_len": seq_len,
            "grad_accum": accum, "peak_bytes": peak_bytes}


def compiled(args: argparse.Namespace) -> str:
    if not args.compile:
        return ""
    return " compiled" if args.compile_mode == "default" else f" compiled ({args.compile_mode})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the step runs")
    parser.add_argument("--preset", default="demo", choices=[*presets(), "4x"], help="a preset of configs/ or 4x")
    parser.add_argument("--precision", choices=["bf16", "fp32", "both"], default="both",
                        help="bf16: autocast; each precision against its own matmul peak")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--compile-mode", choices=["default", "reduce-overhead", "max-autotune-no-cudagraphs"],
                        default="default", help="torch.compile's mode (reduce-overhead: CUDA graphs)")
    parser.add_argument("--steps", type=count(1), default=5, help="timed steps (the median counts)")
    parser.add_argument("--warmup", type=count(0), default=3,
                        help="untimed steps first (compilation happens here: at least 2 with --compile)")
    parser.add_argument("--micro-batch", type=count(0), default=0, help="0: the preset's")
    parser.add_argument("--seq-len", type=count(0), default=0, help="0: the preset's")
    parser.add_argument("--grad-accum", type=count(0), default=0,
                        help="micro-batches per optimizer step; 0: as the preset's pretraining takes them "
                             "(pretrain.batch_tokens over micro-batch x seq-len)")
    parser.add_argument("--threads", type=count(1), default=torch.get_num_threads(), help="torch threads")
    parser.add_argument("--profile", type=count(0), default=0, metavar="N",
                        help="also print the N kernels (CPU: operators) of one step that take the most time")
    parser.add_argument("--tiny", action="store_true", help="smoke test: the tiny preset")
    args = parser.parse_args()
    if args.tiny:
        args.preset = "tiny"
    if args.compile and args.warmup < 2:
        parser.error("--compile needs --warmup 2 or more: torch.compile compiles again at the second step")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this torch sees no CUDA GPU (use --device cpu)")
    context = named_setup(args.preset).model.max_position_embeddings
    if args.seq_len > context:
        parser.error(f"--seq-len {args.seq_len} is over the {args.preset} model's context of {context} tokens")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    precisions = ["fp32", "bf16"] if args.precision == "both" else [args.precision]

    print(f"machine: {machine() if device.type == 'cpu' else torch.cuda.get_device_name(device)}")
    for precision in precisions:
        dtype = matmul_dtype(precision)
        # the peak is measured before and after the steps; the higher counts
        size = 8192 if device.type == "cuda" else 2048
        peak = matmul_peak_flops(device, dtype, size=size, seconds=0.5)
        result = measure(args, precision, device)
        peak = max(peak, matmul_peak_flops(device, dtype, size=size, seconds=1.0))
        achieved = result["flops_per_token"] * result["tokens_per_s"]
        line = (f"{args.preset} {precision}{compiled(args)}: batch {result['batch']} x "
                f"{result['seq_len']} ({result['grad_accum']} per optimizer step), "
                f"{result['tokens_per_s']:,.0f} tokens/s, {achieved / 1e9:,.1f} GFLOP/s "
                f"({result['flops_per_token'] / 1e6:.1f} MFLOP/token, MTP off); measured {precision} matmul peak "
                f"{peak / 1e9:,.1f} GFLOP/s -> MFU {achieved / peak:.1%}")
        sheet = datasheet_peak(device) if precision == "bf16" else None
        if sheet:
            line += f"; datasheet dense bf16 peak {sheet / 1e12:.0f} TFLOP/s -> MFU {achieved / sheet:.1%}"
        if args.compile:
            line += f"; compilation took {result['warmup_extra_s']:.1f} s"
        if device.type == "cuda":
            line += f"; peak memory of the steps {result['peak_bytes'] / 2**30:.1f} GiB"
        print(line)


if __name__ == "__main__":
    main()
