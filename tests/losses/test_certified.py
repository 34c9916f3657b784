"""Tests for certkd.losses.certified (docs/method.md §1, §5)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from certkd.bounds.spec import logit_differences
from certkd.losses.certified import (adversarial_loss, cc_ibp_loss, difference_loss, exp_ibp_loss, ibp_loss,
                                     l1_penalty, mtl_ibp_loss, sabr_box, trades_kl)


def _ce_of_differences(d: torch.Tensor) -> torch.Tensor:
    """Independent ℒ(d): CE of logits (0, −d) with label 0 (docs/method.md §1)."""
    logits = torch.cat([torch.zeros_like(d[:, :1]), -d], dim=1)
    return F.cross_entropy(logits, torch.zeros(d.shape[0], dtype=torch.long), reduction="none")


def _data(k=10, n=32, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    z_adv = torch.randn(n, k, generator=g, dtype=dtype) * 3
    y = torch.randint(0, k, (n,), generator=g)
    d_adv = logit_differences(z_adv, y)
    lb = d_adv - torch.rand(n, k - 1, generator=g, dtype=dtype) * 4  # lower bounds below the point
    return z_adv, y, d_adv, lb


# --------------------------------------------------------------------------- ℒ(d)

@pytest.mark.parametrize("k", [2, 10])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_difference_loss_of_logit_differences_is_cross_entropy(k, dtype):
    g = torch.Generator().manual_seed(k)
    z = torch.randn(64, k, generator=g, dtype=dtype) * 5
    y = torch.randint(0, k, (64,), generator=g)
    got = difference_loss(logit_differences(z, y))
    ce = F.cross_entropy(z, y, reduction="none")
    assert got.shape == (64,)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(got, ce, rtol=tol, atol=tol)


def test_difference_loss_hand_values():
    d = torch.tensor([[0.0, 0.0], [math.log(2.0), -math.log(3.0)]], dtype=torch.float64)
    # log(1 + 1 + 1) and log(1 + 1/2 + 3)
    expected = torch.tensor([math.log(3.0), math.log(4.5)], dtype=torch.float64)
    torch.testing.assert_close(difference_loss(d), expected, rtol=0, atol=1e-12)


def test_difference_loss_is_stable_for_large_inputs():
    d = torch.tensor([[1000.0, 2000.0], [-1000.0, 5.0]])
    out = difference_loss(d)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, torch.tensor([0.0, 1000.0]))


def test_ibp_and_adversarial_losses_are_batch_means():
    _, _, d_adv, lb = _data()
    torch.testing.assert_close(ibp_loss(lb), _ce_of_differences(lb).mean())
    torch.testing.assert_close(adversarial_loss(d_adv), _ce_of_differences(d_adv).mean())
    assert ibp_loss(lb).dim() == 0


# --------------------------------------------------------------------------- CC-IBP

@pytest.mark.parametrize("k", [2, 10])
def test_cc_ibp_alpha_zero_is_adversarial_cross_entropy(k):
    z_adv, y, d_adv, lb = _data(k=k)
    got = cc_ibp_loss(lb, d_adv, 0.0)
    assert torch.equal(got, adversarial_loss(d_adv))
    torch.testing.assert_close(got, F.cross_entropy(z_adv, y), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("k", [2, 10])
def test_cc_ibp_alpha_one_is_ibp_loss(k):
    _, _, d_adv, lb = _data(k=k)
    assert torch.equal(cc_ibp_loss(lb, d_adv, 1.0), ibp_loss(lb))


@pytest.mark.parametrize("alpha", [0.01, 0.3, 0.75])
def test_cc_ibp_combines_differences_before_the_loss(alpha):
    _, _, d_adv, lb = _data(n=8)
    got = cc_ibp_loss(lb, d_adv, alpha)
    expected = _ce_of_differences(alpha * lb + (1 - alpha) * d_adv).mean()
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    # by convexity of ℒ, the per-difference combination is below the loss-space combination (MTL)
    assert got < mtl_ibp_loss(lb, d_adv, alpha)


def test_cc_ibp_between_endpoints_on_constructed_example():
    d_adv = torch.tensor([[2.0]])
    lb = torch.tensor([[-2.0]])
    # d_0.5 = 0 -> log 2
    torch.testing.assert_close(cc_ibp_loss(lb, d_adv, 0.5), torch.tensor(math.log(2.0)))


# --------------------------------------------------------------------------- MTL / Exp

@pytest.mark.parametrize("alpha", [0.0, 0.004, 0.5, 1.0])
def test_mtl_ibp_is_convex_combination_of_batch_means(alpha):
    _, _, d_adv, lb = _data()
    expected = alpha * _ce_of_differences(lb).mean() + (1 - alpha) * _ce_of_differences(d_adv).mean()
    torch.testing.assert_close(mtl_ibp_loss(lb, d_adv, alpha), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("alpha", [0.0, 0.095, 0.5, 1.0])
def test_exp_ibp_is_product_of_powers_of_batch_means(alpha):
    _, _, d_adv, lb = _data()
    l_ibp, l_adv = _ce_of_differences(lb).mean(), _ce_of_differences(d_adv).mean()
    expected = l_ibp ** alpha * l_adv ** (1 - alpha)
    torch.testing.assert_close(exp_ibp_loss(lb, d_adv, alpha), expected, rtol=1e-6, atol=1e-6)


def test_exp_ibp_is_not_a_per_sample_geometric_mean():
    # K = 2; per-sample losses log(1 + exp(-d)).
    # sample 0: IBP loss log(1+e^4) (≈4.018), adv loss log(1+e^-4) (≈0.018)
    # sample 1: IBP loss log(1+e^-4), adv loss log(1+e^4)
    lb = torch.tensor([[-4.0], [4.0]], dtype=torch.float64)
    d_adv = torch.tensor([[4.0], [-4.0]], dtype=torch.float64)
    big, small = math.log1p(math.exp(4.0)), math.log1p(math.exp(-4.0))
    alpha = 0.5
    batch_means = ((big + small) / 2) ** alpha * ((small + big) / 2) ** (1 - alpha)  # = (big+small)/2
    per_sample = (big ** alpha * small ** (1 - alpha) + small ** alpha * big ** (1 - alpha)) / 2  # = sqrt(big*small)
    got = exp_ibp_loss(lb, d_adv, alpha).item()
    assert got == pytest.approx(batch_means, rel=1e-12)
    assert got == pytest.approx((big + small) / 2, rel=1e-12)
    assert abs(got - per_sample) > 1.0  # ≈2.018 vs ≈0.27


@pytest.mark.parametrize("fn", [cc_ibp_loss, mtl_ibp_loss, exp_ibp_loss])
@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan")])
def test_alpha_outside_unit_interval_raises(fn, alpha):
    _, _, d_adv, lb = _data(n=2)
    with pytest.raises(ValueError, match="alpha"):
        fn(lb, d_adv, alpha)


@pytest.mark.parametrize("fn", [cc_ibp_loss, mtl_ibp_loss, exp_ibp_loss])
def test_all_expressive_losses_agree_when_bounds_equal_adversarial(fn):
    _, _, d_adv, _ = _data()
    torch.testing.assert_close(fn(d_adv, d_adv, 0.37), adversarial_loss(d_adv), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- SABR (docs/method.md §5.5)

def _sabr_case(seed=0, n=6, shape=(1, 5, 5), eps=0.1):
    """Pixel inputs spread over [0, 1] (so many coordinates are clipped), box clipped to [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, *shape, generator=g)
    x[0].fill_(0.02)   # clipped at 0
    x[1].fill_(0.97)   # clipped at 1
    lo, hi = (x - eps).clamp(min=0.0), (x + eps).clamp(max=1.0)
    x_adv = lo + (hi - lo) * torch.rand(x.shape, generator=g)
    return x, lo, hi, x_adv, eps


