"""The prepared-network cache (#22 "cost per domain"): one plan per model, weights and input shape."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import certkd.bounds.crown as crown_module
from certkd.attacks import linf_box
from certkd.bounds.crown import alpha_crown_bounds, crown_bounds, prepared_plan


def _net():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 3))
    model[1].running_mean.uniform_(-0.2, 0.2)
    model[1].running_var.uniform_(0.5, 2.0)
    return model.eval()


def _box():
    x = torch.rand(2, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    return linf_box(x, 0.05)


@pytest.fixture
def builds(monkeypatch):
    """Counts plan constructions (the deep copy through fold_batchnorm that the cache saves)."""
    count = []
    real = crown_module._Plan
    monkeypatch.setattr(crown_module, "_Plan", lambda *a, **k: count.append(1) or real(*a, **k))
    return count


def _uncached(model, fn):
    model.__dict__.pop(crown_module._CACHE_ATTR, None)
    out = fn()
    model.__dict__.pop(crown_module._CACHE_ATTR, None)
    return out


def test_second_call_does_not_prepare_again_and_gives_the_same_bounds(builds):
    model, (lo, hi), y = _net(), _box(), torch.tensor([0, 2])
    run = lambda: alpha_crown_bounds(model, lo, hi, y, iterations=3)
    fresh = _uncached(model, run)
    builds.clear()
    first = run()
    assert len(builds) == 1  # one plan for the whole α-CROWN call (it used to be built twice)
    second = run()
    crown = crown_bounds(model, lo, hi, y)
    assert len(builds) == 1
    torch.testing.assert_close(first, fresh, rtol=0, atol=0)
    torch.testing.assert_close(second, fresh, rtol=0, atol=0)
    torch.testing.assert_close(crown, _uncached(model, lambda: crown_bounds(model, lo, hi, y)), rtol=0, atol=0)


def test_changed_weights_invalidate_the_plan(builds):
    model, (lo, hi), y = _net(), _box(), torch.tensor([0, 2])

    def rebuilt() -> bool:
        n = len(builds)
        out = crown_bounds(model, lo, hi, y)
        again = len(builds) - n
        crown_bounds(model, lo, hi, y)
        assert len(builds) - n == again  # and cached again right after
        torch.testing.assert_close(out, _uncached(model, lambda: crown_bounds(model, lo, hi, y)), rtol=0, atol=0)
        return again == 1

    rebuilt()
    before = crown_bounds(model, lo, hi, y)
    assert not rebuilt()
    with torch.no_grad():
        model[0].weight.mul_(1.5)  # in place: same tensor, new version
    assert rebuilt() and not torch.equal(before, crown_bounds(model, lo, hi, y))
    with torch.no_grad():
        model[1].running_var.mul_(3.0)  # a folded BatchNorm statistic
    assert rebuilt()
    model[4].weight = nn.Parameter(model[4].weight.detach() * 0.5)  # a new tensor
    assert rebuilt()


def test_train_mode_is_refused_even_when_a_plan_is_cached():
    model, (lo, hi), y = _net(), _box(), torch.tensor([0, 2])
    crown_bounds(model, lo, hi, y)
    model.train()
    with pytest.raises(ValueError, match="eval-mode BatchNorm"):
        crown_bounds(model, lo, hi, y)


def test_one_plan_per_input_shape_and_copies_start_empty(builds):
    model = _net()
    small, big = prepared_plan(model, (1, 6, 6)), prepared_plan(model, (1, 8, 8))
    assert small is prepared_plan(model, (1, 6, 6)) and big is not small and len(builds) == 2
    assert big.shapes[-1] == (3,) and small.shapes[1] == (4, 4, 4)
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert len(other.__dict__[crown_module._CACHE_ATTR]) == 0
        assert prepared_plan(other, (1, 6, 6)) is not small


def test_the_cache_dies_with_its_model():
    import gc
    import weakref

    model = _net()
    prepared_plan(model, (1, 6, 6))
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None
