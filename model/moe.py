"""Feed-forward layers: the dense SwiGLU MLP and DeepSeekMoE.

DeepSeekMoE = shared experts that see every token plus many fine-grained routed
experts, of which each token uses `num_experts_per_tok`. The router scores experts
with a sigmoid; a per-expert bias, used only to *select* experts and never to
weight them, is nudged after every optimizer step towards equal load
(auxiliary-loss-free balancing). A small sequence-wise balance loss is optional.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig
from model.fused import fused
from model.linear import Linear, linear
from model.promote import add_promoted


@fused
def _swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


@fused
def _swiglu_backward(gate: torch.Tensor, up: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The gradients of gate and up side by side, [rows, 2 x intermediate]."""
    return torch.cat([torch.ops.aten.silu_backward(grad * up, gate), grad * F.silu(gate)], dim=-1)


class SwiGLUFunction(torch.autograd.Function):
    """silu(gate) * up, keeping only gate and up for backward, where silu(gate) is computed
    again: plain autograd also keeps silu(gate), one [rows, intermediate] tensor more per
    MLP and expert batch. The gradients are autograd's, computed the same way; in training
    both directions are fused kernels (`model.fused`).

    Given gate and up side by side in one tensor (`gate_up`, as the experts' one matmul
    gives them), its backward writes their gradient as one tensor too. Split first, autograd
    would concatenate the two halves' gradients: 1.5 ms per demo MoE layer."""

    @staticmethod
    def forward(ctx, *parts: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(*parts)
        gate, up = _gate_and_up(parts)
        return _swiglu(gate, up).view(*parts[0].shape[:-1], gate.shape[-1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
        parts = ctx.saved_tensors
        grad_gate_up = _swiglu_backward(*_gate_and_up(parts), grad.reshape(-1, grad.shape[-1]))
        if len(parts) == 1:
            return (grad_gate_up.view(parts[0].shape),)
        return tuple(g.view(p.shape) for g, p in zip(grad_gate_up.chunk(2, dim=-1), parts))


def _halves(parts: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate, up) from (gate, up) or from (gate_up,), both side by side on the last dimension."""
    return parts if len(parts) == 2 else parts[0].chunk(2, dim=-1)


def _gate_and_up(parts: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """`_halves` as 2-D [rows, intermediate]: one rank for every caller, fewer compiled variants."""
    gate, up = _halves(parts)
    return gate.reshape(-1, gate.shape[-1]), up.reshape(-1, up.shape[-1])


def _placed(rows: torch.Tensor, index: torch.Tensor, total: int) -> torch.Tensor:
    """`rows` at `index` among `total` zero rows (each index at most once)."""
    return rows.new_zeros(total, *rows.shape[1:]).index_copy_(0, index, rows)


def _summed_rows(rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """sum_j rows[index[:, j]] for index [N, k], rounded once to rows' dtype as a sum in
    fp32 (or wider) is: k gathers added up, beyond two in fp32 or rows' wider dtype. (As one
    compiled kernel, the gather took 20 ms for the demo's rows, against 0.4 ms for two
    gathers and an add.)"""
    first, *others = index.t()
    out = rows.index_select(0, first)
    if len(others) <= 1:  # one add at most: one rounding
        return out.add_(rows.index_select(0, others[0])) if others else out
    wide = torch.promote_types(rows.dtype, torch.float32)
    out = out.to(wide)
    for places in others:
        out += rows.index_select(0, places).to(wide)
    return out.to(rows.dtype)


class ScatterRows(torch.autograd.Function):
    """Each row of x [N, hidden] copied to its k places `index[n]` [N, k] among `total` zero
    rows (each place named once): the rows of the experts' sorted layout. Its backward sums
    each token's k gradient rows (`_summed_rows`), keeping only the index. (Copied from
    `x.expand(N, k, hidden)`, the rows would be written out once more and their gradient
    summed by autograd's backward of the expand: 1.8 ms per demo MoE layer.)"""

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor, total: int) -> torch.Tensor:
        ctx.save_for_backward(index)
        out = x.new_zeros(total, x.shape[1])
        for places in index.t():
            out.index_copy_(0, places, x)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (index,) = ctx.saved_tensors
        return _summed_rows(grad, index), None, None


class GatherRows(torch.autograd.Function):
    """rows[index] for an index that names each row at most once: backward writes each
    gradient row into its place (`index_copy`) instead of adding it there (`index_add`,
    autograd's backward of `index_select`, which adds atomically on a GPU). The same values:
    no row has two gradients to add."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.rows = rows.shape[0]
        return rows.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (index,) = ctx.saved_tensors
        return _placed(grad, index, ctx.rows), None


def _weighted_sum(rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return (rows.float() * weights.float().unsqueeze(-1)).sum(1)


_fused_weighted_sum = fused(_weighted_sum)


@fused
def _weighted_sum_backward(rows: torch.Tensor, weights: torch.Tensor,
                           grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    grad = grad.unsqueeze(1)
    grad_rows = (grad * weights.float().unsqueeze(-1)).to(rows.dtype)
    grad_weights = (grad * rows.float()).sum(-1).to(weights.dtype)
    return grad_rows, grad_weights


class WeightedSum(torch.autograd.Function):
    """sum_j weights[:, j] * rows[:, j] in fp32 for rows [N, k, hidden] (the experts' outputs
    of each token) and weights [N, k] (the router's): autograd's mixed-precision multiply,
    sum and cast back are then one fused kernel each way (`model.fused`)."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(rows, weights)
        return _fused_weighted_sum(rows, weights)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _weighted_sum_backward(*ctx.saved_tensors, grad)


def swiglu(*parts: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of (gate, up), or of (gate_up,): both side by side on the last
    dimension; without autograd (decoding) as plain ops, skipping the function's overhead."""
    if torch.is_grad_enabled() and any(p.requires_grad for p in parts):
        return SwiGLUFunction.apply(*parts)
    gate, up = _halves(parts)
    return F.silu(gate) * up


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = Linear(hidden, intermediate)
        self.up_proj = Linear(hidden, intermediate)
        self.down_proj = Linear(intermediate, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            # training: gate and up as one matmul, whose output SwiGLU takes side by side: x gets one
            # gradient from one matmul, where two would be added up
            gate_up = linear(x, torch.cat([self.gate_proj.weight, self.up_proj.weight]))
            return self.down_proj(swiglu(gate_up))
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class Router(nn.Module):
    """Sigmoid top-k router with group-limited selection and a selection-only bias."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.n_group, self.topk_group = config.n_group, config.topk_group
        self.norm_topk_prob = config.norm_topk_prob
        self.scaling = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(config.n_routed_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, hidden] -> (weights [N, k], expert ids [N, k], scores [N, E]); routing in fp32,
        also under autocast (which would otherwise run the scoring matmul in bf16)."""
        with torch.autocast(x.device.type, enabled=False):
            scores = F.linear(x.float(), self.weight.float()).sigmoid()
        choice = scores.detach() + self.e_score_correction_bias
        if self.n_group > 1:
            groups = choice.view(x.shape[0], self.n_group, -1)
            group_scores = groups.topk(2, dim=-1).values.sum(-1)
            keep = group_scores.topk(self.topk_group, dim=-1).indices
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
            choice = groups.masked_fill(~group_mask.unsqueeze(-1), float("-inf")).flatten(1)
        ids = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, ids)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * self.scaling, ids, scores


class Experts(nn.Module):
    """All routed experts' weights as 3-D tensors (HF layout), computed with two grouped
    matmuls (`F.grouped_mm`) over the tokens sorted by expert: no loop over tokens or
    experts, and the same values as one matmul per expert.

    The sorted rows are padded per expert (padding rows are zero and never read back):
    - On CPUs (and on CUDA outside bf16), an expert batch of more than `ROWS` rows is padded
      to a multiple of `ROWS`, so that matmul shapes repeat. Otherwise a training step brings
      new shapes whenever routing shifts, and oneDNN, which runs CPU bf16 matmuls, keeps
      kernels and buffers per shape: resident memory then grows for hundreds of steps. Small
      batches (decoding) stay exact; large ones gain under `ROWS` rows per expert.
    - On CUDA in bf16, every expert batch is padded to a multiple of `ALIGN` rows (16 bytes,
      the alignment grouped GEMM kernels want), into a buffer of a size fixed by the token
      count alone, the last expert taking the rows left over. Nothing then waits for the
      routing to reach the host, and torch.compile sees one graph with static shapes (it
      traces `grouped_mm` in bf16 only).
    """

    ROWS = 128
    ALIGN = 8
    # rows (one per sequence when decoding) up to which a compiled model outside autograd takes
    # `_gathered`, which reads every row's own experts; compiled decoding takes batches up to this
    # size (`model.generate.decode_steps`), larger ones decode eagerly
    DECODE_ROWS = 64

    def __init__(self, config: ModelConfig):
        super().__init__()
        e, h, i = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h))
        self.down_proj = nn.Parameter(torch.empty(e, h, i))

    def _layout(self, ids: torch.Tensor, fixed: bool) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Rows sorted by expert and padded as described above (`fixed`: the fixed-size layout):
        the row of each (token, choice) pair in `ids`' flat order, each expert's end row, and
        the row count."""
        flat_ids = ids.flatten()
        n, experts = flat_ids.numel(), self.gate_up_proj.shape[0]
        order = flat_ids.argsort(stable=True)
        # per-expert row counts: not bincount, whose size would depend on the ids under torch.compile,
        # and in int32, which inductor compiles into atomic adds; an int64 index_add_ it leaves to a
        # sorting kernel of aten's (4.6% of a gpu-small step on an H200)
        ones = torch.ones_like(flat_ids, dtype=torch.int32)
        counts = torch.zeros(experts, dtype=torch.int32, device=ids.device).index_add_(0, flat_ids, ones)
        if fixed:
            sizes = (counts + self.ALIGN - 1) // self.ALIGN * self.ALIGN
        else:
            sizes = torch.where(counts > self.ROWS, (counts + self.ROWS - 1) // self.ROWS * self.ROWS, counts)
        ends = sizes.cumsum(0)
        total = n + experts * (self.ALIGN - 1) if fixed else int(ends[-1])
        # a pair moves from its place in the sorted order by its expert's padding so far
        rank = torch.empty_like(order).scatter_(0, order, torch.arange(n, device=ids.device))
        shift = (ends - sizes) - (counts.cumsum(0) - counts)
        ends[-1] = total  # the rows left over belong to the last expert: grouped_mm leaves none unwritten
        return rank + shift[flat_ids], ends.int(), total

    def _grouped(self, x: torch.Tensor, weights: torch.Tensor, row: torch.Tensor, ends: torch.Tensor,
                 total: int) -> torch.Tensor:
        """The experts over a layout of `_layout`, weighted and summed per token in fp32.

        Each token's row is copied to its k pairs' rows (`ScatterRows`), and each pair's
        output read back out (`GatherRows`) by its index, one to one. Backward then gathers
        and sums each token's k gradient rows and writes each output row's gradient in its
        place: nothing is added into shared rows, so nothing contends and nothing depends on
        the order of atomic adds. (Gathering rows by token and adding their gradients back
        per token took 8% of a gpu-small step on an H200, in bf16 atomics.) Padding rows are
        zero and never read back."""
        N, k = weights.shape
        routed = ScatterRows.apply(x, row.view(N, k), total)
        # all experts' weights cast once to x's dtype (autocast's: the norm before emits it)
        gate_up = F.grouped_mm(routed, self.gate_up_proj.to(x.dtype).transpose(1, 2), offs=ends)
        out = F.grouped_mm(swiglu(gate_up), self.down_proj.to(x.dtype).transpose(1, 2), offs=ends)
        # fp32 (the weights are): the k outputs add up in fp32; backward keeps out's rows in x's dtype
        rows = GatherRows.apply(out, row).view(N, k, -1)
        if torch.is_grad_enabled() and (rows.requires_grad or weights.requires_grad):
            return WeightedSum.apply(rows, weights)
        return _weighted_sum(rows, weights)  # decoding: op by op, no kernel to compile

    def _one_token(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Decoding one token: its k experts one after the other, without the sorted layout
        (half the time of the general path at this size), summed in the same order (the
        routing's) and precision (fp32). Its products go through `model.linear.linear`: where that
        takes row products (some CPUs, fp32 outside autograd and autocast), they equal the
        batch's up to rounding."""
        out = None
        for expert, weight in zip(ids[0].tolist(), weights[0].float().unbind()):
            gate_up, down = self.gate_up_proj[expert], self.down_proj[expert]
            if gate_up.dtype != x.dtype:  # (not cast when it changes nothing: a cast is a call all the same)
                gate_up, down = gate_up.to(x.dtype), down.to(x.dtype)
            gate, up = linear(x, gate_up).chunk(2, dim=-1)
            y = linear(swiglu(gate, up), down).float() * weight
            out = y if out is None else out + y
        return out

    # this layout's size depends on the routing: torch.compile would recompile for every new
    # routing, so it runs eagerly
    @torch.compiler.disable
    def _routing_sized(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return self._grouped(x, weights, *self._layout(ids, fixed=False))

    def _gathered(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Decoding in a compiled model: each token's k experts' weights indexed inside the
        products, which inductor fuses into passes over them, with sizes that do not depend
        on the routing (the layouts above do, and `_one_token` reads the ids on the host).
        Summed over the experts in fp32."""
        gate, up = (self.gate_up_proj[ids].to(x.dtype) * x[:, None, None, :]).sum(-1).chunk(2, dim=-1)  # [N, k, i]
        out = (self.down_proj[ids].to(x.dtype) * swiglu(gate, up).unsqueeze(-2)).sum(-1)  # [N, k, hidden]
        return (out.float() * weights.float().unsqueeze(-1)).sum(1)

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling() and not torch.is_grad_enabled() and x.shape[0] <= self.DECODE_ROWS:
            return self._gathered(x, ids, weights)
        if x.shape[0] == 1:
            return self._one_token(x, ids, weights)
        if self.fixed_layout(x):
            return self._grouped(x, weights, *self._layout(ids, fixed=True))
        return self._routing_sized(x, ids, weights)

    @staticmethod
    def fixed_layout(x: torch.Tensor) -> bool:
        """Whether x's rows take the fixed-size layout: on CUDA in bf16 (see the class docstring)."""
        return x.device.type == "cuda" and x.dtype == torch.bfloat16


class MoE(nn.Module):
    """Shared experts + routed experts; tracks expert load for bias balancing."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.gate = Router(config)
        self.experts = Experts(config)
        self.shared_experts = (
            MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
            if config.n_shared_experts
            else None
        )
        # tokens routed to each expert since the last bias update (all micro-batches)
        self.register_buffer("expert_load", torch.zeros(config.n_routed_experts), persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, hidden] -> (output, sequence-wise balance loss (0 when off or not training))."""
        B, T, H = x.shape
        flat = x.reshape(-1, H)
        weights, ids, scores = self.gate(flat)
        if self.training:
            with torch.no_grad():  # index_add_, not bincount: a fixed output shape keeps torch.compile's graph whole
                self.expert_load.index_add_(0, ids.flatten(), self.expert_load.new_ones(ids.numel()))
        out = self.experts(flat, ids, weights).view(B, T, H)
        if self.shared_experts is not None:
            out = add_promoted(out, self.shared_experts(x))
        return out, self._balance_loss(scores, ids, B, T)

    def _balance_loss(self, scores: torch.Tensor, ids: torch.Tensor, B: int, T: int) -> torch.Tensor:
        """DeepSeek-V3 sequence-wise loss: alpha * sum_i f_i * P_i per sequence, averaged."""
        alpha = self.config.seq_aux_loss_alpha
        if not (self.training and alpha > 0):
            return scores.new_zeros(())
        E, k = scores.shape[-1], ids.shape[-1]
        counts = torch.zeros(B, E, device=scores.device).scatter_add_(
            1, ids.view(B, T * k), torch.ones(B, T * k, device=scores.device)
        )
        f = counts * E / (k * T)
        p = (scores / scores.sum(-1, keepdim=True)).view(B, T, E).mean(1)
        return alpha * (f * p).sum(-1).mean()

    @torch.no_grad()
    def update_bias(self) -> float:
        """Nudge the selection bias towards equal load; return MaxVio of the load seen.

        MaxVio = (max load - mean load) / mean load. Call once per optimizer step (after
        summing `expert_load` across data-parallel ranks); resets the load counter.
        """
        load = self.expert_load
        mean = load.mean()
        if mean <= 0:
            return 0.0
        max_vio = ((load.max() - mean) / mean).item()
        self.gate.e_score_correction_bias += self.config.bias_update_speed * torch.sign(mean - load)
        load.zero_()
        return max_vio
