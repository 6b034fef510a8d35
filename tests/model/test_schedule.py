import math

import pytest

from model.schedule import lr_at

BASE = dict(max_lr=1e-3, min_lr=1e-4, warmup_steps=10, total_steps=100)


@pytest.mark.parametrize("kind", ["cosine", "wsd", "constant"])
def test_warmup_is_linear_and_reaches_max(kind):
    lrs = [lr_at(step, kind=kind, **BASE) for step in range(10)]
    assert lrs[0] == pytest.approx(1e-4)
    assert lrs[9] == pytest.approx(1e-3)
    steps = [b - a for a, b in zip(lrs, lrs[1:])]
    assert all(d == pytest.approx(1e-4) for d in steps)


def test_cosine_midpoint_end_and_after():
    assert lr_at(10, **BASE) == pytest.approx(1e-3)
    assert lr_at(55, **BASE) == pytest.approx((1e-3 + 1e-4) / 2)
    assert lr_at(100, **BASE) == pytest.approx(1e-4)
    assert lr_at(500, **BASE) == pytest.approx(1e-4)
    lrs = [lr_at(step, **BASE) for step in range(10, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_cosine_follows_the_formula():
    step = 37
    progress = (step - 10) / 90
    expected = 1e-4 + 0.5 * (1 + math.cos(math.pi * progress)) * (1e-3 - 1e-4)
    assert lr_at(step, **BASE) == pytest.approx(expected)


def test_wsd_stable_then_linear_decay_over_last_fraction():
    lr = lambda step: lr_at(step, kind="wsd", decay_fraction=0.2, **BASE)  # noqa: E731
    assert [lr(s) for s in (10, 50, 79)] == pytest.approx([1e-3] * 3)
    assert lr(80) == pytest.approx(1e-3)
    assert lr(90) == pytest.approx((1e-3 + 1e-4) / 2)
    assert lr(100) == pytest.approx(1e-4)
    assert lr(1000) == pytest.approx(1e-4)


def test_constant_holds_after_warmup():
    assert lr_at(10_000, kind="constant", **BASE) == pytest.approx(1e-3)


def test_no_warmup_starts_at_max():
    assert lr_at(0, max_lr=1.0, min_lr=0.0, warmup_steps=0, total_steps=10) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "override",
    [{"kind": "linear"}, {"min_lr": 1e-2}, {"total_steps": 0}, {"warmup_steps": -1}, {"decay_fraction": 0.0}],
)
def test_bad_arguments_are_rejected(override):
    with pytest.raises(ValueError):
        lr_at(0, **{**BASE, **override})
