"""The faster formulations compute what the plain ones do: the output head with chunked
cross-entropy (and its reused memory), the head on target rows only, explicit bf16
attention on CPUs, padded expert batches (and their fixed-size layout, which compiles into
one graph), one token's experts taken directly, fp32 routing under autocast, an fp32
expert sum that keeps no copy of its rows, SwiGLU's and RMSNorm's own backward, one-row
products as an elementwise product and row sum. Where a function is one of `model.fused`,
it is tested both op by op and as a fused kernel."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from model import attention, fused, linear, workspace as workspace_module
from model.moe import MLP, Experts, Router, ScatterRows, WeightedSum, swiglu
from model.norm import RMSNorm, RMSNormFunction
from model.transformer import HeadCrossEntropy, Transformer, head_cross_entropy
from model.workspace import Workspace
from tests.model.helpers import config, losses_and_grads


@pytest.fixture(params=["eager", "fused"])
def kernels(request, monkeypatch) -> str:
    """The test twice: op by op (torch's kernels, the exact reference) and as fused kernels,
    whose sums may be rounded in another order."""
    monkeypatch.setenv("TINYSEEK_FUSED_KERNELS", "1" if request.param == "fused" else "0")
    assert fused.enabled() == (request.param == "fused"), "fused kernels need a C++ compiler (g++)"
    return request.param


def assert_same(got: torch.Tensor, want: torch.Tensor, kernels: str, rounded_to: torch.dtype | None = None) -> None:
    """Bit-equal op by op; fused, within a rounding of the dtype the values went through."""
    if kernels == "eager":
        assert torch.equal(got, want)
    else:
        tolerance = 1e-6 if (rounded_to or got.dtype) == torch.float32 else 8e-3
        torch.testing.assert_close(got, want, atol=tolerance, rtol=tolerance)


@pytest.fixture
def small_chunks(monkeypatch):
    """Three rows per chunk, so that several chunks and a partial last one are exercised."""
    monkeypatch.setattr(HeadCrossEntropy, "rows_per_chunk", staticmethod(lambda logits: 3))


def head_and_reference(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, workspace=None,
                       grad_scale: float = 1.0):
    """Loss and gradients of x and weight from `head_cross_entropy` and from torch's linear
    and cross-entropy (in fp32, or fp64 for fp64 inputs), each loss backpropagated x grad_scale."""
    results = []
    for ours in (True, False):
        inputs = [t.detach().clone().requires_grad_() for t in (x, weight)]
        if ours:
            loss = head_cross_entropy(*inputs, targets, workspace)
        else:
            logits = F.linear(*inputs)
            loss = F.cross_entropy(logits.flatten(0, -2).to(torch.promote_types(logits.dtype, torch.float32)),
                                   targets.flatten(), ignore_index=-100)
        (loss * grad_scale).backward()
        results.append((loss, *(t.grad for t in inputs)))
    return results


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_cross_entropy_matches_torch(small_chunks, kernels, dtype):
    torch.manual_seed(0)
    x, weight = (torch.randn(2, 7, 6) * 1.5).to(dtype), torch.randn(11, 6).to(dtype)
    targets = torch.randint(0, 11, (2, 7))
    targets[0, 2] = targets[1, 6] = -100
    (loss, grad_x, grad_w), (expected, want_x, want_w) = head_and_reference(x, weight, targets, grad_scale=2)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-6)
    assert grad_x.dtype == grad_w.dtype == dtype
    # torch's bf16 gradient of the logits is rounded from fp32 once, as ours: their products agree
    torch.testing.assert_close(grad_x, want_x, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grad_w, want_w, atol=1e-6, rtol=1e-6)


def test_head_cross_entropy_under_autocast_matches_torchs_linear_and_loss(kernels):
    """fp32 inputs under bf16 autocast: the matmuls in bf16, as autocast runs F.linear, the
    loss in fp32, and the gradients come back in fp32."""
    torch.manual_seed(0)
    x, weight, targets = torch.randn(40, 16), torch.randn(50, 16) * 0.3, torch.randint(0, 50, (40,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (loss, grad_x, grad_w), (expected, want_x, want_w) = head_and_reference(x, weight, targets, Workspace())
    assert grad_x.dtype == grad_w.dtype == torch.float32
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_x, want_x, atol=1e-4, rtol=1e-2)
    torch.testing.assert_close(grad_w, want_w, atol=1e-4, rtol=1e-2)


def test_head_cross_entropy_of_large_fp32_logits_is_as_precise_as_torchs(small_chunks, kernels):
    """The backward's softmax subtracts the row's max and then its log-sum, as softmax does:
    subtracted at once, their sum would cost large logits the gradient's low bits (a
    relative error of 4e-6 at this scale, 2e-7 in torch's fp32). The head is the identity,
    so the gradient of x is that of the logits."""
    torch.manual_seed(0)
    logits, targets = torch.randn(64, 4096) * 30, torch.randint(0, 4096, (64,))
    identity = torch.eye(4096)
    loss = head_cross_entropy(logits.requires_grad_(), identity, targets)
    loss.backward()
    reference = logits.detach().double().requires_grad_()
    F.cross_entropy(reference, targets).backward()
    torch.testing.assert_close(logits.grad.double(), reference.grad, atol=reference.grad.abs().max().item() * 1e-6,
                               rtol=0)


def test_head_cross_entropy_of_no_targets_is_nan_like_torch(small_chunks):
    x, weight = torch.randn(1, 4, 3), torch.randn(5, 3)
    targets = torch.full((1, 4), -100)
    assert torch.isnan(head_cross_entropy(x, weight, targets))
    assert torch.isnan(F.cross_entropy(F.linear(x, weight).flatten(0, 1), targets.flatten(), ignore_index=-100))


def test_head_cross_entropy_reuses_its_workspace_only_once_the_logits_are_free(kernels):
    """The logits go into the workspace's buffer, which the next forward takes again once
    the last backward is done; a forward while another graph holds its logits gets a buffer
    of its own. The gradients stay right throughout, the same inputs give the same bits in
    a reused buffer as in a fresh one, and fused kernels stay on (they once failed to compile
    for two views of one buffer, and training went on op by op)."""
    torch.manual_seed(0)
    workspace = Workspace()
    x, weight, targets = torch.randn(12, 8), torch.randn(30, 8), torch.randint(0, 30, (12,))
    first = head_and_reference(x, weight, targets, workspace)
    assert len(workspace.buffers) == 1
    buffer = workspace.buffers[0].data_ptr()
    held = head_cross_entropy(x, weight.requires_grad_(), targets, workspace)  # a graph not yet backpropagated
    assert len(workspace.buffers) == 1 and workspace.buffers[0].data_ptr() == buffer
    second = head_and_reference(x * 2, weight, targets, workspace)  # while `held` holds the first buffer
    assert len(workspace.buffers) == 2
    held.backward()
    third = head_and_reference(x[:7], weight, targets[:7], workspace)  # fewer rows: a part of a buffer
    again = head_and_reference(x, weight, targets, workspace)
    assert workspace.buffers[0].data_ptr() == buffer and len(workspace.buffers) == 2
    for (loss, *grads), (expected, *wanted) in (first, second, third):
        torch.testing.assert_close(loss, expected)
        for got, want in zip(grads, wanted):
            torch.testing.assert_close(got, want)
    assert all(torch.equal(a, b) for a, b in zip(first[0], again[0]))
    assert fused.enabled() == (kernels == "fused")


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_training_steps_in_a_reused_workspace_give_the_same_bits_with_fused_kernels_on(kernels, one_thread):
    """The model's losses and gradients, computed again once its workspace holds buffers of
    both heads (main and MTP) and after a larger batch grew one, are bit-identical to the
    first ones, and fused kernels stay on. (Passed two views of one buffer, a fused kernel
    once failed to compile with one thread: training went on op by op, and a resumed run no
    longer matched one run straight through.)"""
    torch.manual_seed(0)
    model = Transformer(config("q-lora", num_nextn_predict_layers=1))
    inputs, targets = torch.randint(0, 97, (2, 2, 20)).unbind(0)
    first = losses_and_grads(model, inputs, targets)
    with torch.no_grad():
        model(*torch.randint(0, 97, (2, 4, 20)).unbind(0))
    again = losses_and_grads(model, inputs, targets)
    assert len(model.workspace.buffers) == 2
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert all(torch.equal(grad, again[2][name]) for name, grad in first[2].items())
    assert fused.enabled() == (kernels == "fused")


def test_workspace_grows_to_the_largest_request_and_keeps_a_bounded_count():
    cpu = torch.device("cpu")
    workspace = Workspace()
    small = workspace.take((3, 4), torch.float32, cpu)
    del small
    assert workspace.take((5, 4), torch.float32, cpu).shape == (5, 4)
    assert [b.numel() for b in workspace.buffers] == [20]  # the 12-number buffer was replaced
    first, second = workspace.take((5, 4), torch.float32, cpu), workspace.take((4, 4), torch.float32, cpu)
    del first, second
    held = [workspace.take((5, 4), torch.float32, cpu), workspace.take((6, 4), torch.float32, cpu)]
    assert [b.numel() for b in workspace.buffers] == [20, 24]  # the second buffer replaced, not the first
    del held
    held = [workspace.take((2, 2), torch.float32, cpu) for _ in range(workspace_module.MAX_BUFFERS + 2)]
    assert len(workspace.buffers) == workspace_module.MAX_BUFFERS
    assert len({t.data_ptr() for t in held}) == len(held)  # none lent twice
    del held
    half = workspace.take((2, 2), torch.bfloat16, cpu)  # at the limit, a free fp32 buffer makes way
    assert len(workspace.buffers) == workspace_module.MAX_BUFFERS and workspace.buffers[-1].dtype == half.dtype
    assert copy.deepcopy(workspace).buffers == []


def test_a_loss_under_inference_mode_leaves_the_workspace_fit_for_training():
    torch.manual_seed(0)
    model = Transformer(config("q-lora", num_nextn_predict_layers=1))
    inputs, targets = torch.randint(0, 97, (2, 2, 20)).unbind(0)
    with torch.inference_mode():
        model(inputs, targets)
    losses_and_grads(model, inputs, targets)
    assert not any(b.is_inference() for b in model.workspace.buffers)


def test_head_cross_entropy_refuses_a_second_backward():
    """Its backward overwrites the saved logits with their gradient, which autograd notices."""
    x, weight = torch.randn(4, 3, requires_grad=True), torch.randn(5, 3)
    loss = head_cross_entropy(x, weight, torch.tensor([0, 1, 2, 3]))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_head_on_target_rows_only_gives_the_full_heads_losses_and_gradients(monkeypatch):
    torch.manual_seed(0)
    model = Transformer(config("q-lora", num_nextn_predict_layers=1))
    inputs = torch.randint(0, 97, (3, 20))
    targets = torch.full_like(inputs, -100)
    targets[:, 12:17] = torch.randint(0, 97, (3, 5))  # answers only, as in fine-tuning
    rows = losses_and_grads(model, inputs, targets)
    logits = model(inputs).logits.flatten(0, 1)
    torch.testing.assert_close(rows[0], F.cross_entropy(logits, targets.flatten(), ignore_index=-100))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # the compiled path: every row
    full = losses_and_grads(model, inputs, targets)
    torch.testing.assert_close(rows[:2], full[:2], atol=1e-6, rtol=1e-6)
    for name, grad in full[2].items():
        torch.testing.assert_close(rows[2][name], grad, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("chunk", [1, 40 * 40 * 3 * 2, 1 << 20], ids=["row-by-row", "two-rows", "whole"])
@pytest.mark.parametrize("v_dim", [16, 8])
def test_explicit_attention_matches_sdpa_in_fp32(monkeypatch, v_dim, chunk):
    monkeypatch.setattr(attention, "SCORES_PER_CHUNK", chunk)
    torch.manual_seed(0)
    q, k = torch.randn(2, 5, 3, 40, 16, dtype=torch.float64).unbind(0)
    v, grad = torch.randn(2, 5, 3, 40, v_dim, dtype=torch.float64).unbind(0)
    results = []
    for attend in (attention.ExplicitCausalAttention.apply, None):
        inputs = [t.clone().requires_grad_() for t in (q, k, v)]
        if attend:
            out = attend(*inputs, 0.3)
        else:
            out = F.scaled_dot_product_attention(*inputs, is_causal=True, scale=0.3)
        out.backward(grad)
        results.append([out] + [t.grad for t in inputs])
    for ours, reference in zip(*results):
        torch.testing.assert_close(ours, reference, atol=1e-10, rtol=1e-10)


def test_bf16_training_on_cpu_takes_explicit_attention_and_matches_flash(monkeypatch):
    torch.manual_seed(0)
    model = Transformer(config("plain-q", max_position_embeddings=attention.CPU_EXPLICIT_MAX_LEN))
    inputs, targets = torch.randint(0, 97, (2, 48)), torch.randint(0, 97, (2, 48))
    calls = []
    explicit_apply = attention.ExplicitCausalAttention.apply
    monkeypatch.setattr(attention.ExplicitCausalAttention, "apply", lambda *a: calls.append(1) or explicit_apply(*a))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        explicit = losses_and_grads(model, inputs, targets)
        layers = len(calls)
        monkeypatch.setattr(attention, "CPU_EXPLICIT_MAX_LEN", 0)
        flash = losses_and_grads(model, inputs, targets)
    assert layers == model.config.num_hidden_layers + model.config.num_nextn_predict_layers == len(calls)
    monkeypatch.setattr(attention, "CPU_EXPLICIT_MAX_LEN", 512)
    losses_and_grads(model, inputs, targets)  # fp32 takes flash
    assert len(calls) == layers
    torch.testing.assert_close(explicit[:2], flash[:2], atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("v_dim", [16, 8])
def test_explicit_attention_in_bf16_is_as_close_to_fp32_as_flash(v_dim):
    """Its scores and probabilities are bf16 (flash keeps the scores in fp32): its output and
    gradients must stay, like flash's, within 3 bf16 steps of the largest reference value."""
    torch.manual_seed(0)
    q, k = torch.randn(2, 2, 3, 40, 16).unbind(0)
    v, grad = torch.randn(2, 2, 3, 40, v_dim).unbind(0)
    scale = 16**-0.5

    def run(attend, dtype):
        inputs = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        out = attend(*inputs)
        out.backward(grad.to(dtype))
        return [out.float()] + [t.grad.float() for t in inputs]

    def sdpa(q, k, v):  # v zero-padded to the query's head size: the flash kernel takes one size
        out = F.scaled_dot_product_attention(q, k, F.pad(v, (0, 16 - v_dim)), is_causal=True, scale=scale)
        return out[..., :v_dim]

    reference, flash = run(sdpa, torch.float32), run(sdpa, torch.bfloat16)
    explicit = run(lambda q, k, v: attention.ExplicitCausalAttention.apply(q, k, v, scale), torch.bfloat16)
    for ours, theirs, ref in zip(explicit, flash, reference):
        bf16_step = 2.0 ** (ref.abs().max().log2().floor() - 7)
        assert (theirs - ref).abs().max() <= 3 * bf16_step
        assert (ours - ref).abs().max() <= 3 * bf16_step


def reference_experts(experts: Experts, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Token by token, slot by slot: the definition the batched version must match."""
    rows = []
    for token in range(x.shape[0]):
        total = torch.zeros_like(x[token])
        for slot in range(ids.shape[1]):
            e = int(ids[token, slot])
            gate, up = F.linear(x[token], experts.gate_up_proj[e]).chunk(2)
            total = total + weights[token, slot] * F.linear(F.silu(gate) * up, experts.down_proj[e])
        rows.append(total)
    return torch.stack(rows)


@pytest.mark.parametrize("rows, fixed", [(4, False), (1000, False), (4, True)], ids=["padded", "exact", "fixed-size"])
def test_expert_batches_match_token_by_token(monkeypatch, rows, fixed):
    """Both layouts (the fixed-size one is CUDA's in bf16; grouped_mm also runs it on CPUs in fp32)."""
    monkeypatch.setattr(Experts, "ROWS", rows)
    monkeypatch.setattr(Experts, "fixed_layout", staticmethod(lambda x: fixed))
    torch.manual_seed(0)
    experts = Experts(config("plain-q"))
    torch.nn.init.normal_(experts.gate_up_proj, std=0.2)
    torch.nn.init.normal_(experts.down_proj, std=0.2)
    x = torch.randn(13, experts.gate_up_proj.shape[-1], requires_grad=True)
    # expert 0 gets 13 of the 26 slots (padded to 16 rows when ROWS=4 or fixed); expert 7 gets none
    ids = torch.stack([torch.zeros(13, dtype=torch.long), torch.randint(1, 7, (13,))], dim=1)
    ids[:4, 1] = 0
    ids[:4, 0] = torch.tensor([1, 2, 3, 4])
    weights = torch.rand(13, 2, requires_grad=True)

    got = experts(x, ids, weights)
    grads = torch.autograd.grad(got.square().sum(), [x, weights, experts.gate_up_proj, experts.down_proj])
    expected = reference_experts(experts, x, ids, weights)
    expected_grads = torch.autograd.grad(
        expected.square().sum(), [x, weights, experts.gate_up_proj, experts.down_proj]
    )

    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, atol=1e-5, rtol=1e-5)
    assert torch.all(grads[2][7] == 0)  # the expert that saw no token


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_token_takes_its_experts_directly_with_the_batch_result(monkeypatch, dtype):
    torch.manual_seed(0)
    experts = Experts(config("plain-q"))
    torch.nn.init.normal_(experts.gate_up_proj, std=0.2)
    torch.nn.init.normal_(experts.down_proj, std=0.2)
    x = torch.randn(3, experts.gate_up_proj.shape[-1]).to(dtype)
    ids, weights = torch.tensor([[5, 2, 7], [1, 5, 0], [2, 0, 3]]), torch.rand(3, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        batch = experts(x, ids, weights)
        layouts = []
        monkeypatch.setattr(Experts, "_layout", lambda *args: layouts.append(args))
        singles = [experts(x[row : row + 1], ids[row : row + 1], weights[row : row + 1]) for row in range(3)]
    assert not layouts  # the sorted layout is not built for one token
    assert all(single.dtype == torch.float32 for single in singles)
    torch.testing.assert_close(torch.cat(singles), batch, atol=1e-6, rtol=1e-6)


def test_gathered_experts_give_the_batch_result():
    """Compiled decoding's expert path (`Experts._gathered`, each token's experts indexed in
    the products) equals the sorted layout's result, for one token and for several."""
    torch.manual_seed(0)
    experts = Experts(config("grouped"))
    torch.nn.init.normal_(experts.gate_up_proj, std=0.2)
    torch.nn.init.normal_(experts.down_proj, std=0.2)
    x = torch.randn(3, experts.gate_up_proj.shape[-1])
    ids, weights = torch.tensor([[5, 2, 7], [1, 5, 0], [2, 0, 3]]), torch.rand(3, 3)
    with torch.no_grad():
        batch = experts(x, ids, weights)
        torch.testing.assert_close(experts._gathered(x, ids, weights), batch, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(experts._gathered(x[1:2], ids[1:2], weights[1:2]), batch[1:2], atol=1e-6, rtol=1e-6)


def test_fixed_size_expert_layout_compiles_into_one_graph(monkeypatch):
    """The layout CUDA takes in bf16 has no data-dependent size: torch.compile traces the whole
    model, forward and backward, without a graph break (fullgraph=True), with eager's loss
    and gradients (op by op: aot_eager runs torch's own kernels, not the fused ones)."""
    monkeypatch.setenv("TINYSEEK_FUSED_KERNELS", "0")
    monkeypatch.setattr(Experts, "fixed_layout", staticmethod(lambda x: x.dtype == torch.bfloat16))
    torch.manual_seed(0)
    model = Transformer(config("grouped"))
    inputs, targets = torch.randint(0, 97, (2, 16)), torch.randint(0, 97, (2, 16))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    results = []
    for run in (model, compiled):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = run(inputs, targets)
        (out.loss + out.mtp_loss).backward()
        results.append((out, {name: p.grad.clone() for name, p in model.named_parameters()}))
    (expected, want), (got, grads) = results
    assert torch.equal(got.loss, expected.loss) and torch.equal(got.mtp_loss, expected.mtp_loss)
    assert grads["layers.1.mlp.experts.gate_up_proj"].abs().sum() > 0
    for name, grad in grads.items():  # bf16 products rounded in another order: within a bf16 step of the largest
        torch.testing.assert_close(grad, want[name], atol=1e-2 * want[name].abs().max().item(), rtol=0, msg=name)


def test_compiled_fixed_size_expert_layout_leaves_no_kernel_to_eager_torch(monkeypatch):
    """Inductor compiles the whole layout, forward and backward: an int64 `index_add_`
    (counting rows per expert) was left to aten's `index_put_`, a sorting kernel on a GPU."""
    from torch._inductor.utils import run_and_get_code

    monkeypatch.setattr(Experts, "fixed_layout", staticmethod(lambda x: x.dtype == torch.bfloat16))
    torch.manual_seed(0)
    experts = Experts(config("grouped"))
    for weight in experts.parameters():
        torch.nn.init.normal_(weight, std=0.1)
    n, k = 24, 2
    x = torch.randn(n, experts.gate_up_proj.shape[-1]).bfloat16().requires_grad_()
    ids = torch.stack([torch.randperm(experts.gate_up_proj.shape[0])[:k] for _ in range(n)])
    weights = torch.rand(n, k)
    compiled = torch.compile(experts, fullgraph=True)

    def step() -> torch.Tensor:
        out = compiled(x, ids, weights)
        out.square().sum().backward()
        return out

    out, code = run_and_get_code(step)
    torch.testing.assert_close(out, experts(x, ids, weights), atol=1e-2, rtol=1e-2)
    assert "aten.index_put_(" not in "\n".join(code)  # a call of the uncompiled operator


def test_routing_stays_fp32_under_autocast():
    torch.manual_seed(0)
    router = Router(config("grouped"))
    torch.nn.init.normal_(router.weight, std=0.5)
    x = torch.randn(20, router.weight.shape[1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        weights, ids, scores = router(x)
    expected_weights, expected_ids, expected_scores = router(x)
    assert scores.dtype == weights.dtype == torch.float32
    torch.testing.assert_close(scores, expected_scores, atol=0, rtol=0)
    assert torch.equal(ids, expected_ids)


def test_experts_add_up_in_fp32_under_autocast():
    torch.manual_seed(0)
    experts = Experts(config("plain-q"))
    torch.nn.init.normal_(experts.gate_up_proj, std=0.2)
    torch.nn.init.normal_(experts.down_proj, std=0.2)
    x = torch.randn(6, experts.gate_up_proj.shape[-1]).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = experts(x, torch.randint(0, 8, (6, 2)), torch.rand(6, 2))
    assert out.dtype == torch.float32


class MixedDtypeOps(TorchDispatchMode):
    """Records the ops whose tensor operands of two or more dimensions (activations, not a
    norm's gain) come in more than one floating dtype: a CPU runs those through a
    per-element casting loop, several times slower than a cast and the op."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        operands = [a for arg in (*args, *(kwargs or {}).values()) for a in (arg if isinstance(arg, (list, tuple)) else [arg])]
        tensors = [a for a in operands if isinstance(a, torch.Tensor)]
        dtypes = {t.dtype for t in tensors if t.is_floating_point() and t.dim() >= 2}
        if len(dtypes) > 1 and func.overloadpacket not in (torch.ops.aten.copy_, torch.ops.aten._to_copy):
            self.seen.append(f"{func}: {sorted(map(str, dtypes))}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", ["q-lora", "dense"])
def test_a_bf16_training_step_mixes_no_dtypes_in_one_op(name, monkeypatch):
    """Under autocast the residual stream is fp32 and the layers return bf16: each branch is
    cast before it is added (`model.promote.add_promoted`), forward and backward. Op by op,
    as a CPU without a C++ compiler trains (fused kernels would hide their own ops)."""
    monkeypatch.setenv("TINYSEEK_FUSED_KERNELS", "0")
    torch.manual_seed(0)
    model = Transformer(config(name))
    inputs = torch.randint(0, 97, (2, 16))
    with MixedDtypeOps() as ops:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(inputs, inputs)
        (out.loss + out.mtp_loss + out.aux_loss).backward()
    assert ops.seen == []


def saved_for_backward(compute):
    """compute()'s result and the tensors autograd kept for its backward, in order."""
    saved = []

    def keep(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        return compute(), saved


def test_experts_keep_no_fp32_rows_for_backward():
    """The fp32 sum of the k outputs keeps only its index for backward: the rows it adds
    (an fp32 copy of every routed row) are not needed there."""
    torch.manual_seed(0)
    experts = Experts(config("plain-q"))
    x = torch.randn(40, experts.gate_up_proj.shape[-1], requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, saved = saved_for_backward(
            lambda: experts(x.bfloat16(), torch.randint(0, 8, (40, 2)), torch.rand(40, 2, requires_grad=True)))
    hidden = experts.gate_up_proj.shape[-1]
    fp32_rows = [tuple(t.shape) for t in saved if t.dtype == torch.float32 and t.shape[-1] == hidden]
    assert saved and not fp32_rows


@pytest.mark.parametrize("k", [1, 2, 3])
def test_scatter_rows_copies_each_row_to_its_k_places_and_sums_their_gradients_as_autograd(k):
    torch.manual_seed(0)
    N, total = 5, 5 * k + 3
    x = torch.randn(N, 4, dtype=torch.bfloat16, requires_grad=True)
    index = torch.randperm(total)[: N * k].view(N, k)
    out = ScatterRows.apply(x, index, total)
    pairs = x.unsqueeze(1).expand(N, k, 4).flatten(0, 1)  # what autograd does with an expand
    expected = torch.zeros(total, 4, dtype=x.dtype).index_copy(0, index.flatten(), pairs)
    assert torch.equal(out, expected)
    grad = torch.randn_like(out)
    got, want = torch.autograd.grad(out, x, grad)[0], torch.autograd.grad(expected, x, grad)[0]
    if k <= 2:  # a sum of two rounded once: the same bits
        assert torch.equal(got, want)
    else:  # summed in fp32 in another order, then rounded
        torch.testing.assert_close(got, want, atol=0, rtol=8e-3)


def test_weighted_sum_of_expert_outputs_gives_autograds_values(kernels):
    torch.manual_seed(0)
    rows = torch.randn(6, 2, 10, dtype=torch.bfloat16, requires_grad=True)
    weights = torch.rand(6, 2, requires_grad=True)
    out = WeightedSum.apply(rows, weights)
    expected = (rows * weights.unsqueeze(-1)).sum(1)  # autograd's, in fp32 (the weights' dtype)
    assert out.dtype == expected.dtype == torch.float32
    assert_same(out, expected, kernels)
    grad = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, [rows, weights], grad),
                         torch.autograd.grad(expected, [rows, weights], grad)):
        assert got.dtype == want.dtype
        assert_same(got, want, kernels)


@pytest.mark.parametrize("packed", [False, True], ids=["apart", "side-by-side"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_keeps_gate_and_up_only_and_gives_autograds_gradients(kernels, dtype, packed):
    torch.manual_seed(0)
    if packed:  # one tensor [..., 2 x intermediate], as the experts' matmul gives it
        inputs = [torch.randn(2, 6, 20, dtype=dtype, requires_grad=True)]
        gate, up = inputs[0].chunk(2, dim=-1)
    else:
        inputs = [torch.randn(2, 6, 10, dtype=dtype, requires_grad=True) for _ in range(2)]
        gate, up = inputs
    out, saved = saved_for_backward(lambda: swiglu(*inputs))
    assert len(saved) == len(inputs) and all(s is i for s, i in zip(saved, inputs))
    grad = torch.randn_like(out)
    expected = F.silu(gate) * up
    assert out.shape == expected.shape
    assert_same(out, expected, kernels)
    for got, want in zip(torch.autograd.grad(out, inputs, grad), torch.autograd.grad(expected, inputs, grad)):
        assert got.shape == want.shape
        assert_same(got, want, kernels)


def test_mlp_trains_gate_and_up_as_one_matmul_with_the_plain_values_and_gradients():
    torch.manual_seed(0)
    mlp = MLP(8, 12)
    x = torch.randn(3, 5, 8, requires_grad=True)
    out = mlp(x)  # training: one matmul, SwiGLU side by side
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), out)  # decoding: two
    params = [x, mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight]
    expected = F.linear(F.silu(F.linear(x, params[1])) * F.linear(x, params[2]), params[3])
    torch.testing.assert_close(out, expected)
    grad = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, params, grad), torch.autograd.grad(expected, params, grad)):
        torch.testing.assert_close(got, want)


def reference_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """HF's DeepseekV3RMSNorm, written out."""
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def test_rms_norm_gradients_are_exact_in_fp64():
    x = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: RMSNormFunction.apply(x, w, 1e-6, None), (x, weight))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_the_plain_formula(kernels, dtype):
    torch.manual_seed(0)
    norm = RMSNorm(16)
    torch.nn.init.normal_(norm.weight, mean=1.0, std=0.3)
    x = (torch.randn(4, 7, 16) * 2).to(dtype).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    weight_ref = norm.weight.detach().clone().requires_grad_()

    out, expected = norm(x), reference_rms_norm(x_ref, weight_ref)
    grad = torch.randn_like(expected)
    out.backward(grad)
    expected.backward(grad)

    assert out.dtype == expected.dtype == torch.float32
    # a fused kernel may round its rms one way where torch rounds it the other: in bf16, one step apart
    within = 8e-3 if kernels == "fused" and dtype == torch.bfloat16 else 1e-6
    torch.testing.assert_close(out, expected, atol=within, rtol=within)
    with torch.no_grad():  # the path without autograd (op by op) computes the same
        assert_same(out.detach(), norm(x), kernels, rounded_to=dtype)
    # in bf16 the plain formula rounds the incoming gradient to bf16 first; ours keeps fp32
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(x.grad, x_ref.grad, atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(norm.weight.grad, weight_ref.grad, atol=tolerance, rtol=tolerance)


def test_rms_norm_emits_the_autocast_dtype():
    norm = RMSNorm(16)
    x = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = norm(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, reference_rms_norm(x, norm.weight).bfloat16(), atol=0, rtol=0)


@pytest.fixture
def recorded_row_products(monkeypatch):
    """Records each weight the row product multiplies; from 32 weight elements on, 80 per chunk."""
    taken = []
    product = linear._row_product
    monkeypatch.setattr(linear, "_row_product", lambda row, weight: taken.append(weight) or product(row, weight))
    monkeypatch.setattr(linear, "ROW_PRODUCT_MIN", 32)
    monkeypatch.setattr(linear, "ROW_PRODUCT_CHUNK", 5 * 16)
    return taken


@pytest.fixture
def row_products(recorded_row_products, monkeypatch):
    """`recorded_row_products` on a machine whose single rows take the row product."""
    monkeypatch.setattr(linear, "ROW_PRODUCT", True)
    return recorded_row_products


@pytest.mark.parametrize("vendor, mkl, pays", [("AuthenticAMD", True, True), ("GenuineIntel", True, False),
                                               ("AuthenticAMD", False, False), (None, True, False)])
def test_row_products_only_where_mkl_runs_on_a_cpu_not_intels(vendor, mkl, pays):
    assert linear.row_product_pays(vendor, mkl) is pays


def test_without_row_products_a_single_row_takes_the_linear_layer(recorded_row_products, monkeypatch):
    monkeypatch.setattr(linear, "ROW_PRODUCT", False)
    torch.manual_seed(0)
    weight, x = torch.randn(12, 16), torch.randn(1, 16)
    with torch.inference_mode():
        got = linear.linear(x, weight)
    assert not recorded_row_products
    assert torch.equal(got, F.linear(x, weight))


@pytest.mark.parametrize("shape", [(16,), (1, 16), (1, 1, 16), (1, 1, 1, 16)])
@pytest.mark.parametrize("rows", [3, 5, 12])
def test_one_row_takes_the_row_product_with_the_linear_result(row_products, rows, shape):
    torch.manual_seed(0)
    weight, x = torch.randn(rows, 16), torch.randn(shape)
    with torch.inference_mode():
        got = linear.linear(x, weight)
    assert row_products and row_products[0] is weight
    assert got.shape == (*shape[:-1], rows)
    assert torch.equal(got.reshape(-1), (weight * x.reshape(-1)).sum(-1))  # the product, summed row by row
    torch.testing.assert_close(got, F.linear(x, weight), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("case", ["autograd", "autocast", "rows", "small", "bf16"])
def test_other_products_stay_with_the_linear_layer(row_products, case):
    torch.manual_seed(0)
    weight = torch.randn(1 if case == "small" else 8, 16, requires_grad=case == "autograd")
    x = torch.randn(2 if case == "rows" else 1, 16)
    if case == "bf16":
        weight, x = weight.bfloat16(), x.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast"):
        got = linear.linear(x, weight) if case == "autograd" else torch.no_grad()(linear.linear)(x, weight)
        expected = F.linear(x, weight)
    assert not row_products
    assert torch.equal(got, expected)


def test_a_row_of_the_wrong_width_is_refused_as_by_the_linear_layer(row_products):
    with torch.no_grad(), pytest.raises(RuntimeError):
        linear.linear(torch.randn(1, 1), torch.randn(8, 16))
    assert not row_products


def test_decoding_one_prompt_takes_row_products_and_matches_the_forward_pass(row_products):
    torch.manual_seed(0)
    model = Transformer(config("q-lora")).eval()
    prompt = torch.randint(3, 97, (1, 12))
    with torch.no_grad():
        expected = model(prompt).logits[0, -1]
    caches = model.new_caches(1, 12)
    with torch.inference_mode():
        causal = torch.ones(1, 11, 11, dtype=torch.bool).tril()
        model.forward_cached(prompt[:, :11], torch.arange(11)[None], caches, 0, causal)
        taken = len(row_products)
        got = model.forward_cached(prompt[:, 11:], torch.tensor([[11]]), caches, 11, None)[0, -1]
    assert taken == 0  # the prompt's many rows take the linear layer
    experts = model.layers[-1].mlp.experts
    storages = {w.untyped_storage().data_ptr() for w in row_products}
    assert any(w is model.lm_head.weight for w in row_products)
    assert {experts.gate_up_proj.untyped_storage().data_ptr(), experts.down_proj.untyped_storage().data_ptr()} <= storages
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
