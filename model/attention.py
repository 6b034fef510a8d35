"""Multi-head Latent Attention (MLA), DeepSeek-V2/V3.

Keys and values are compressed into one latent of `kv_lora_rank` numbers per token,
plus a single shared rope key of `qk_rope_head_dim`. Training expands the latent
with `kv_b_proj` and runs ordinary scaled-dot-product attention (the naive path).
Generation caches only the latent and the rope key, and absorbs `kv_b_proj` into
the query (for scores) and into the output (for values), so the cache per token is
`kv_lora_rank + qk_rope_head_dim` numbers per layer instead of `2 * heads * head_dim`.
A small model folds `kv_b_proj` into the query and output projections once per
generation, as DeepSeek-V2's paper describes the absorption (`MLA.folded`); a large one
multiplies by it at every step, as DeepSeek-V3's own inference code does, since there
the folded matrices would be several times larger than the ones they replace.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig
from model.linear import Linear, linear
from model.norm import RMSNorm
from model.rope import apply_rope

# Up to this many tokens a CPU trains faster in bf16 with `ExplicitCausalAttention` than with
# SDPA's kernels. Measured on 2 AVX-512 cores (forward + backward, 4 heads of 64, ms): 4.6-5.6
# against 9.5-10 (unfused SDPA) and 23-31 (flash) at 40 tokens, 14 against 27-31 and 37-41 at
# 128, 23-28 against 37 (flash) at 256, 52-64 against 60-65 at 512. In fp32 it is slower than
# flash (42-51 against 33-38 ms at 256 tokens), so fp32 always takes flash. CUDA always takes
# the fused kernels.
CPU_EXPLICIT_MAX_LEN = 512


# T x T scores that ExplicitCausalAttention computes at once (2 MiB in bf16). Chunks this size
# also run faster than the whole batch at once (demo shapes, 16 x 4 heads x 256 tokens: 21-22
# against 30 ms forward + backward for one chunk of 4M, 25 ms for chunks of 64k or 256k).
SCORES_PER_CHUNK = 1 << 20


def _future_mask(q: torch.Tensor) -> torch.Tensor:
    """[T, T] in q's dtype: 0 where a query may attend, -inf above the diagonal."""
    T = q.shape[-2]
    return torch.full((T, T), float("-inf"), dtype=q.dtype, device=q.device).triu_(1)


