"""The DeepSeek-V3-style decoder: embeddings, blocks (MLA + dense MLP or DeepSeekMoE),
final norm, output head, and multi-token prediction (MTP) modules.

Parameter names follow HF `DeepseekV3ForCausalLM` (without its `model.` prefix), so
`model/hf.py` exports by renaming. The forward pass returns the main next-token loss,
the MTP loss and the balance loss separately; the trainer decides how to weight them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from model.attention import MLA, LatentCache
from model.config import ModelConfig
from model.fused import active as fused_active, fused
from model.linear import Linear
from model.moe import MLP, Experts, MoE, Router
from model.norm import RMSNorm, autocast_dtype
from model.promote import add_promoted
from model.rope import rope_cache
from model.workspace import Workspace


@fused
def _log_softmax_at(logits: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log_softmax(logits)[row, index[row]] in fp32, and the row's logsumexp in two parts,
    its max and log(sum(exp(logits - max))): each [rows, 1]. Kept apart, they let the
    backward subtract the max first, exactly as softmax does, and then a small number; with
    their sum subtracted at once, large logits would lose the softmax's low bits."""
    logits = logits.float()
    row_max = logits.amax(dim=-1, keepdim=True)
    log_sum = (logits - row_max).exp().sum(dim=-1, keepdim=True).log()
    return (logits.gather(1, index) - row_max) - log_sum, row_max, log_sum


@fused
def _scaled_softmax_(logits: torch.Tensor, row_max: torch.Tensor, log_sum: torch.Tensor,
                     row_scale: torch.Tensor) -> None:
    """logits = softmax(logits) * row_scale in place, as exp((logits - max) - log_sum) in
    fp32, rounded once to the logits' dtype: as a fused kernel, one pass over the logits.
    (The logits are its one output: given the same memory as two arguments, an output and
    an input, the compiler failed to build the kernel with one thread.)"""
    logits.copy_(torch.exp((logits.float() - row_max) - log_sum).mul_(row_scale.unsqueeze(1)))


class HeadCrossEntropy(torch.autograd.Function):
    """The output head and its mean cross-entropy over the targets that are not -100:
    `F.cross_entropy(F.linear(x, weight).float(), targets, ignore_index=-100)`, under
    autocast as there (the matmul in the autocast dtype, the loss in fp32).

    The logits are this function's own, so it spends no memory on them that it need not:
    - The fp32 copy, the log-softmax and the gradient of the whole [N, vocab] matrix never
      exist at once. The forward keeps per row only the logsumexp (as max and log-sum) and
      the target's log-prob. The fp32 math runs on chunks of rows that stay in cache
      (`rows_per_chunk`); as fused kernels (`model.fused`) one chunk is the whole matrix.
    - The backward writes the logits' gradient over the logits themselves, in their dtype:
      the softmax from the saved logsumexp (as a fused kernel, one pass over the logits),
      then each target's entry, (exp(log-prob) - 1) x scale, from the saved log-prob (the
      value of the full expression, rounded once). Its matmuls give x's and the weight's
      gradients. So a graph is backpropagated through once only (autograd refuses a second
      time: the saved logits changed).
    - On a CPU the logits are written into the model's `Workspace`, memory that the last
      step's logits used: a fresh 32 MiB (the demo's) costs its page faults at every step.
    """

    @staticmethod
    def rows_per_chunk(logits: torch.Tensor) -> int:
        # fp32 elements per chunk: 1 MiB on a CPU, the L2 cache of one core here (demo logits, fwd + bwd,
        # 2 threads: 31-33 ms against 35-48 ms with 2 MiB chunks, 37-40 ms with 256 KiB); 256 MiB elsewhere
        if fused_active(logits):
            return max(1, logits.shape[0])
        budget = 2**18 if logits.device.type == "cpu" else 2**26
        return max(1, budget // logits.shape[-1])

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                workspace: Workspace | None) -> torch.Tensor:
        device = x.device.type
        dtype = x.dtype if x.dtype == torch.float64 else autocast_dtype(x) or x.dtype  # (autocast leaves fp64 alone)
        x, weight = x.to(dtype), weight.to(dtype)
        shape = (x.shape[0], weight.shape[0])
        logits = workspace.take(shape, dtype, x.device) if workspace is not None else x.new_empty(shape)
        with torch.autocast(device, enabled=False):  # (already cast; autocast takes no out=)
            torch.mm(x, weight.t(), out=logits)
        valid = targets != -100
        safe = targets.masked_fill(~valid, 0).unsqueeze(1)
        step = HeadCrossEntropy.rows_per_chunk(logits)
        parts = [_log_softmax_at(rows, index) for rows, index in zip(logits.split(step), safe.split(step))]
        picked, row_max, log_sum = (torch.cat(column) for column in zip(*parts))
        count = valid.sum()
        ctx.save_for_backward(x, weight, logits, safe, valid, count, picked, row_max, log_sum)
        return -(picked.squeeze(1) * valid).sum() / count

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        x, weight, logits, safe, valid, count, picked, row_max, log_sum = ctx.saved_tensors
        # over the logits, but for torch.compile: its backward graph does not write a tensor the forward saved
        out = logits.clone() if torch.compiler.is_compiling() else logits
        row_scale = valid * (grad / count)
        step = HeadCrossEntropy.rows_per_chunk(out)
        for i in range(0, out.shape[0], step):
            rows = slice(i, i + step)
            _scaled_softmax_(out[rows], row_max[rows], log_sum[rows], row_scale[rows])
        target = (torch.arange(len(out), device=out.device), safe.squeeze(1))
        out.index_put_(target, picked.squeeze(1).exp().sub_(1).mul_(row_scale).to(out.dtype))
        grad_x = out @ weight if ctx.needs_input_grad[0] else None
        grad_weight = out.t() @ x if ctx.needs_input_grad[1] else None
        return grad_x, grad_weight, None, None


