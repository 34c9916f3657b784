"""Tests for certkd.losses.regularizers: warm-up regularisers of Shi et al. (docs/method.md §5.6)."""
from __future__ import annotations

import pytest
import torch

from certkd.losses.regularizers import warmup_regularizer

D = torch.float64

# Layer A (hand-computed, τ = 0.5, δ0 = 0.5):
#   c = [1, -4, 0, -4], δ = [0.5, 1, 2, 1] -> l = [0.5, -5, -2, -5], u = [1.5, -3, 2, -3]
#   active {l>0} = {0}, inactive {u<0} = {1, 3}
#   m_A = 1/4, m_I = -8/4 = -2 -> r1 = 0.125 (symmetrised: min(0.125, 8) = 0.125)
#   mean c = -1.75, (c - mean)^2 = [7.5625, 5.0625, 3.0625, 5.0625]
#   v_A = 7.5625, v_I = 10.125 -> r2 = 121/162 ≈ 0.7469 (min(r, 1/r) keeps it)
#   balance = (relu(0.5 - 0.125) + relu(0.5 - 0.7469)) / 0.5 = 0.75
#   mean δ = 1.125 -> tightness = relu(0.5 - 0.5/1.125) / 0.5 = 1/9
LAYER_A = (torch.tensor([1.0, -4.0, 0.0, -4.0], dtype=D), torch.tensor([0.5, 1.0, 2.0, 1.0], dtype=D))
A_TIGHT, A_BAL = 1.0 / 9.0, 0.75

# Layer B: every ReLU unstable -> m_A = m_I = 0 -> r1 = 0/0 = NaN -> balance skipped.
#   c = [0.5, -0.5], δ = [4, 4]; mean δ = 4 -> tightness = relu(0.5 - 0.5/4)/0.5 = 0.75
LAYER_B = (torch.tensor([0.5, -0.5], dtype=D), torch.tensor([4.0, 4.0], dtype=D))
B_TIGHT = 0.75

DELTA0 = torch.tensor(0.5, dtype=D)


def test_single_layer_hand_computed():
    out = warmup_regularizer([LAYER_A], DELTA0, tol=0.5)
    assert out.dim() == 0
    assert out.item() == pytest.approx(A_TIGHT + A_BAL, rel=1e-12)


def test_single_layer_hand_computed_other_tolerance():
    # τ = 1: tightness 1 − 4/9; balance (1 − 0.125) + (1 − 121/162)
    out = warmup_regularizer([LAYER_A], DELTA0, tol=1.0)
    assert out.item() == pytest.approx(5 / 9 + 7 / 8 + 41 / 162, rel=1e-12)


def test_shape_of_layer_does_not_matter():
    c, d = LAYER_A
    out = warmup_regularizer([(c.view(2, 2), d.view(2, 2))], DELTA0, tol=0.5)
    assert out.item() == pytest.approx(A_TIGHT + A_BAL, rel=1e-12)


def test_tightness_zero_when_bounds_are_tight():
    # mean δ = 0.5 = δ0: δ0/mean δ = 1 > τ -> 0; balance as hand-computed below
    c = torch.tensor([1.0, -1.0], dtype=D)
    d = torch.tensor([0.5, 0.5], dtype=D)
    # active {0}, inactive {1}: m_A = 0.5, m_I = -0.5 -> r1 = 1; v_A = v_I = 1 -> r2 = 1 -> balance 0
    assert warmup_regularizer([(c, d)], DELTA0, tol=0.5).item() == 0.0


def test_empty_preactivations_give_zero():
    out = warmup_regularizer([], DELTA0)
    assert out.dim() == 0 and out.item() == 0.0


def test_nan_balance_layer_is_skipped():
    out = warmup_regularizer([LAYER_B], DELTA0, tol=0.5)
    assert torch.isfinite(out)
    assert out.item() == pytest.approx(B_TIGHT, rel=1e-12)


def test_tightness_averaged_over_layers():
    # two copies of layer A average to the same value as one
    out = warmup_regularizer([LAYER_A, LAYER_A], DELTA0, tol=0.5)
    assert out.item() == pytest.approx(A_TIGHT + A_BAL, rel=1e-12)
    # with a tight, balanced layer (tightness 0, balance 0) both terms halve
    tight = (torch.tensor([1.0, -1.0], dtype=D), torch.tensor([0.5, 0.5], dtype=D))
    out = warmup_regularizer([LAYER_A, tight], DELTA0, tol=0.5)
    assert out.item() == pytest.approx(A_TIGHT / 2 + A_BAL / 2, rel=1e-12)


def test_skipped_balance_layer_counts_in_average():
    out = warmup_regularizer([LAYER_A, LAYER_B], DELTA0, tol=0.5)
    expected = (A_TIGHT + B_TIGHT) / 2 + (A_BAL + 0.0) / 2
    assert out.item() == pytest.approx(expected, rel=1e-12)


def test_gradient_flows_to_centers_and_radii():
    c = LAYER_A[0].clone().requires_grad_(True)
    d = LAYER_A[1].clone().requires_grad_(True)
    warmup_regularizer([(c, d)], DELTA0, tol=0.5).backward()
    assert c.grad is not None and torch.isfinite(c.grad).all() and c.grad.abs().sum() > 0
    # d(tightness)/d(mean δ) = (δ0 / mean δ²)/τ, spread over 4 entries
    expected = (0.5 / 1.125 ** 2) / 0.5 / 4
    torch.testing.assert_close(d.grad, torch.full((4,), expected, dtype=D))
