"""Each activation rule's relaxation (``relax``) and output box (``post_box``) on sampled points.

For every rule, pre-activation boxes of every kind (all negative, all positive, straddling 0,
narrow, wide, a single point) are sampled; f at the samples must lie between the default lines,
between the lines of random α inside the rule's sound range and of the range's ends, and inside
``post_box``. The MILP encodings are checked end to end in ``tests/verification/test_activation_nets.py``.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from certkd.graph.layers import Activation, LeakyReLU, ReLU, Sigmoid, Tanh, UnsupportedLayerError
from certkd.graph.layers.base import _REGISTRY

RULES = {"relu": lambda: ReLU(nn.ReLU(), "a"), "leaky0.1": lambda: LeakyReLU(nn.LeakyReLU(0.1), "a"),
         "leaky0": lambda: LeakyReLU(nn.LeakyReLU(0.0), "a"), "sigmoid": lambda: Sigmoid(nn.Sigmoid(), "a"),
         "tanh": lambda: Tanh(nn.Tanh(), "a")}


def test_every_registered_activation_is_covered():
    registered = {cls for cls in _REGISTRY.values() if issubclass(cls, Activation)}
    assert registered == {type(make()) for make in RULES.values()}


def _boxes(dtype):
    g = torch.Generator().manual_seed(0)
    centre = torch.randn(400, generator=g, dtype=dtype) * 4
    width = torch.rand(400, generator=g, dtype=dtype) ** 3 * 10
    l, u = centre - width / 2, centre + width / 2
    fixed = torch.tensor([[-3.0, -1.0], [1.0, 3.0], [-1.0, 3.0], [-3.0, 1.0], [-0.01, 0.02], [-8.0, 8.0],
                          [2.0, 2.0], [-2.0, -2.0], [0.0, 0.0], [-20.0, 0.5], [-0.5, 20.0], [0.0, 1.0], [-1.0, 0.0]],
                         dtype=dtype)
    return torch.cat([l, fixed[:, 0]]).view(1, -1), torch.cat([u, fixed[:, 1]]).view(1, -1)


def _samples(l, u, k=64):
    t = torch.linspace(0, 1, k, dtype=l.dtype).view(k, 1, 1)
    return torch.minimum(torch.maximum(l + t * (u - l), l), u)  # (k, 1, D), both ends included


def _check_lines(rule, z, lo_s, lo_b, up_s, up_b, tol):
    """The lines, evaluated in float64 on their stored coefficients, against f in float64."""
    z, fz = z.double(), rule.forward(z.double())
    lower = lo_s.double() * z + (0 if lo_b is None else lo_b.double())
    upper = up_s.double() * z + up_b.double()
    assert bool((lower <= fz + tol).all()), float((lower - fz).max())
    assert bool((fz <= upper + tol).all()), float((fz - upper).max())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", sorted(RULES))
def test_relaxation_and_post_box_contain_samples(name, dtype):
    rule = RULES[name]()
    l, u = _boxes(dtype)
    z = _samples(l, u)
    # S-shaped lines carry their own rounding slack (exact); the piecewise-linear ones round their
    # chord's slope and intercept in the working precision (a few units of it)
    tol = 0.0 if not rule.splittable else 1e-12 if dtype == torch.float64 else 1e-5
    rel = rule.relax(l, u)
    _check_lines(rule, z, rel.lower_slope, rel.lower_bias, rel.upper_slope, rel.upper_bias, tol)
    lo, hi = rule.post_box(l, u)
    fz = rule.forward(z)
    assert bool(((lo <= fz) & (fz <= hi)).all())
    lo_np, hi_np = rule.post_box(l.double().numpy(), u.double().numpy())
    fz_np = rule.evaluate(z.double().numpy())
    assert ((lo_np <= fz_np + 1e-12) & (fz_np <= hi_np + 1e-12)).all()
    np.testing.assert_allclose(fz_np, rule.forward(z.double()).numpy(), rtol=1e-12, atol=1e-12)
    assert rel.alpha_init is not None
    # α: random points of the sound range, its ends, and values outside it (projected back)
    g = torch.Generator().manual_seed(1)
    full = (1, 5) + tuple(rel.alpha_init.shape[1:])
    lo_a = rel.alpha_lo if isinstance(rel.alpha_lo, float) else rel.alpha_lo.unsqueeze(1)
    hi_a = rel.alpha_hi if isinstance(rel.alpha_hi, float) else rel.alpha_hi.unsqueeze(1)
    t = torch.rand(full, generator=g, dtype=dtype)
    t[:, 0], t[:, 1] = 0.0, 1.0
    alpha = lo_a + t * (hi_a - lo_a)
    alpha[:, 4] = torch.randn(full[2:], generator=g, dtype=dtype) * 50  # projected into the range
    lo_s, lo_b, up_s, up_b = (None if x is None else x.expand(1, 5, *x.shape[-1:]) if x.dim() == 2 else x
                              for x in rel.lines(alpha))
    _check_lines(rule, z.unsqueeze(1), lo_s, lo_b, up_s, up_b, tol)
    # the default α is the default relaxation
    d = rel.lines(rel.alpha_init.unsqueeze(1))
    torch.testing.assert_close(torch.where(rel.loose, d[0][:, 0], rel.lower_slope), rel.lower_slope)


@pytest.mark.parametrize("name", sorted(RULES))
def test_exact_where_not_loose(name):
    """Where ``loose`` is False the lines coincide with f on [l, u] (CROWN skips those neurons)."""
    rule = RULES[name]()
    l, u = _boxes(torch.float64)
    rel = rule.relax(l, u)
    keep = ~rel.loose
    assert bool(keep.any())
    z = _samples(l, u)
    fz = rule.forward(z)
    lower = rel.lower_slope * z + (0 if rel.lower_bias is None else rel.lower_bias)
    upper = rel.upper_slope * z + rel.upper_bias
    assert float((upper - lower)[:, keep].abs().max()) < 1e-9
    assert float((fz - lower)[:, keep].abs().max()) < 1e-9


def test_relu_relaxation_values():
    """The triangle: chord u/(u−l), intercept −l·u/(u−l), CROWN's adaptive lower slope."""
    rel = ReLU(nn.ReLU(), "r").relax(torch.tensor([[-1.0, -3.0, 1.0, -2.0]]), torch.tensor([[3.0, 1.0, 2.0, -1.0]]))
    assert rel.upper_slope.tolist() == [[0.75, 0.25, 1.0, 0.0]]
    assert rel.upper_bias.tolist() == [[0.75, 0.75, 0.0, 0.0]]
    assert rel.lower_slope.tolist() == [[1.0, 0.0, 1.0, 0.0]]
    assert rel.loose.tolist() == [[True, True, False, False]]
    assert rel.lower_bias is None and (rel.alpha_lo, rel.alpha_hi) == (0.0, 1.0)


