"""Optimizer construction: which parameters decay, and which optimizer updates them.

Weight decay belongs on the weight matrices that mix features (attention and MLP
projections, MoE router weights, the output head). It is left off norms, biases and
embeddings: decaying a norm gain or an embedding row pulls it towards zero for no
benefit, and embeddings of rare tokens would shrink between their rare updates.

`kind="muon"` updates the hidden 2-D matrices with Muon (orthogonalised momentum:
`torch.optim.Muon`, batched by matrix shape in `model.muon.GroupedMuon`) and everything
else (embeddings, the output head, norms, biases, tensors of other ranks) with AdamW, as
the Muon authors recommend. Muon scales its update with
`adjust_lr_fn="match_rms_adamw"`, so one learning rate and one schedule drive both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from model.muon import GroupedMuon

OptimizerKind = Literal["adamw", "muon"]
HEAD_NAMES = ("lm_head", "head")
FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class ParamSplit:
    """Named trainable parameters sorted by how they are updated."""

    decay: list[tuple[str, nn.Parameter]] = field(default_factory=list)
    no_decay: list[tuple[str, nn.Parameter]] = field(default_factory=list)
    muon: list[tuple[str, nn.Parameter]] = field(default_factory=list)


def _special_ids(model: nn.Module) -> tuple[set[int], set[int]]:
    """Ids of embedding parameters and of output-head parameters (a tied weight is in both)."""
    embeddings: set[int] = set()
    heads: set[int] = set()
    for module_name, module in model.named_modules():
        leaf = module_name.rsplit(".", 1)[-1]
        for param_name, param in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            if isinstance(module, nn.Embedding) or "embed" in full.lower():
                embeddings.add(id(param))
            if leaf in HEAD_NAMES:
                heads.add(id(param))
    return embeddings, heads


def split_params(model: nn.Module, *, muon: bool = False) -> ParamSplit:
    """Sort the trainable parameters of `model` into decay / no-decay / Muon lists.

    No decay: tensors with fewer than 2 dimensions (norm gains, biases) and embeddings
    (an `nn.Embedding`, or a name containing "embed"). With `muon=True`, 2-D matrices
    that are neither embeddings nor the output head (`lm_head` / `head`) go to Muon.
    """
    embeddings, heads = _special_ids(model)
    split = ParamSplit()
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim < 2 or id(param) in embeddings:
            split.no_decay.append((name, param))
        elif muon and param.ndim == 2 and id(param) not in heads:
            split.muon.append((name, param))
        else:
            split.decay.append((name, param))
    return split


def _use_fused(params: list[nn.Parameter]) -> bool:
    return all(p.device.type in ("cuda", "cpu") and p.dtype in FUSED_DTYPES for p in params)


def _adamw(groups: list[dict[str, Any]], *, lr: float, betas: tuple[float, float], eps: float, fused: bool | None) -> torch.optim.AdamW:
    params = [p for group in groups for p in group["params"]]
    fused = _use_fused(params) if fused is None else fused
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused, foreach=None if fused else True)


def _group(name: str, named: list[tuple[str, nn.Parameter]], weight_decay: float) -> dict[str, Any]:
    return {"name": name, "params": [p for _, p in named], "weight_decay": weight_decay}


class CombinedOptimizer:
    """Several optimizers over disjoint parameters, driven as one.

    `param_groups` lists every group of every optimizer (setting `group["lr"]` reaches
    the right one), and the state dict holds one entry per optimizer, in order.
    """

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [optimizer.state_dict() for optimizer in self.optimizers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        states = state["optimizers"]
        if len(states) != len(self.optimizers):
            raise ValueError(f"state holds {len(states)} optimizers, this one has {len(self.optimizers)}")
        for optimizer, sub_state in zip(self.optimizers, states):
            optimizer.load_state_dict(sub_state)


def build_optimizer(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    kind: OptimizerKind = "adamw",
    fused: bool | None = None,
    muon_dtype: torch.dtype = torch.bfloat16,
) -> torch.optim.AdamW | CombinedOptimizer:
    """AdamW with decay / no-decay groups, or Muon for hidden matrices plus AdamW for the rest.

    `fused=None` uses the fused AdamW kernel when every parameter is a floating-point
    CPU or CUDA tensor (on the demo model and a 2-core CPU: 3.5 against 23 ms per step)
    and the multi-tensor (`foreach`) path otherwise. Muon orthogonalises in `muon_dtype`
    (`model.muon`). Every parameter group carries a `name` ("decay", "no_decay", "muon")
    for logging.
    """
    if kind not in ("adamw", "muon"):
        raise ValueError(f"unknown optimizer kind {kind!r}; expected 'adamw' or 'muon'")
    split = split_params(model, muon=kind == "muon")
    groups = [
        group
        for group in (_group("decay", split.decay, weight_decay), _group("no_decay", split.no_decay, 0.0))
        if group["params"]
    ]
    optimizers: list[torch.optim.Optimizer] = []
    if split.muon:
        muon_group = _group("muon", split.muon, weight_decay)
        optimizers.append(GroupedMuon([muon_group], lr=lr, adjust_lr_fn="match_rms_adamw", ns_dtype=muon_dtype))
    if groups:
        optimizers.append(_adamw(groups, lr=lr, betas=betas, eps=eps, fused=fused))
    if not optimizers:
        raise ValueError("the model has no trainable parameters")
    return optimizers[0] if kind == "adamw" else CombinedOptimizer(optimizers)
