import io

import pytest
import torch

from model.muon import GroupedMuon, orthogonalise

# square, wide, tall (orthogonalised transposed, so it joins the wide ones), a lone shape
SHAPES = [(16, 16), (16, 16), (8, 16), (16, 8), (8, 16), (24, 16), (3, 16)]


def params_and_grads(seed: int) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    generator = torch.Generator().manual_seed(seed)
    params = [torch.randn(shape, generator=generator) for shape in SHAPES]
    # gradients of very different sizes: the normalisation before the iterations matters
    grads = [[torch.randn(shape, generator=generator) * 10.0 ** (step - 2) for shape in SHAPES] for step in range(4)]
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


def test_orthogonalise_keeps_shapes_and_order():
    matrices = [torch.randn(shape) for shape in SHAPES]
    out = orthogonalise(matrices, (3.4445, -4.7750, 2.0315), 5, 1e-7)
    assert [o.shape for o in out] == [m.shape for m in matrices]
    # roughly orthogonal: singular values near 1 (the quintic iteration leaves them in ~[0.5, 1.5])
    for o in out:
        singular = torch.linalg.svdvals(o.float())
        assert singular.min() > 0.3 and singular.max() < 1.6


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
