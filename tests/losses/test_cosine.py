"""Issue #21: the cosine distance and its sound bound over the feature box (docs/method.md §7.4)."""
import math

import pytest
import torch

from certkd.losses.cosine import COS_EPS, cosine_distance, cosine_distance_bound
from certkd.losses.distillation import (DISTANCES, DistillationError, cc_dist_distance, exp_dist_distance,
                                        feature_distance, mtl_dist_distance, worst_case_feature_distance)

T = torch.tensor


def test_cosine_distance_by_hand():
    v = T([[3.0, 4.0], [1.0, 0.0], [1.0, 0.0], [0.0, 0.0], [2.0, 0.0]])
    t = T([[4.0, 3.0], [0.0, 1.0], [-1.0, 0.0], [1.0, 1.0], [5.0, 0.0]])
    d = cosine_distance(v, t)
    # 1 - 24/25, orthogonal, opposite, a zero vector (cos 0), parallel
    assert d.tolist() == pytest.approx([1 / 25, 1.0, 2.0, 1.0, 0.0], abs=1e-7)
    assert torch.equal(feature_distance(v, t, "cosine"), d)
    # scale-free: multiplying either side by a positive number changes nothing
    torch.testing.assert_close(cosine_distance(7.0 * v, 0.01 * t), d, rtol=0, atol=1e-6)


def test_cosine_gradient_is_finite_at_zero_features():
    v = torch.zeros(2, 3, requires_grad=True)
    cosine_distance(v, T([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])).sum().backward()
    assert torch.isfinite(v.grad).all()
    lo = T([[-1.0, -1.0, 0.0]], requires_grad=True)
    hi = T([[1.0, 2.0, 0.0]], requires_grad=True)
    cosine_distance_bound(lo, hi, T([[1.0, 0.0, 0.0]])).sum().backward()
    assert torch.isfinite(lo.grad).all() and torch.isfinite(hi.grad).all()


def test_cosine_bound_by_hand():
    t = T([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    lo = T([[1.0, 1.0], [-1.0, 1.0], [-1.0, 2.0], [0.5, 2.0]])
    hi = T([[2.0, 3.0], [2.0, 2.0], [1.0, 3.0], [1.5, 2.0]])
    b = cosine_distance_bound(lo, hi, t)
    # row 0: min v·t = 1 >= 0, largest |v| = sqrt(13)  ->  1 - 1/sqrt(13)
    # row 1: min v·t = -1 < 0, smallest |v| = 1 (the box holds v_1 = 0)  ->  cos >= -1  ->  2
    # row 2: min v·t = -1, smallest |v| = 2  ->  1 + 1/2
    # row 3: min v·t = 2, largest |v| = 2.5  ->  1 - 0.8 (attained at v = (1.5, 2))
    assert b.tolist() == pytest.approx([1 - 1 / math.sqrt(13), 2.0, 1.5, 0.2], rel=1e-6)
    assert torch.equal(worst_case_feature_distance(lo, hi, t, "cosine"), b)


def test_cosine_bound_is_sound_and_exact_on_a_point():
    g = torch.Generator().manual_seed(0)
    lo = torch.randn(64, 6, generator=g)
    hi = lo + torch.rand(64, 6, generator=g) * torch.rand(64, 1, generator=g) * 2
    t = torch.randn(64, 6, generator=g)
    bound = cosine_distance_bound(lo, hi, t)
    worst = torch.zeros(64)
    for _ in range(400):
        v = lo + (hi - lo) * torch.rand(64, 6, generator=g)
        worst = torch.maximum(worst, cosine_distance(v, t))
    for corner in range(2 ** 6):  # the corners too
        pick = torch.tensor([(corner >> k) & 1 for k in range(6)], dtype=torch.bool)
        worst = torch.maximum(worst, cosine_distance(torch.where(pick, hi, lo), t))
    assert (worst <= bound + 1e-6).all()
    assert (bound <= 2.0).all() and (bound >= 0).all()
    # a box of zero width: the bound is the point's distance, bit for bit
    assert torch.equal(cosine_distance_bound(lo, lo, t), cosine_distance(lo, t))


def test_cc_dist_cosine_is_the_bound_over_the_shrunk_box():
    a, lo, hi, t = T([[1.0, 2.0]]), T([[0.0, 2.0]]), T([[2.0, 2.0]]), T([[0.0, 1.0]])
    # B_0.5 = 0.5 a + 0.5 [l, u] = [0.5, 1.5] x {2}: max of 1 - cos is at (1.5, 2): 1 - 2/2.5
    d = cc_dist_distance(a, lo, hi, t, 0.5, combination="box", distance="cosine")
    assert d.item() == pytest.approx(0.2, rel=1e-6)
    assert torch.equal(cc_dist_distance(a, lo, hi, t, 0.0, distance="cosine"), cosine_distance(a, t))
    assert torch.equal(cc_dist_distance(a, lo, hi, t, 1.0, distance="cosine"), cosine_distance_bound(lo, hi, t))
    # MTL and Exp combine the point and the bound as for every distance
    m = mtl_dist_distance(a, lo, hi, t, 0.25, distance="cosine")
    torch.testing.assert_close(m, 0.25 * cosine_distance_bound(lo, hi, t) + 0.75 * cosine_distance(a, t))
    e = exp_dist_distance(a, lo, hi, t, 0.5, distance="cosine")
    torch.testing.assert_close(e, (cosine_distance_bound(lo, hi, t).mean() * cosine_distance(a, t).mean()).sqrt())


@pytest.mark.parametrize("combination", ["literal", "distance"])
def test_cosine_refuses_the_per_feature_combinations(combination):
    a = lo = hi = t = torch.ones(1, 2)
    with pytest.raises(DistillationError, match=f"no '{combination}' combination.*use combination 'box'"):
        cc_dist_distance(a, lo, hi, t, 0.5, combination=combination, distance="cosine")


def test_cosine_refuses_the_mean_reduction():
    with pytest.raises(DistillationError, match="use reduction 'sum'"):
        feature_distance(torch.ones(1, 2), torch.ones(1, 2), "cosine", "mean")


def test_losses_compute_every_formula_but_standardized():
    """standardized is l2sq after the method's scaling (it needs the teacher's statistics), not a formula here."""
    assert DISTANCES == ("l2sq", "l1", "l2", "cosine")
    with pytest.raises(DistillationError, match="unknown distance 'standardized'"):
        feature_distance(torch.ones(1, 2), torch.ones(1, 2), "standardized")
    assert COS_EPS == 1e-8