def head_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                       workspace: Workspace | None = None) -> torch.Tensor:
    """Next-token loss of the output head `weight` [vocab, hidden] on x [..., hidden]
    against targets [...] (-100: no loss); see `HeadCrossEntropy`."""
    return HeadCrossEntropy.apply(x.flatten(0, -2), weight, targets.flatten(), workspace)


@dataclass
class ModelOutput:
    """Logits when called without targets; with targets, the losses (and no logits)."""

    logits: torch.Tensor | None = None  # [B, T, vocab] from the main head
    loss: torch.Tensor | None = None  # next-token cross-entropy
    mtp_loss: torch.Tensor | None = None  # mean over MTP depths (0 when there are none)
    aux_loss: torch.Tensor | None = None  # sequence-wise balance loss summed over MoE layers


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MLA(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MoE(config) if config.is_moe_layer(layer_id) else MLP(config.hidden_size, config.intermediate_size)

    def _feed_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, MoE):
            out, aux = self.mlp(h)
            return add_promoted(x, out), aux
        return add_promoted(x, self.mlp(h)), x.new_zeros(())

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = add_promoted(x, self.self_attn(self.input_layernorm(x), cos, sin))
        return self._feed_forward(x)

    def forward_cached(self, x, cos, sin, cache: LatentCache, start: int, mask: torch.Tensor | None) -> torch.Tensor:
        x = add_promoted(x, self.self_attn.forward_cached(self.input_layernorm(x), cos, sin, cache, start, mask))
        return self._feed_forward(x)[0]


