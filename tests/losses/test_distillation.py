"""Tests for certkd.losses.distillation (docs/method.md §7, CC-Dist)."""
from __future__ import annotations

import itertools

import pytest
import torch

from certkd.errors import CertkdError
from certkd.losses.distillation import (
    COMBINATIONS,
    DISTANCES,
    REDUCTIONS,
    cc_dist_distance,
    exp_dist_distance,
    feature_distance,
    logit_distillation_loss,
    mtl_dist_distance,
    project_to_box,
    worst_case_feature_distance,
    worst_case_point,
)

# The distances of the form R_k phi(|v_k - t_k|) (cosine is not: tests/losses/test_cosine.py).
SEPARABLE = ("l2sq", "l1", "l2")


def make_data(seed, n=4, m=16, dtype=torch.float64, inside=True):
    """Random box [l, u] (l >= 0 like post-ReLU features), a in the box, teacher t."""
    g = torch.Generator().manual_seed(seed)
    lo = torch.rand(n, m, generator=g, dtype=dtype) * 2.0
    width = torch.rand(n, m, generator=g, dtype=dtype) * 3.0 + 0.05
    hi = lo + width
    if inside:
        a = lo + torch.rand(n, m, generator=g, dtype=dtype) * width
    else:
        a = torch.randn(n, m, generator=g, dtype=dtype) * 4.0
    t = torch.randn(n, m, generator=g, dtype=dtype) * 2.0 + 1.0
    return a, lo, hi, t


def closed_form_worst(lo, hi, t):
    c, r = (hi + lo) / 2, (hi - lo) / 2
    return ((c - t).abs() + r) ** 2


# --------------------------------------------------------------------------- endpoints