def _release_sabr_box(x_adv, lo, hi, lam, eps):
    """The code release's small box (docs/method.md §5.5): c = clamp(x_adv, x̲+ρ, x̄−ρ); box
    [max(c−ρ, x_min), min(c+ρ, x_max)], clipped to the image range only."""
    rho = lam * eps
    c = torch.minimum(torch.maximum(x_adv, lo + rho), hi - rho)  # torch.clamp semantics when min > max
    return (c - rho).clamp(min=0.0), (c + rho).clamp(max=1.0)


@pytest.mark.parametrize("lam", [0.0, 0.03, 0.3, 0.6, 1.0])
def test_sabr_box_inside_large_box_and_small(lam):
    _, lo, hi, x_adv, eps = _sabr_case()
    s_lo, s_hi = sabr_box(x_adv, lo, hi, lam, eps)
    assert (s_lo >= lo).all() and (s_hi <= hi).all()
    assert (s_lo <= s_hi).all()
    assert ((s_hi - s_lo) / 2 <= lam * eps + 1e-7).all()
    # contains the adversarial point
    assert (s_lo <= x_adv).all() and (x_adv <= s_hi).all()


@pytest.mark.parametrize("lam", [0.03, 0.3, 0.6])
def test_sabr_box_has_full_width_where_large_box_allows(lam):
    _, lo, hi, x_adv, eps = _sabr_case()
    s_lo, s_hi = sabr_box(x_adv, lo, hi, lam, eps)
    wide = (hi - lo) >= 2 * lam * eps
    assert wide.any()
    torch.testing.assert_close((s_hi - s_lo)[wide], torch.full_like(s_hi[wide], 2 * lam * eps), rtol=0, atol=1e-6)


