"""One DDP rank of a training stage, started by `tasks.distributed.launch` through torchrun.

    python -m torch.distributed.run --nproc_per_node=N -m tasks.train_worker SPEC.json
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from tasks.config import PipelineConfig
from tasks.stage import Ref, user_errors
from tasks.training import diverged_as_stage_error, train_into


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    try:
        with diverged_as_stage_error(spec["stage"]):
            train(spec)
    except user_errors() as exc:
        try:  # every rank stops on the same error; the first to get here says it
            with open(spec["error"], "x") as handle:
                handle.write(str(exc))
        except FileExistsError:
            pass
        sys.exit(1)  # not 0: torchrun then stops ranks still waiting for this one


def process_group_backend(device: torch.device) -> str:
    """NCCL for ranks training on GPUs, gloo for ranks on CPUs (also on a machine with a GPU)."""
    return "nccl" if device.type == "cuda" else "gloo"


def train(spec: dict) -> None:
    """Join the process group, build this rank's trainer and train; rank 0 writes the model."""
    config = PipelineConfig.model_validate(spec["config"])
    backend = process_group_backend(getattr(config, spec["stage"]).torch_device())
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    refs = {name: Ref.model_validate(value) for name, value in spec["refs"].items()}
    if spec["stage"] == "pretrain":
        from tasks.pretrain import build_trainer, tokenizer_dir
    else:
        from tasks.finetune import build_trainer, tokenizer_dir
    getattr(config, spec["stage"]).apply_threads()
    trainer = build_trainer(**refs, config=config, checkpoints=Path(spec["checkpoints"]), rank=rank, world=world)
    metrics_file = Path(spec["metrics"])

    def report(step: int, metrics: dict[str, float]) -> None:
        with open(metrics_file, "a") as handle:
            handle.write(json.dumps({"step": step, "metrics": metrics}) + "\n")

    trainer.callback = report
    trainer.warn = print
    if rank == 0:
        result = train_into(Path(spec["out"]), trainer, tokenizer_dir(**refs))
        Path(spec["result"]).write_text(json.dumps(result))
    else:
        trainer.resume()
        trainer.fit()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