def test_leaky_relu_relaxation_values():
    rel = LeakyReLU(nn.LeakyReLU(0.5), "r").relax(torch.tensor([[-2.0, -3.0, -4.0]]), torch.tensor([[2.0, 1.0, -2.0]]))
    # chord through (−2, −1) and (2, 2): slope 3/4, value at 0: 1/2
    assert rel.upper_slope.tolist() == [[0.75, 0.625, 0.5]]
    assert rel.upper_bias.tolist() == [[0.5, 0.375, 0.0]]
    assert rel.lower_slope.tolist() == [[1.0, 0.5, 0.5]] and (rel.alpha_lo, rel.alpha_hi) == (0.5, 1.0)


def test_sigmoid_straddling_tangent_touches_the_end():
    """Straddling: the default upper line is the tangent through (l, σ(l)); its point d* ≥ 0."""
    rule = Sigmoid(nn.Sigmoid(), "s")
    l, u = torch.tensor([[-2.0]], dtype=torch.float64), torch.tensor([[6.0]], dtype=torch.float64)
    rel = rule.relax(l, u)
    at_l = float(rel.upper_slope * l + rel.upper_bias)
    assert at_l == pytest.approx(float(torch.sigmoid(l)), abs=1e-9)
    d = float(rel.alpha_init[0, 1, 0])
    assert 0 < d < 6 and float(rel.alpha_lo[0, 1, 0]) == d


@pytest.mark.parametrize("slope", [-0.1, 1.5])
def test_leaky_relu_slope_outside_unit_interval_refused(slope):
    with pytest.raises(UnsupportedLayerError, match="negative_slope"):
        LeakyReLU(nn.LeakyReLU(slope), "bad")


def test_splittable_only_piecewise_linear():
    assert [RULES[n]().splittable for n in ("relu", "leaky0.1", "sigmoid", "tanh")] == [True, True, False, False]
