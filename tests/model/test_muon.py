import io

import pytest
import torch

from model.muon import GroupedMuon, orthogonalise

# square, wide, tall (orthogonalised transposed, so it joins the wide ones), a lone shape
SHAPES = [(16, 16), (16, 16), (8, 16), (16, 8), (8, 16), (24, 16), (3, 16)]


def params_and_grads(seed: int) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    """On the CPU, whatever the default device: bit-identity is a CPU property (a GPU's batched
    matmuls may round differently from its single ones)."""
    generator = torch.Generator().manual_seed(seed)
    params = [torch.randn(shape, generator=generator, device="cpu") for shape in SHAPES]
    # gradients of very different sizes: the normalisation before the iterations matters
    grads = [[torch.randn(shape, generator=generator, device="cpu") * 10.0 ** (step - 2) for shape in SHAPES]
             for step in range(4)]
    return params, grads


@pytest.mark.parametrize("options", [
    {"adjust_lr_fn": "match_rms_adamw"},
    {"adjust_lr_fn": "original", "nesterov": False, "weight_decay": 0.0},
    {"ns_steps": 3, "momentum": 0.9},
])
def test_updates_are_torchs_bit_for_bit(options):
    start, grads = params_and_grads(0)
    theirs = [p.clone().requires_grad_() for p in start]
    ours = [p.clone().requires_grad_() for p in start]
    reference = torch.optim.Muon(theirs, lr=0.02, **options)
    grouped = GroupedMuon(ours, lr=0.02, **options)
    for step_grads in grads:
        for a, b, grad in zip(theirs, ours, step_grads):
            a.grad, b.grad = grad.clone(), grad.clone()
        reference.step()
        grouped.step()
        for a, b in zip(theirs, ours):
            assert torch.equal(a, b)
    assert not torch.equal(ours[0], start[0])


@pytest.mark.parametrize("use_addmm", [True, False])
@pytest.mark.parametrize("dtype, atol", [(torch.bfloat16, 1e-2), (torch.float32, 1e-5)])
def test_orthogonalise_keeps_shapes_and_order(use_addmm, dtype, atol):
    matrices = params_and_grads(2)[0]
    out = orthogonalise(matrices, (3.4445, -4.7750, 2.0315), 5, 1e-7, use_addmm, dtype)
    assert [o.shape for o in out] == [m.shape for m in matrices]
    assert {o.dtype for o in out} == {dtype}
    a, b, c = (3.4445, -4.7750, 2.0315)
    for m, o in zip(matrices, out):
        # each matrix as the one-at-a-time iteration computes it
        x = m.to(dtype).mT if m.shape[0] > m.shape[1] else m.to(dtype)
        x = x / x.norm().clamp(min=1e-7)
        for _ in range(5):
            gram = x @ x.mT
            x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a) if use_addmm \
                else a * x + (b * gram + c * gram @ gram) @ x
        assert torch.allclose(o.float(), (x.mT if m.shape[0] > m.shape[1] else x).float(), atol=atol)
        # roughly orthogonal: the quintic iteration takes singular values to ~[0.7, 1.2] (those
        # of a nearly singular matrix's smallest directions rise more slowly)
        singular = torch.linalg.svdvals(o.float())
        assert singular.max() < 1.3 and (singular > 0.6).float().mean() >= 0.75


def test_state_loads_from_torchs_muon():
    start, grads = params_and_grads(1)
    theirs = [p.clone().requires_grad_() for p in start]
    ours = [p.clone().requires_grad_() for p in start]
    reference = torch.optim.Muon(theirs, lr=0.02)
    for p, grad in zip(theirs, grads[0]):
        p.grad = grad.clone()
    reference.step()
    checkpoint = io.BytesIO()
    torch.save(reference.state_dict(), checkpoint)
    checkpoint.seek(0)
    grouped = GroupedMuon(ours, lr=0.02)
    grouped.load_state_dict(torch.load(checkpoint))
    with torch.no_grad():
        for a, b in zip(theirs, ours):
            b.copy_(a)
    for a, b, grad in zip(theirs, ours, grads[1]):
        a.grad, b.grad = grad.clone(), grad.clone()
    reference.step()
    grouped.step()
    assert all(torch.equal(a, b) for a, b in zip(theirs, ours))


def test_fp32_iterations_update_with_fp32_orthogonalisation():
    """With ns_dtype fp32 the step is torch's but for the iterations' dtype: the update is
    the fp32 orthogonalisation of the Nesterov momentum, which bf16's only approximates."""
    start, grads = params_and_grads(3)
    fp32 = [p.clone().requires_grad_() for p in start]
    bf16 = [p.clone().requires_grad_() for p in start]
    lr, momentum = 0.02, 0.95
    optimizers = [GroupedMuon(fp32, lr=lr, momentum=momentum, weight_decay=0.0, adjust_lr_fn="original",
                              ns_dtype=torch.float32),
                  GroupedMuon(bf16, lr=lr, momentum=momentum, weight_decay=0.0, adjust_lr_fn="original")]
    for a, b, grad in zip(fp32, bf16, grads[0]):
        a.grad, b.grad = grad.clone(), grad.clone()
    for optimizer in optimizers:
        optimizer.step()
    # first step: momentum buffer (1 - m) g, Nesterov update g.lerp(buffer, m)
    updates = [g.lerp((1 - momentum) * g, momentum) for g in grads[0]]
    expected = orthogonalise(updates, (3.4445, -4.7750, 2.0315), 5, 1e-7, dtype=torch.float32)
    for p, start_p, update in zip(fp32, start, expected):
        scale = lr * max(1.0, p.shape[0] / p.shape[1]) ** 0.5  # torch's "original" adjustment
        assert torch.allclose(p.detach(), start_p - scale * update, atol=1e-6)
    differences = [(a - b).abs().max().item() for a, b in zip(fp32, bf16)]
    assert 0 < max(differences) < 0.01