class MTPModule(nn.Module):
    """One MTP depth: combine the previous depth's hidden state at position i with the
    embedding of token i+k, run one block, predict token i+k+1 with the shared head."""

    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__()
        self.enorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hnorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.eh_proj = Linear(2 * config.hidden_size, config.hidden_size)
        self.block = Block(config, layer_id)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = Linear(config.hidden_size, config.vocab_size)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # MTP blocks are MoE blocks like the last main layer
        self.mtp = nn.ModuleList(
            MTPModule(config, config.num_hidden_layers) for _ in range(config.num_nextn_predict_layers)
        )
        cos, sin = rope_cache(config, config.max_position_embeddings)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.workspace = Workspace()  # the output head's logits, step after step (`HeadCrossEntropy`)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding, Router)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, Experts):
            nn.init.normal_(module.gate_up_proj, mean=0.0, std=std)
            nn.init.normal_(module.down_proj, mean=0.0, std=std)

    def moe_layers(self, mtp: bool = True) -> list[MoE]:
        """The MoE layers of the main stack, then (with mtp=True) those of the MTP depths."""
        modules = [*self.layers, *self.mtp] if mtp else self.layers
        return [m for module in modules for m in module.modules() if isinstance(m, MoE)]

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None, mtp: bool = True) -> ModelOutput:
        """input_ids [B, T]; targets [B, T] = next tokens, -100 where no loss is wanted.

        mtp=False skips the MTP depths (mtp_loss is then 0): a trainer that gives them no
        weight, as fine-tuning may, does not pay for their forward and backward."""
        T = input_ids.shape[1]
        if T > self.config.max_position_embeddings:
            raise ValueError(f"sequence of {T} tokens exceeds max_position_embeddings={self.config.max_position_embeddings}")
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        h = self.embed_tokens(input_ids)
        aux = h.new_zeros((), dtype=torch.float32)
        for layer in self.layers:
            h, layer_aux = layer(h, cos, sin)
            aux = aux + layer_aux
        if targets is None:
            return ModelOutput(logits=self.lm_head(self.norm(h)))
        loss = self._head_loss(self.norm, h, targets)
        mtp_loss = h.new_zeros((), dtype=torch.float32)
        depths = self.mtp if mtp else []
        for depth, module in enumerate(depths, start=1):
            if depth >= T:
                break
            # position i now carries token i+depth's embedding and predicts token i+depth+1
            h = h[:, :-1]
            emb = self.embed_tokens(input_ids[:, depth:])
            h = module.eh_proj(torch.cat([module.hnorm(h), module.enorm(emb)], dim=-1))
            h, layer_aux = module.block(h, cos[: h.shape[1]], sin[: h.shape[1]])
            aux = aux + layer_aux
            mtp_loss = mtp_loss + self._head_loss(module.norm, h, targets[:, depth:])
        if len(depths):
            mtp_loss = mtp_loss / len(depths)
        return ModelOutput(loss=loss, mtp_loss=mtp_loss, aux_loss=aux)

    def _head_loss(self, norm: nn.Module, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the output head, run only on the positions that have a target.

        Fine-tuning batches supervise the answers alone (a few tokens of each chat), so the
        [tokens, vocab] head, the largest matmul of a small model, shrinks to those rows.
        Under torch.compile the data-dependent row count would break the graph: there the
        head runs on every position and the loss ignores the rest, which is the same value.
        """
        h, targets = h.flatten(0, 1), targets.flatten()
        if not torch.compiler.is_compiling():
            rows = (targets != -100).nonzero().squeeze(1)
            if len(rows) < len(targets):
                h, targets = h[rows], targets[rows]
        # (compiled code plans its own memory)
        workspace = None if torch.compiler.is_compiling() else self.workspace
        return head_cross_entropy(norm(h), self.lm_head.weight, targets, workspace)

    def new_caches(self, batch: int, max_len: int, dtype: torch.dtype | None = None) -> list[LatentCache]:
        device = self.embed_tokens.weight.device
        dtype = dtype or self.embed_tokens.weight.dtype
        return [LatentCache(self.config, batch, max_len, device, dtype, layer.self_attn.folded())
                for layer in self.layers]

    def forward_cached(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        caches: list[LatentCache],
        start: int,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Logits [B, T, vocab] for new tokens at cache slots [start, start+T).

        positions [B, T] are rope positions (they differ per row when prompts are
        left-padded); mask [B, T, start+T] says which cache slots each token may see (None: all of
        them, for one new token without padding).
        """
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        h = self.embed_tokens(input_ids)
        for layer, cache in zip(self.layers, caches):
            h = layer.forward_cached(h, cos, sin, cache, start, mask)
        return self.lm_head(self.norm(h))

    @torch.no_grad()
    def update_router_bias(self, mtp: bool = True) -> list[float]:
        """Aux-loss-free balancing step for every MoE layer (those of the MTP depths only with
        mtp=True, i.e. when they were run); returns MaxVio per layer."""
        return [moe.update_bias() for moe in self.moe_layers(mtp)]


def parameter_counts(model: Transformer) -> dict[str, int]:
    """Total parameters and those a token activates (shared + top-k of routed experts), of
    the main model: the MTP modules, which training alone runs, are not counted."""
    config = model.config
    total, inactive = 0, 0
    for name, p in model.named_parameters():
        if name.startswith("mtp."):
            continue
        total += p.numel()
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            inactive += p.numel() * (config.n_routed_experts - config.num_experts_per_tok) // config.n_routed_experts
    return {"total": total, "activated": total - inactive}


def flops_per_token(model: Transformer, seq_len: int) -> float:
    """Training FLOPs per token: 6 x activated matmul weights + attention (PaLM-style),
    excluding embeddings (a lookup) and MTP modules."""
    config = model.config
    activated = parameter_counts(model)["activated"] - config.vocab_size * config.hidden_size
    if config.tie_word_embeddings:
        activated += config.vocab_size * config.hidden_size
    heads = config.num_attention_heads
    attention = config.num_hidden_layers * heads * seq_len * (config.qk_head_dim + config.v_head_dim)
    return 6.0 * activated + 6.0 * attention


def step_flops(model: Transformer, seq_len: int, positions: int, scored: int) -> float:
    """Training FLOPs of `positions` input positions of which `scored` have a target:
    `flops_per_token` at every position, but the output head's share only where a loss is
    computed, as `Transformer._head_loss` runs it (fine-tuning scores the answers alone;
    pretraining every position)."""
    head = 6.0 * model.config.vocab_size * model.config.hidden_size
    return (flops_per_token(model, seq_len) - head) * positions + head * scored


def model_summary(model: Transformer) -> str:
    counts = parameter_counts(model)
    return (
        f"{counts['total'] / 1e6:.2f}M parameters ({counts['activated'] / 1e6:.2f}M activated per token), "
        f"{model.config.num_hidden_layers} layers, {model.config.num_moe_layers} MoE"
    )

