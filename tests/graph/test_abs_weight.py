"""|W| cached per weight version for gradient-free interval passes (certkd.graph.layers.base.abs_weight, #20)."""
import gc

import torch
from torch import nn

from certkd.bounds import interval_bounds
from certkd.graph.layers import base


def test_cached_until_the_weight_changes():
    lin = nn.Linear(5, 3)
    with torch.no_grad():
        a = base.abs_weight(lin.weight)
        assert base.abs_weight(lin.weight) is a and torch.equal(a, lin.weight.abs())
        lin.weight.mul_(-2.0)  # an optimiser step or load_state_dict: in place, version bumped
        b = base.abs_weight(lin.weight)
        assert b is not a and torch.equal(b, lin.weight.abs())
        lin.weight.data = torch.randn(3, 5)  # new storage
        assert torch.equal(base.abs_weight(lin.weight), lin.weight.abs())


def test_fresh_with_autograd_and_entry_freed_with_the_weight():
    lin = nn.Linear(4, 2)
    w = base.abs_weight(lin.weight)
    assert w.requires_grad and w.grad_fn is not None
    with torch.no_grad():
        base.abs_weight(lin.weight)
    key = id(lin.weight)
    assert key in base._ABS
    del lin, w
    gc.collect()
    assert key not in base._ABS


def test_eval_bounds_follow_weight_updates():
    net = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))
    lo, hi = -torch.rand(2, 6), torch.rand(2, 6)
    with torch.no_grad():
        first = interval_bounds(net, lo, hi)
        net[0].weight.add_(1.0)
        second = interval_bounds(net, lo, hi)
    with torch.enable_grad():
        fresh = interval_bounds(net, lo, hi)
    assert not torch.equal(first.upper, second.upper)
    assert torch.equal(second.upper, fresh.upper.detach()) and torch.equal(second.lower, fresh.lower.detach())