def test_sabr_box_contains_projection_of_outside_point():
    _, lo, hi, _, eps = _sabr_case()
    g = torch.Generator().manual_seed(5)
    far = torch.rand(lo.shape, generator=g) * 3 - 1  # mostly outside [lo, hi]
    s_lo, s_hi = sabr_box(far, lo, hi, 0.2, eps)
    proj = torch.minimum(torch.maximum(far, lo), hi)
    assert (s_lo <= proj + 1e-7).all() and (proj <= s_hi + 1e-7).all()
    assert (s_lo >= lo).all() and (s_hi <= hi).all()


def test_sabr_box_lambda_zero_is_the_point():
    _, lo, hi, x_adv, eps = _sabr_case()
    s_lo, s_hi = sabr_box(x_adv, lo, hi, 0.0, eps)
    assert torch.equal(s_lo, x_adv) and torch.equal(s_hi, x_adv)


@pytest.mark.parametrize("lam", [1.0, 1.5])
def test_sabr_box_is_full_box_when_radius_covers_it(lam):
    _, lo, hi, x_adv, eps = _sabr_case()
    s_lo, s_hi = sabr_box(x_adv, lo, hi, lam, eps)
    # (hi − ρ) + ρ may differ from hi by one float32 ulp
    torch.testing.assert_close(s_lo, lo, rtol=0, atol=1e-6)
    torch.testing.assert_close(s_hi, hi, rtol=0, atol=1e-6)


def test_sabr_box_full_box_per_coordinate_where_half_width_is_small():
    _, lo, hi, x_adv, eps = _sabr_case()
    lam = 0.7
    s_lo, s_hi = sabr_box(x_adv, lo, hi, lam, eps)
    narrow = (hi - lo) / 2 <= lam * eps
    assert narrow.any() and (~narrow).any()
    torch.testing.assert_close(s_lo[narrow], lo[narrow], rtol=0, atol=1e-6)
    torch.testing.assert_close(s_hi[narrow], hi[narrow], rtol=0, atol=1e-6)


def test_sabr_box_exact_values_unclipped():
    x = torch.tensor([0.5, 0.5, 0.5, 0.5], dtype=torch.float64)
    eps, lam = 0.1, 0.25  # ρ = 0.025, large box [0.4, 0.6]
    lo, hi = x - eps, x + eps
    x_adv = torch.tensor([0.4, 0.41, 0.5, 0.6], dtype=torch.float64)
    s_lo, s_hi = sabr_box(x_adv, lo, hi, lam, eps)
    torch.testing.assert_close(s_lo, torch.tensor([0.4, 0.4, 0.475, 0.55], dtype=torch.float64))
    torch.testing.assert_close(s_hi, torch.tensor([0.45, 0.45, 0.525, 0.6], dtype=torch.float64))