def _chunks(q: torch.Tensor, buffers: int) -> list[tuple[slice, list[torch.Tensor]]]:
    """Slices of q's [B*H] (batch, head) rows whose T x T scores fit SCORES_PER_CHUNK (at
    least one row each), each with its part of `buffers` T x T buffers that all chunks reuse.
    Reused, the scores, probabilities and their gradient are written where the last chunk's
    were: a fresh 2 MiB tensor per chunk costs its page faults (the gradient of the
    probabilities took 1.0-1.3 ms per demo chunk that way, 0.6 ms in place)."""
    rows, T = q.shape[0], q.shape[1]
    step = max(1, SCORES_PER_CHUNK // (T * T))
    whole = [q.new_empty(min(step, rows), T, T) for _ in range(buffers)]
    return [(slice(start, start + step), [b[: min(step, rows - start)] for b in whole]) for start in range(0, rows, step)]


def _causal_probs(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor, scale: float,
                  scores: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T * scale + mask) of [n, T, d] rows into `probs` [n, T, T]: the matmul
    itself (`baddbmm`) adds the mask and applies the scale, writing the scores into `scores`."""
    return torch.softmax(torch.baddbmm(mask, q, k.transpose(1, 2), alpha=scale, out=scores), -1, out=probs)


class ExplicitCausalAttention(torch.autograd.Function):
    """softmax(q k^T * scale, causal) v over [B, H, T, d] tensors, as plain batched matmuls.

    On a CPU in bf16 this beats SDPA's kernels for training-length sequences: the flash
    kernel's tiled backward and the unfused kernel's fp32 upcasts cost more than a few bf16
    matmuls and softmax passes over the T x T scores. Like flash, it saves only q, k and v
    and recomputes the probabilities in the backward, and it computes the scores for a
    few (batch, head) rows at a time (SCORES_PER_CHUNK) in buffers that every chunk reuses,
    so its memory does not grow with T x T times the batch. Its matmuls write their results
    in place, and those of the q and k gradients apply the scale themselves (one rounding;
    exact when the scale is a power of two, as 1/8 for heads of 64)."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        B, H, T, _ = q.shape
        q, k, v = (t.reshape(B * H, T, t.shape[-1]) for t in (q, k, v))  # v, a view of kv_b_proj's output, is copied
        ctx.save_for_backward(q, k, v)
        ctx.scale = scale
        out, mask = q.new_empty(B * H, T, v.shape[-1]), _future_mask(q)
        for rows, (scores, probs) in _chunks(q, 2):
            torch.bmm(_causal_probs(q[rows], k[rows], mask, scale, scores, probs), v[rows], out=out[rows])
        return out.view(B, H, T, -1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        q, k, v = ctx.saved_tensors
        shape = grad.shape[:-1]
        grad = grad.reshape(q.shape[0], q.shape[1], grad.shape[-1])
        grad_q, grad_k, grad_v = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        mask = _future_mask(q)
        for rows, (scores, probs, grad_probs) in _chunks(q, 3):
            _causal_probs(q[rows], k[rows], mask, ctx.scale, scores, probs)  # the forward's, bit for bit
            torch.bmm(probs.transpose(1, 2), grad[rows], out=grad_v[rows])
            torch.bmm(grad[rows], v[rows].transpose(1, 2), out=grad_probs)
            # the gradient of the scores, through softmax's own backward kernel, into the scores' buffer
            grad_scores = torch.ops.aten._softmax_backward_data.out(grad_probs, probs, -1, probs.dtype, grad_input=scores)
            torch.baddbmm(grad_q[rows], grad_scores, k[rows], beta=0, alpha=ctx.scale, out=grad_q[rows])
            torch.baddbmm(grad_k[rows], grad_scores.transpose(1, 2), q[rows], beta=0, alpha=ctx.scale, out=grad_k[rows])
        return grad_q.view(*shape, -1), grad_k.view(*shape, -1), grad_v.view(*shape, -1), None


FP8_MAX = torch.finfo(torch.float8_e4m3fn).max


class LatentCache:
    """Per-layer decode cache: each token's normalised kv latent and rotated rope key side
    by side in one buffer [B, max_len, kv_lora_rank + qk_rope_head_dim]. Side by side, the
    rows are the keys of one attention. It is written and read only as that one buffer:
    torch.compile (compiled decoding) cannot take two views of one buffer that both change.
    It also carries the layer's folded query and output weights for this generation
    (`MLA.folded`), or None where the layer does not fold.

    The buffer may be narrower than the model: bf16 halves an fp32 cache, fp8 (e4m3, without
    scales) quarters it, at the price of rounding every cached key and value. (DeepSeek's
    FP8 latent cache also uses e4m3, with a scale per 128 values and the rope part in bf16.)
    fp8 holds at most +-448: larger values are clamped to it before the cast, which on a CPU
    saturates but on CUDA would turn them into NaN.
    """

    def __init__(self, config: ModelConfig, batch: int, max_len: int, device, dtype,
                 folded: tuple[torch.Tensor, torch.Tensor] | None = None):
        width = config.kv_lora_rank + config.qk_rope_head_dim
        self.data = torch.zeros(batch, max_len, width, device=device, dtype=dtype)
        self.folded = folded
        # an fp8 cache on a CPU is widened by looking its 256 possible values up (`rows`)
        self.fp8_values = None
        if dtype == torch.float8_e4m3fn and self.data.is_cpu:
            self.fp8_values = torch.arange(256, dtype=torch.uint8, device=device).view(dtype).float()

    def write(self, start: int, kv: torch.Tensor, pe: torch.Tensor) -> None:
        """Store the latents kv [B, T, kv_lora_rank] and rotated rope keys pe [B, T, rope] of
        T new tokens at slots [start, start + T)."""
        B, T = kv.shape[:2]
        rows = torch.cat([kv, pe], dim=-1)
        if self.data.dtype == torch.float8_e4m3fn:
            rows = rows.clamp(-FP8_MAX, FP8_MAX)
        self.data[:B, start : start + T] = rows

    def rows(self, batch: int, end: int, dtype: torch.dtype) -> torch.Tensor:
        """Slots [0, end) of the first `batch` sequences in `dtype`. torch widens fp8 one
        number at a time on a CPU; the table lookup is ~2x faster (same values)."""
        rows = self.data[:batch, :end]
        if self.fp8_values is not None:
            return self.fp8_values.to(dtype).take(rows.view(torch.uint8).long())
        return rows if rows.dtype == dtype else rows.to(dtype)

    def bytes_per_token(self) -> int:
        return self.data.shape[-1] * self.data.element_size()


class MLA(nn.Module):
    # decoding folds kv_b_proj into the query and output projections (`folded`) where the folded
    # matrices hold at most this many times the numbers of those they replace
    FOLD_MAX_GROWTH = 2.0

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.nope_dim = config.qk_nope_head_dim
        self.rope_dim = config.qk_rope_head_dim
        self.qk_dim = config.qk_head_dim
        self.v_dim = config.v_head_dim
        self.kv_rank = config.kv_lora_rank
        self.scale = config.softmax_scale
        h = config.hidden_size
        if config.q_lora_rank == 0:
            self.q_proj = Linear(h, self.n_heads * self.qk_dim)
        else:
            self.q_a_proj = Linear(h, config.q_lora_rank)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, config.rms_norm_eps)
            self.q_b_proj = Linear(config.q_lora_rank, self.n_heads * self.qk_dim)
        self.kv_a_proj_with_mqa = Linear(h, self.kv_rank + self.rope_dim)
        self.kv_a_layernorm = RMSNorm(self.kv_rank, config.rms_norm_eps)
        self.kv_b_proj = Linear(self.kv_rank, self.n_heads * (self.nope_dim + self.v_dim))
        self.o_proj = Linear(self.n_heads * self.v_dim, h)

    def _query_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the per-head query projection multiplies: x, or its normalised low-rank
        compression (q_lora_rank > 0)."""
        return x if hasattr(self, "q_proj") else self.q_a_layernorm(self.q_a_proj(x))

    def _query_projection(self) -> Linear:
        return self.q_proj if hasattr(self, "q_proj") else self.q_b_proj

    def _queries(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head (nope, rope) query parts, each [B, T, H, d]."""
        q = self._query_projection()(self._query_input(x)).view(*x.shape[:2], self.n_heads, self.qk_dim)
        return q.split([self.nope_dim, self.rope_dim], dim=-1)

    def _latent(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The normalised kv latent [B, T, kv_rank] and the un-rotated rope key [B, T, rope]."""
        kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_rank, self.rope_dim], dim=-1)
        return self.kv_a_layernorm(kv), k_pe

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Training path: expand the latent to per-head keys/values, causal attention (`_attend`)."""
        B, T, _ = x.shape
        q_nope, q_pe = self._queries(x)
        kv, k_pe = self._latent(x)
        q_pe = apply_rope(q_pe.transpose(1, 2), cos, sin)  # [B, H, T, rope]
        k_pe = apply_rope(k_pe.unsqueeze(1), cos, sin)  # [B, 1, T, rope]
        kv = self.kv_b_proj(kv).view(B, T, self.n_heads, self.nope_dim + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        q = torch.cat([q_nope.transpose(1, 2), q_pe], dim=-1)
        k = torch.cat([k_nope, k_pe.expand(-1, self.n_heads, -1, -1)], dim=-1)
        out = self._attend(q, k, v)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.v_dim))

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention. On a CPU, sequences up to CPU_EXPLICIT_MAX_LEN in any dtype but
        fp32 (bf16 and fp16; fp64 too) take `ExplicitCausalAttention`; everything else SDPA,
        with a value head smaller than the query/key head zero-padded to it: the flash
        kernels (CPU and CUDA) take a single head size, and other sizes fall back to the
        unfused kernel. The padding's outputs are dropped."""
        if q.device.type == "cpu" and q.dtype != torch.float32 and q.shape[2] <= CPU_EXPLICIT_MAX_LEN:
            return ExplicitCausalAttention.apply(q, k, v, self.scale)
        if self.v_dim < self.qk_dim:
            v = F.pad(v, (0, self.qk_dim - self.v_dim))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        return out[..., : self.v_dim]

    @torch.no_grad()
    def folded(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The query and output projections with `kv_b_proj` folded in, for decoding, or None
        where they would hold more than `FOLD_MAX_GROWTH` times the numbers they replace.

        A head's score is q_nope . (W_k c) + q_pe . k_pe for the cached latent c, with
        q_nope = W_qn u (u: `_query_input`), that is ((W_k^T W_qn) u) . c: one matrix per head
        [kv_rank, q_in] gives the query in latent space directly, and its rope rows follow as
        they are. Likewise the output o_proj(W_v a_h per head) of the attended latents a_h is
        one matrix [hidden, heads * kv_rank]. Made once per generation (`Transformer.new_caches`),
        in fp32, they turn each step's per-head products, transposes and concatenation into
        two linear layers; the results equal the unfolded ones up to rounding.
        """
        H, nope, rope, rank, v = self.n_heads, self.nope_dim, self.rope_dim, self.kv_rank, self.v_dim
        q_weight, o_weight = self._query_projection().weight, self.o_proj.weight
        q_in, hidden = q_weight.shape[1], o_weight.shape[0]
        replaced = q_weight.numel() + self.kv_b_proj.weight.numel() + o_weight.numel()
        if H * (rank + rope) * q_in + hidden * H * rank > self.FOLD_MAX_GROWTH * replaced:
            return None
        w = self.kv_b_proj.weight.float().view(H, nope + v, rank)
        wq = q_weight.float().view(H, nope + rope, q_in)
        q = torch.cat([w[:, :nope].transpose(1, 2) @ wq[:, :nope], wq[:, nope:]], dim=1)  # [H, rank + rope, q_in]
        o = o_weight.float().view(hidden, H, v).transpose(0, 1) @ w[:, nope:]  # [H, hidden, rank]
        q, o = q.view(H * (rank + rope), q_in), o.transpose(0, 1).reshape(hidden, H * rank)
        return q.to(q_weight.dtype), o.to(o_weight.dtype)

    def forward_cached(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: LatentCache,
        start: int,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        """Decode path over the latent cache with `kv_b_proj` absorbed (folded or per step).

        x: [B, T, hidden] new tokens written at cache slots [start, start+T);
        cos/sin: [B, T, rope] for their positions; mask: [B, T, start+T] bool, True = may attend,
        or None: every token sees every slot (one new token and no padding).
        """
        B, T, _ = x.shape
        end = start + T
        kv, k_pe = self._latent(x)
        cache.write(start, kv, apply_rope(k_pe, cos, sin))
        q = self._latent_queries(x, cos.unsqueeze(2), sin.unsqueeze(2), cache.folded)
        # every head of every new token is one query of a single-head attention over the cached
        # rows; the values are the rows' latent part, taken as the whole rows (one head size lets
        # SDPA use its flash kernel) whose rope part of the output is dropped
        rows = cache.rows(B, end, q.dtype).unsqueeze(1)  # [B, 1, S, kv_rank + rope]
        if mask is not None:
            mask = mask.unsqueeze(2).expand(B, T, self.n_heads, end).reshape(B, 1, T * self.n_heads, end)
        out = F.scaled_dot_product_attention(q.view(B, 1, T * self.n_heads, -1), rows, rows, attn_mask=mask,
                                             scale=self.scale)[..., : self.kv_rank]
        if cache.folded is not None:
            return linear(out.reshape(B, T, self.n_heads * self.kv_rank), cache.folded[1])
        # back from latent space: the value half of kv_b_proj, per head [B, H, T, v]
        w_v = self.kv_b_proj.weight.view(self.n_heads, self.nope_dim + self.v_dim, self.kv_rank)[:, self.nope_dim :]
        out = torch.matmul(out.view(B, T, self.n_heads, self.kv_rank).transpose(1, 2), w_v.transpose(1, 2))
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.v_dim))

    def _latent_queries(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                        folded: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """Queries in latent space [B, T, H, kv_rank + rope], their rope part rotated by cos/sin
        [B, T, 1, rope]: through the folded query weight, or through the key half of kv_b_proj."""
        if folded is not None:
            q = linear(self._query_input(x), folded[0]).view(*x.shape[:2], self.n_heads, self.kv_rank + self.rope_dim)
            q_pe = q[..., self.kv_rank :]
            q_pe.copy_(apply_rope(q_pe, cos, sin))
            return q
        q_nope, q_pe = self._queries(x)
        w_k = self.kv_b_proj.weight.view(self.n_heads, self.nope_dim + self.v_dim, self.kv_rank)[:, : self.nope_dim]
        q_latent = torch.matmul(q_nope.transpose(1, 2), w_k).transpose(1, 2)
        return torch.cat([q_latent, apply_rope(q_pe, cos, sin)], dim=-1)
