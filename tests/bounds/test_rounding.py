"""The rounding-error bound on certkd's own models (docs/verify_onnx.md §5): sound at sampled points, per
margin row, and recomputed when the weights change."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from certkd.attacks import linf_box
from certkd.bounds.rounding import rounding_error_bound
from certkd.graph import from_module
from certkd.models import create_model
from certkd.verification.float_proof import float_proof, margin_rounding


def _model(name: str, seed: int, **kwargs):
    """A certkd model in eval mode with non-trivial normalisation and BatchNorm statistics, weights ×4."""
    torch.manual_seed(seed)
    m = create_model(name, 1, 8, 10, mean=(0.3,), std=(0.7,), **kwargs).eval()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
            if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear)):
                mod.weight.mul_(4.0)
    return m


@pytest.mark.parametrize("name,kwargs", [("cnn7-w16", {}), ("mlp", {"hidden": [64, 32]}), ("cnn-small", {})])
def test_margin_rounding_covers_the_float32_forward_of_certkd_models(name, kwargs):
    """|margin in float32 − margin in float64| ≤ its bound (+ the float64 forward's own bound) at 256
    sampled points of the ε box, for every margin row z_y − z_j; the bound is finite and not vacuous."""
    gen = torch.Generator().manual_seed(1)
    for seed in range(2):
        model = _model(name, seed, **kwargs)
        model64 = copy.deepcopy(model).double()
        x = torch.rand(1, 1, 8, 8, generator=gen)
        lo, hi = linf_box(x, 0.1)
        with torch.no_grad():
            y = int(model(x).argmax())
            tol = margin_rounding(model, lo, hi, y)
            tol64 = margin_rounding(model64, lo.double(), hi.double(), y)
            pts = lo + (hi - lo) * torch.rand(256, 1, 8, 8, generator=gen)
            z32, z64 = model(pts).double(), model64(pts.double())
        others = [j for j in range(10) if j != y]
        gap = ((z32[:, [y]] - z32[:, others]) - (z64[:, [y]] - z64[:, others])).abs().numpy()
        assert tol.shape == (9,) and np.isfinite(tol).all() and (tol > 0).all()
        assert (gap <= tol + tol64).all(), (gap.max(0), tol)
        assert gap.max() > 0  # float32 does round here: the test can fail
        assert (tol64 < tol * 1e-6).all()  # the bound follows the model's own dtype


def test_float_proof_compares_each_row_with_twice_its_bound():
    tol = np.array([1e-6, 1e-3])
    assert float_proof(torch.tensor([[3e-6, 3e-3]]), tol)
    assert not float_proof(torch.tensor([[3e-6, 1.5e-3]]), tol)
    assert not float_proof(torch.tensor([[1e-6, 1.0]]), tol)
    assert float_proof(2.1e-3, tol) and not float_proof(1.9e-3, tol)  # a least margin: against the largest bound


def test_bound_follows_weights_changed_in_place():
    """The cached sparse matrices belong to the weights they were built from: scaling the head in place
    gives the bound of a fresh copy with those weights, not the stale one."""
    model = _model("cnn-small", 0)
    x = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    lo, hi = linf_box(x, 0.05)
    before = rounding_error_bound(from_module(model), lo[0], hi[0], torch.float32, (1, 8, 8))
    with torch.no_grad():
        model.head.weight.mul_(8.0)
    after = rounding_error_bound(from_module(model), lo[0], hi[0], torch.float32, (1, 8, 8))
    fresh = rounding_error_bound(from_module(copy.deepcopy(model)), lo[0], hi[0], torch.float32, (1, 8, 8))
    np.testing.assert_array_equal(after, fresh)
    assert (after > 4 * before).all()
