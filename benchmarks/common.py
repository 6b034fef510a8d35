"""What the side-by-side benchmarks share: the model configs they compare on, the
transformers peer built from the same config, the machine line printed with every
result, and worker subprocesses that are timed in alternation.

Each model runs in its own worker process, so its peak resident memory
(`ru_maxrss`) is its own, while the parent alternates short timed bursts between
the workers: noise from other load on the machine hits both sides alike, and the
ratio of the two medians is what a benchmark reports.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from model.config import ModelConfig
from model.hf import hf_config
from model.transformer import Transformer
from tasks.training_config import TrainingConfig

REPO = Path(__file__).resolve().parents[1]

# About four times the demo model's parameters (35.3M against 8.7M, MTP excluded):
# twice the width everywhere and ten routed experts instead of eight.
SCALE_4X = dict(
    hidden_size=512, num_attention_heads=8, q_lora_rank=256, kv_lora_rank=128, intermediate_size=1536,
    moe_intermediate_size=512, n_routed_experts=10,
)


@dataclass
class Setup:
    """A model config and the batch shape its preset pretrains with."""

    model: ModelConfig
    seq_len: int
    micro_batch: int
    pretrain: TrainingConfig

    def grad_accum(self, micro_batch: int, seq_len: int) -> int:
        """Micro-batches per optimizer step at this micro-batch shape, as the trainer counts them."""
        return self.pretrain.model_copy(update={"micro_batch": micro_batch, "seq_len": seq_len}).grad_accum()


def preset_setup(preset: str, **overrides: Any) -> Setup:
    """The model of a preset in `configs/` with its tokenizer's vocabulary size and without
    MTP, so that it computes exactly what transformers' DeepseekV3 computes (and what
    `flops_per_token` counts)."""
    from tasks.config import load_config

    config = load_config(preset)
    values = {**config.model, "vocab_size": config.tokenize.vocab_size, **overrides, "num_nextn_predict_layers": 0}
    pretrain = config.pretrain
    return Setup(ModelConfig.from_dict(values), pretrain.seq_len, pretrain.micro_batch, pretrain)


def named_setup(name: str) -> Setup:
    """`4x` (the demo scaled to about four times the parameters) or a preset of `configs/`."""
    if name == "4x":
        return preset_setup("demo", **SCALE_4X)
    return preset_setup(name)


def is_ours(model: torch.nn.Module) -> bool:
    """Whether `model` is our `Transformer`, compiled or not."""
    return isinstance(getattr(model, "_orig_mod", model), Transformer)


def forward_loss(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, precision: str) -> torch.Tensor:
    """The training loss, under autocast (bf16) or not (fp32), of our `Transformer` (also
    compiled) or transformers' model."""
    cast = torch.autocast(inputs.device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    with cast:
        if is_ours(model):
            out = model(inputs, targets)
            return out.loss + out.aux_loss
        return model(input_ids=inputs, labels=targets, shift_labels=targets).loss


def saved_bytes(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, precision: str) -> int:
    """Bytes of the tensors one forward pass keeps for backward (each storage counted once)."""
    storages: dict[int, int] = {}

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0), storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        forward_loss(model, inputs, targets, precision)
    return sum(storages.values())


def training_step(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, precision: str,
                  optimizer: torch.optim.Optimizer, grad_accum: int = 1) -> Callable[[], None]:
    """One full step as the trainer takes it: `forward_loss` and backward of `grad_accum`
    micro-batches (here the same one each time), clipping, optimizer step, and for our model
    the router-bias update."""
    ours = is_ours(model)
    compiled = hasattr(model, "_orig_mod")

    def step() -> None:
        for _ in range(grad_accum):
            if compiled:  # (an eager model would import inductor for it: seconds and ~125 MiB)
                # a new step for CUDA graphs (compile mode reduce-overhead): the last replay's outputs
                # may be overwritten; without the mark, a second micro-batch's replay is refused
                torch.compiler.cudagraph_mark_step_begin()
            (forward_loss(model, inputs, targets, precision) / grad_accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ours:
            getattr(model, "_orig_mod", model).update_router_bias()

    return step


def random_batch(vocab_size: int, batch: int, seq_len: int, device: str | torch.device = "cpu",
                 seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets [batch, seq_len] of seeded random tokens."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab_size, (batch, seq_len + 1), generator=generator).to(device)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def hf_model(config: ModelConfig) -> torch.nn.Module:
    """transformers' DeepseekV3ForCausalLM with our config (its default kernels)."""
    import transformers

    values = {k: v for k, v in hf_config(config).items() if k not in ("architectures", "model_type")}
    return transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**values))


def machine() -> str:
    """CPU model, core count, threads in use, torch and transformers versions."""
    import transformers

    name = platform.processor() or platform.machine()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                name = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return (f"{name}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, torch {torch.__version__}, "
            f"transformers {transformers.__version__}, python {platform.python_version()}")


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---- worker processes ------------------------------------------------------------------

# glibc malloc settings under which freed memory stays with the process: no allocation is
# served by a fresh mmap, and the heap is never trimmed. By default every large tensor
# (from 32 MiB, e.g. the logits; smaller ones once the heap top is trimmed) comes as new
# pages, each zero-filled by the kernel at first touch, again at every training step.
RETAINING_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(2**30), "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1)}


class Worker:
    """A benchmark module run as `python -m <module> --worker <args>` that answers
    JSON requests line by line on stdin/stdout (see `serve`)."""

    def __init__(self, module: str, args: list[str], env: dict[str, str] | None = None):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, "--worker", *args],
            cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env={**os.environ, **(env or {})},
        )
        self.ready = self._read()

    def _read(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"benchmark worker {self.proc.args} exited with {self.proc.wait()}")
        return json.loads(line)

    def ask(self, **request: Any) -> dict[str, Any]:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> dict[str, Any]:
        final = self.ask(op="close")
        self.proc.wait()
        return final


def serve(ready: dict[str, Any], handle: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """Worker side: announce `ready`, then answer each request with `handle(request)`
    until `close`, which answers with the peak RSS."""
    send = sys.stdout
    sys.stdout = sys.stderr  # library prints must not corrupt the protocol
    send.write(json.dumps(ready) + "\n")
    send.flush()
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "close":
            send.write(json.dumps({"peak_rss": peak_rss_bytes()}) + "\n")
            send.flush()
            return
        send.write(json.dumps(handle(request)) + "\n")
        send.flush()


def alternate(workers: dict[str, Worker], rounds: int, **request: Any) -> dict[str, list[dict[str, Any]]]:
    """Send the same request to every worker `rounds` times, the order flipping each round."""
    names = list(workers)
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            results[name].append(workers[name].ask(**request))
    return results


def table(rows: list[tuple[str, float, float, str]]) -> str:
    """Rows of (metric, peer, ours, unit) as `metric: peer | ours | ours/peer`."""
    width = max(len(r[0]) for r in rows)
    lines = [f"{'':{width}}  {'transformers':>14}  {'tinyseek':>14}  {'ours/peer':>9}"]
    for name, peer, ours, unit in rows:
        lines.append(f"{name:{width}}  {peer:>14,.1f}  {ours:>14,.1f}  {ours / peer:>8.2f}x  {unit}")
    return "\n".join(lines)