@pytest.mark.parametrize("combination", COMBINATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_alpha0_is_exact_adversarial_distance(combination, dtype):
    a, lo, hi, t = make_data(0, dtype=dtype, inside=False)
    d = cc_dist_distance(a, lo, hi, t, 0.0, combination=combination)
    assert d.shape == (4,)
    assert torch.equal(d, ((a - t) ** 2).sum(-1))
    assert torch.equal(d, feature_distance(a, t))


@pytest.mark.parametrize("combination", COMBINATIONS)
def test_alpha1_is_worst_case_bound(combination):
    a, lo, hi, t = make_data(1)
    d = cc_dist_distance(a, lo, hi, t, 1.0, combination=combination)
    expected = closed_form_worst(lo, hi, t).sum(-1)
    torch.testing.assert_close(d, expected, rtol=1e-12, atol=0.0)
    # exactly the same number as the stand-alone bound
    assert torch.equal(d, worst_case_feature_distance(lo, hi, t))


@pytest.mark.parametrize("m", [1, 3, 6, 8])
def test_worst_case_equals_max_over_corners(m):
    a, lo, hi, t = make_data(2 + m, n=3, m=m)
    corners = torch.tensor(list(itertools.product([0, 1], repeat=m)), dtype=lo.dtype)  # (2^m, m)
    pts = lo.unsqueeze(0) + corners.unsqueeze(1) * (hi - lo).unsqueeze(0)  # (2^m, N, m)
    corner_max = ((pts - t.unsqueeze(0)) ** 2).sum(-1).max(dim=0).values  # (N,)
    for combination in COMBINATIONS:
        d1 = cc_dist_distance(a, lo, hi, t, 1.0, combination=combination)
        torch.testing.assert_close(d1, corner_max, rtol=1e-12, atol=0.0)
    # the worst-case point is a maximising corner
    h_hat = worst_case_point(lo, hi, t)
    torch.testing.assert_close(((h_hat - t) ** 2).sum(-1), corner_max, rtol=1e-12, atol=0.0)


def test_worst_case_point_selection_and_gradient():
    lo = torch.tensor([[0.0, 0.0, 1.0]], requires_grad=True)
    hi = torch.tensor([[10.0, 10.0, 2.0]], requires_grad=True)
    t = torch.tensor([[3.0, 8.0, 1.5]])  # t <= c -> u ; t > c -> l ; tie -> u
    h = worst_case_point(lo, hi, t)
    assert torch.equal(h, torch.tensor([[10.0, 0.0, 2.0]]))
    h.sum().backward()
    assert torch.equal(hi.grad, torch.tensor([[1.0, 0.0, 1.0]]))
    assert torch.equal(lo.grad, torch.tensor([[0.0, 1.0, 0.0]]))


# --------------------------------------------------------------------------- soundness


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_soundness_against_sampled_points_and_corners(seed, dtype):
    n, m, k = 4, 16, 1000
    a, lo, hi, t = make_data(100 + seed, n=n, m=m, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    d1 = worst_case_feature_distance(lo, hi, t)
    for combination in COMBINATIONS:
        assert torch.equal(cc_dist_distance(a, lo, hi, t, 1.0, combination=combination), d1)
    u = torch.rand(k, n, m, generator=g, dtype=dtype)
    inside = lo + u * (hi - lo)
    assert bool(((inside >= lo) & (inside <= hi)).all())
    bits = torch.randint(0, 2, (k, n, m), generator=g).bool()
    corners = torch.where(bits, hi.expand(k, n, m), lo.expand(k, n, m))
    for pts in (inside, corners):
        dist = ((pts - t) ** 2).sum(-1)  # (k, N)
        assert bool((d1.unsqueeze(0) >= dist).all())
    # the best sampled corner is close to the bound (the bound is not vacuous)
    assert bool((((corners - t) ** 2).sum(-1).max(0).values > 0.5 * d1).all())


# --------------------------------------------------------------------------- monotonicity / ordering


@pytest.mark.parametrize("seed", range(4))
def test_box_variant_monotone_in_alpha(seed):
    a, lo, hi, t = make_data(200 + seed)
    alphas = torch.linspace(0, 1, 21).tolist()
    for combination in ("box", "distance"):
        vals = torch.stack(
            [cc_dist_distance(a, lo, hi, t, al, combination=combination) for al in alphas]
        )  # (21, N)
        diffs = vals[1:] - vals[:-1]
        assert bool((diffs >= -1e-12 * vals[1:].abs()).all()), combination
        assert bool((vals[-1] > vals[0]).all())


def test_literal_not_monotone_on_spec_counterexample():
    lo, hi = torch.tensor([[0.0]]), torch.tensor([[10.0]])
    t, a = torch.tensor([[3.0]]), torch.tensor([[2.0]])
    vals = [cc_dist_distance(a, lo, hi, t, al, combination="literal").item() for al in (0.0, 0.125, 1.0)]
    # |z_alpha - t| = |8 alpha - 1|: 1 -> 0 -> 7
    assert vals[0] == pytest.approx(1.0)
    assert vals[1] == pytest.approx(0.0, abs=1e-12)
    assert vals[2] == pytest.approx(49.0)
    assert vals[1] < vals[0]
    # the box variant is monotone on the same example
    box = [cc_dist_distance(a, lo, hi, t, al).item() for al in (0.0, 0.125, 1.0)]
    assert box[0] <= box[1] <= box[2]
    assert box[1] > vals[1]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("distance", SEPARABLE)
def test_ordering_literal_box_distance(seed, distance):
    a, lo, hi, t = make_data(300 + seed, dtype=torch.float32)
    for al in (0.1, 0.3, 0.5, 0.77, 0.95):
        da = cc_dist_distance(a, lo, hi, t, al, combination="literal", distance=distance)
        db = cc_dist_distance(a, lo, hi, t, al, combination="box", distance=distance)
        dc = cc_dist_distance(a, lo, hi, t, al, combination="distance", distance=distance)
        assert bool((da <= db * (1 + 1e-5)).all())
        assert bool((db <= dc * (1 + 1e-5)).all())
        # literal stays below the worst-case bound when a is in the box
        assert bool((da <= worst_case_feature_distance(lo, hi, t, distance) * (1 + 1e-5)).all())
    # strict somewhere for generic data (the three really differ)
    da = cc_dist_distance(a, lo, hi, t, 0.5, combination="literal", distance=distance)
    dc = cc_dist_distance(a, lo, hi, t, 0.5, combination="distance", distance=distance)
    assert bool((da < dc).any())


def test_box_variant_matches_closed_form():
    a, lo, hi, t = make_data(7)
    c, r = (hi + lo) / 2, (hi - lo) / 2
    for al in (0.2, 0.6):
        expected = (((1 - al) * a + al * c - t).abs() + al * r).pow(2).sum(-1)
        torch.testing.assert_close(cc_dist_distance(a, lo, hi, t, al), expected, rtol=1e-12, atol=1e-12)
        expected_c = (al * ((c - t).abs() + r) + (1 - al) * (a - t).abs()).pow(2).sum(-1)
        torch.testing.assert_close(
            cc_dist_distance(a, lo, hi, t, al, combination="distance"), expected_c, rtol=1e-12, atol=1e-12
        )
        h_hat = torch.where(t <= c, hi, lo)
        expected_a = ((al * h_hat + (1 - al) * a - t) ** 2).sum(-1)
        torch.testing.assert_close(
            cc_dist_distance(a, lo, hi, t, al, combination="literal"), expected_a, rtol=1e-12, atol=1e-12
        )


# --------------------------------------------------------------------------- distances / reductions


@pytest.mark.parametrize("combination", COMBINATIONS)
def test_l1_and_l2_endpoints(combination):
    a, lo, hi, t = make_data(11, inside=False)
    worst = (closed_form_worst(lo, hi, t)).sqrt()  # |c - t| + r
    d0_l1 = cc_dist_distance(a, lo, hi, t, 0.0, combination, distance="l1")
    d1_l1 = cc_dist_distance(a, lo, hi, t, 1.0, combination, distance="l1")
    assert torch.equal(d0_l1, (a - t).abs().sum(-1))
    torch.testing.assert_close(d1_l1, worst.sum(-1), rtol=1e-12, atol=0.0)
    d0_l2 = cc_dist_distance(a, lo, hi, t, 0.0, combination, distance="l2")
    d1_l2 = cc_dist_distance(a, lo, hi, t, 1.0, combination, distance="l2")
    torch.testing.assert_close(d0_l2, torch.linalg.vector_norm(a - t, dim=-1), rtol=1e-12, atol=0.0)
    torch.testing.assert_close(d1_l2, (worst**2).sum(-1).sqrt(), rtol=1e-12, atol=0.0)
    # l2 = sqrt(l2sq) at an interior alpha too
    torch.testing.assert_close(
        cc_dist_distance(a, lo, hi, t, 0.4, combination, distance="l2"),
        cc_dist_distance(a, lo, hi, t, 0.4, combination, distance="l2sq").sqrt(),
        rtol=1e-12,
        atol=0.0,
    )


@pytest.mark.parametrize("combination", COMBINATIONS)
@pytest.mark.parametrize("alpha", [0.0, 0.35, 1.0])
def test_mean_reduction(combination, alpha):
    a, lo, hi, t = make_data(12)
    m = a.shape[-1]
    for distance in ("l2sq", "l1"):
        s = cc_dist_distance(a, lo, hi, t, alpha, combination, distance, "sum")
        mu = cc_dist_distance(a, lo, hi, t, alpha, combination, distance, "mean")
        torch.testing.assert_close(mu, s / m, rtol=1e-12, atol=0.0)
    # l2 with mean = sqrt of the mean of squares (root-mean-square)
    s2 = cc_dist_distance(a, lo, hi, t, alpha, combination, "l2sq", "sum")
    mu_l2 = cc_dist_distance(a, lo, hi, t, alpha, combination, "l2", "mean")
    torch.testing.assert_close(mu_l2, (s2 / m).sqrt(), rtol=1e-12, atol=0.0)


def test_feature_distance_values_and_l2_zero_gradient():
    v = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    t = torch.tensor([[0.0, 4.0, 3.0], [0.0, 0.0, 0.0]])
    assert torch.equal(feature_distance(v, t), torch.tensor([5.0, 0.0]))
    assert torch.equal(feature_distance(v, t, "l1"), torch.tensor([3.0, 0.0]))
    assert torch.equal(feature_distance(v, t, "l1", "mean"), torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(feature_distance(v, t, "l2"), torch.tensor([5.0**0.5, 0.0]))
    vv = v.clone().requires_grad_(True)
    feature_distance(vv, t, "l2").sum().backward()
    assert torch.isfinite(vv.grad).all()
    assert torch.equal(vv.grad[1], torch.zeros(3))


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("combination, distance", [(c, d) for c in COMBINATIONS for d in DISTANCES
                                                   if d in SEPARABLE or c == "box"])
def test_gradcheck(combination, distance):
    a, lo, hi, t = make_data(21, n=3, m=5)
    a, lo, hi, t = (x.clone().requires_grad_(True) for x in (a, lo, hi, t))

    def fn(a_, lo_, hi_, t_):
        return cc_dist_distance(a_, lo_, hi_, t_, 0.37, combination=combination, distance=distance)

    assert torch.autograd.gradcheck(fn, (a, lo, hi, t), eps=1e-6, atol=1e-6)


def test_gradient_flows_at_endpoints():
    a, lo, hi, t = make_data(22)
    a, lo, hi = (x.clone().requires_grad_(True) for x in (a, lo, hi))
    cc_dist_distance(a, lo, hi, t, 1.0).sum().backward()
    assert a.grad is None
    assert (hi.grad.abs() + lo.grad.abs() > 0).all()  # one endpoint per coordinate (no ties)
    assert ((hi.grad != 0) ^ (lo.grad != 0)).all()


# --------------------------------------------------------------------------- MTL / Exp


def test_mtl_against_hand_computation():
    a, lo, hi, t = make_data(31, inside=False)
    d0 = ((a - t) ** 2).sum(-1)
    d1 = closed_form_worst(lo, hi, t).sum(-1)
    for al in (0.0, 0.25, 0.9, 1.0):
        torch.testing.assert_close(mtl_dist_distance(a, lo, hi, t, al), al * d1 + (1 - al) * d0, rtol=1e-12, atol=0.0)
    assert torch.equal(mtl_dist_distance(a, lo, hi, t, 0.0), d0)
    # tiny hand example: m=1, l=0, u=10, t=3, a=2 -> D0=1, D1=49
    x = lambda v: torch.tensor([[v]])  # noqa: E731
    assert mtl_dist_distance(x(2.0), x(0.0), x(10.0), x(3.0), 0.25).item() == pytest.approx(0.25 * 49 + 0.75)
    assert mtl_dist_distance(x(2.0), x(0.0), x(10.0), x(3.0), 0.5, distance="l1").item() == pytest.approx(4.0)


def test_exp_against_hand_computation():
    a, lo, hi, t = make_data(32, inside=False)
    d0 = ((a - t) ** 2).sum(-1).mean()
    d1 = closed_form_worst(lo, hi, t).sum(-1).mean()
    for al in (0.25, 0.6):
        out = exp_dist_distance(a, lo, hi, t, al)
        assert out.shape == ()
        torch.testing.assert_close(out, d1**al * d0 ** (1 - al), rtol=1e-12, atol=0.0)
    torch.testing.assert_close(exp_dist_distance(a, lo, hi, t, 0.0), d0, rtol=1e-12, atol=0.0)
    torch.testing.assert_close(exp_dist_distance(a, lo, hi, t, 1.0), d1, rtol=1e-12, atol=0.0)
    # batch means, not a per-sample geometric mean: two samples D0=(1, 9), D1=(4, 16)
    a2 = torch.tensor([[1.0], [3.0]])
    t2 = torch.zeros(2, 1)
    lo2 = torch.tensor([[-2.0], [-4.0]])
    hi2 = torch.tensor([[1.0], [0.0]])
    val = exp_dist_distance(a2, lo2, hi2, t2, 0.5).item()
    assert val == pytest.approx((10.0 * 5.0) ** 0.5)
    assert val != pytest.approx(((4 * 1) ** 0.5 + (16 * 9) ** 0.5) / 2)


# --------------------------------------------------------------------------- projection


def test_project_to_box():
    lo = torch.tensor([[0.0, -1.0, 2.0]])
    hi = torch.tensor([[1.0, 1.0, 3.0]])
    p = torch.tensor([[-0.5, 0.25, 5.0]], requires_grad=True)
    out = project_to_box(p, lo, hi)
    assert torch.equal(out, torch.tensor([[0.0, 0.25, 3.0]]))
    out.sum().backward()
    assert torch.equal(p.grad, torch.tensor([[0.0, 1.0, 0.0]]))
    # projection puts a into the box, after which the monotone properties hold
    a, lo2, hi2, t = make_data(41, inside=False)
    a_proj = project_to_box(a, lo2, hi2)
    assert bool(((a_proj >= lo2) & (a_proj <= hi2)).all())
    vals = [cc_dist_distance(a_proj, lo2, hi2, t, al) for al in (0.0, 0.5, 1.0)]
    assert bool(((vals[0] <= vals[1]) & (vals[1] <= vals[2])).all())


# --------------------------------------------------------------------------- logit KD


def test_logit_kd_zero_positive_and_manual():
    g = torch.Generator().manual_seed(5)
    s = torch.randn(6, 10, generator=g, dtype=torch.float64)
    te = torch.randn(6, 10, generator=g, dtype=torch.float64)
    assert logit_distillation_loss(s, s.clone()).item() == 0.0
    # invariant to a per-sample shift of the logits
    assert logit_distillation_loss(s, s + 3.0).item() == pytest.approx(0.0, abs=1e-12)
    loss = logit_distillation_loss(s, te, temperature=4.0)
    assert loss.shape == () and loss.item() > 0
    tau = 4.0
    p_t = torch.softmax(te / tau, -1)
    manual = (p_t * (p_t.log() - torch.log_softmax(s / tau, -1))).sum(-1).mean() * tau**2
    torch.testing.assert_close(loss, manual, rtol=1e-10, atol=0.0)
    loss1 = logit_distillation_loss(s, te, temperature=1.0)
    p1 = torch.softmax(te, -1)
    torch.testing.assert_close(loss1, (p1 * (p1.log() - torch.log_softmax(s, -1))).sum(-1).mean(), rtol=1e-10, atol=0.0)


# --------------------------------------------------------------------------- validation


def test_bad_alpha_raises():
    a, lo, hi, t = make_data(51)
    for bad in (-0.1, 1.5, float("nan")):
        for fn in (cc_dist_distance, mtl_dist_distance, exp_dist_distance):
            with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
                fn(a, lo, hi, t, bad)
    with pytest.raises(ValueError, match="alpha must be a scalar"):
        cc_dist_distance(a, lo, hi, t, torch.tensor([0.1, 0.2]))
    # a one-element tensor is accepted
    torch.testing.assert_close(
        cc_dist_distance(a, lo, hi, t, torch.tensor(0.3)), cc_dist_distance(a, lo, hi, t, 0.3)
    )


def test_bad_names_raise():
    a, lo, hi, t = make_data(52)
    with pytest.raises(ValueError, match="unknown distance 'l3'; expected one of l2sq, l1, l2"):
        cc_dist_distance(a, lo, hi, t, 0.5, distance="l3")
    with pytest.raises(ValueError, match="unknown reduction 'max'; expected one of sum, mean"):
        feature_distance(a, t, reduction="max")
    with pytest.raises(ValueError, match="unknown combination 'cc'; expected one of literal, box, distance"):
        cc_dist_distance(a, lo, hi, t, 0.5, combination="cc")
    with pytest.raises(ValueError, match="unknown distance"):
        worst_case_feature_distance(lo, hi, t, distance="cos")
    with pytest.raises(ValueError, match="temperature must be positive"):
        logit_distillation_loss(a, t, temperature=0.0)


def test_shape_mismatch_message():
    a = torch.zeros(4, 100)
    lo, hi = torch.zeros(4, 100), torch.ones(4, 100)
    t = torch.zeros(4, 512)
    msg = (
        "student features have 100 dimensions but teacher features have 512; "
        "use --feature-adapter linear or a teacher with matching features"
    )
    for fn in (cc_dist_distance, mtl_dist_distance, exp_dist_distance):
        with pytest.raises(ValueError) as info:
            fn(a, lo, hi, t, 0.5)
        assert str(info.value) == msg
        assert isinstance(info.value, CertkdError)
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="student features have 100 dimensions but teacher features have 512"):
        feature_distance(a, t)
    with pytest.raises(ValueError, match="100 dimensions but teacher features have 512"):
        worst_case_feature_distance(lo, hi, t)
    with pytest.raises(ValueError, match="batch"):
        feature_distance(torch.zeros(3, 8), torch.zeros(4, 8))
    with pytest.raises(ValueError, match="feature box"):
        cc_dist_distance(torch.zeros(4, 8), torch.zeros(4, 7), torch.ones(4, 7), torch.zeros(4, 8), 0.5)
    with pytest.raises(ValueError, match="logits"):
        logit_distillation_loss(torch.zeros(2, 10), torch.zeros(2, 100))


def test_constants():
    assert DISTANCES == ("l2sq", "l1", "l2", "cosine")
    assert REDUCTIONS == ("sum", "mean")
    assert COMBINATIONS == ("literal", "box", "distance")


@pytest.mark.parametrize("combination", COMBINATIONS)
def test_endpoints_robust_to_infinite_bounds(combination):
    """alpha=0 must not touch the box (no 0 * inf = NaN) when IBP bounds overflow."""
    a, lo, hi, t = make_data(61, dtype=torch.float32)
    hi = hi.clone()
    hi[0, 3] = float("inf")
    d0 = cc_dist_distance(a, lo, hi, t, 0.0, combination=combination)
    assert torch.equal(d0, ((a - t) ** 2).sum(-1))
    assert torch.equal(mtl_dist_distance(a, lo, hi, t, 0.0), d0)
    assert torch.equal(exp_dist_distance(a, lo, hi, t, 0.0), d0.mean())
    d1 = cc_dist_distance(a, lo, hi, t, 1.0, combination=combination)
    assert torch.isinf(d1[0]) and torch.isfinite(d1[1:]).all()