@pytest.mark.parametrize("lam", [0.03, 0.3, 0.6, 1.0])
def test_sabr_box_is_release_box_intersected_with_large_box(lam):
    """The code release clips the small box to the image domain [x_min, x_max]; certkd clips it to
    the large box (docs/method.md §5.5). The two agree except on coordinates where the large box is
    clipped at the top (x̄ = x_max) and λ·ε exceeds its half-width: there the release's box reaches
    below x̲."""
    _, lo, hi, x_adv, eps = _sabr_case()
    spec_lo, spec_hi = _release_sabr_box(x_adv, lo, hi, lam, eps)
    s_lo, s_hi = sabr_box(x_adv, lo, hi, lam, eps)
    torch.testing.assert_close(s_lo, torch.maximum(spec_lo, lo), rtol=0, atol=1e-7)
    torch.testing.assert_close(s_hi, torch.minimum(spec_hi, hi), rtol=0, atol=1e-7)
    inside = (spec_lo >= lo) & (spec_hi <= hi)
    torch.testing.assert_close(s_lo[inside], spec_lo[inside], rtol=0, atol=1e-7)
    torch.testing.assert_close(s_hi[inside], spec_hi[inside], rtol=0, atol=1e-7)


# --------------------------------------------------------------------------- TRADES, L1

def test_trades_kl_zero_for_equal_logits():
    z = torch.randn(5, 10, generator=torch.Generator().manual_seed(0)) * 4
    out = trades_kl(z, z.clone())
    assert out.shape == (5,)
    torch.testing.assert_close(out, torch.zeros(5), rtol=0, atol=1e-6)


def test_trades_kl_hand_value_and_direction():
    clean = torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64)  # p = (1/4, 3/4)
    adv = torch.tensor([[0.0, 0.0]], dtype=torch.float64)              # q = (1/2, 1/2)
    kl_p_q = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    kl_q_p = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert abs(kl_p_q - kl_q_p) > 1e-3
    assert trades_kl(adv, clean).item() == pytest.approx(kl_p_q, rel=1e-12)  # KL(clean ‖ adv)
    assert trades_kl(adv, clean).item() > 0


def test_trades_kl_invariant_to_logit_shift():
    g = torch.Generator().manual_seed(1)
    a, c = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    torch.testing.assert_close(trades_kl(a + 7.0, c - 3.0), trades_kl(a, c), rtol=1e-5, atol=1e-5)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 2)
        self.bn2 = nn.BatchNorm2d(2)
        self.fc = nn.Linear(8, 3)
        self.bn1 = nn.BatchNorm1d(3)
        self.head = nn.Linear(3, 2, bias=False)


def test_l1_penalty_counts_conv_and_linear_weights_only():
    net = _Net()
    with torch.no_grad():
        net.conv.weight.fill_(-0.5)   # 8 entries -> 4
        net.conv.bias.fill_(100.0)
        net.fc.weight.fill_(0.25)     # 24 entries -> 6
        net.fc.bias.fill_(-100.0)
        net.head.weight.copy_(torch.tensor([[1.0, -2.0, 3.0], [0.0, 0.0, -4.0]]))  # 10
        for bn in (net.bn1, net.bn2):
            bn.weight.fill_(50.0)
            bn.bias.fill_(-50.0)
    out = l1_penalty(net)
    assert out.dim() == 0
    assert out.item() == pytest.approx(20.0, abs=1e-6)


def test_l1_penalty_gradient_is_sign_of_weights():
    net = _Net()
    l1_penalty(net).backward()
    assert torch.equal(net.fc.weight.grad, net.fc.weight.detach().sign())
    assert net.fc.bias.grad is None and net.bn1.weight.grad is None
