"""Tests for certkd.attacks.pgd (docs/method.md §2.3)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from certkd.attacks import PGD, eval_mode, linf_box, margin_loss
from certkd.models import create_model


def _relu_net(seed=0, bn=True):
    torch.manual_seed(seed)
    layers = [nn.Flatten(), nn.Linear(12, 32)]
    if bn:
        layers.append(nn.BatchNorm1d(32))
    layers += [nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)]
    net = nn.Sequential(*layers)
    with torch.no_grad():  # sharper landscape, so large steps can overshoot
        for m in net:
            if isinstance(m, nn.Linear):
                m.weight.mul_(3.0)
        if bn:
            net[2].running_mean.uniform_(-0.5, 0.5)
            net[2].running_var.uniform_(0.5, 2.0)
    return net


def _data(n=16, seed=0, shape=(3, 2, 2)):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, *shape, generator=g)
    x[0].fill_(0.0)
    x[1].fill_(1.0)
    x[2].fill_(0.03)
    x[3].fill_(0.99)
    y = torch.randint(0, 4, (n,), generator=g)
    return x, y


def _start(x, lo, hi, seed):
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(seed))
    return lo + (hi - lo) * u


def _ce(model, x, y):
    with torch.no_grad(), eval_mode(model):
        return F.cross_entropy(model(x), y, reduction="none")


def _reference_pgd(model, y, lo, hi, start, steps, s):
    """docs/method.md §2.3 written out: score before each step (>= keeps later ties), score the final
    iterate when n > 1, return the last iterate without comparison when n = 1."""
    rho = (hi - lo) / 2
    x = start.clone()
    best, best_loss = x.clone(), torch.full(x.shape[:1], -float("inf"))
    model.eval()
    for _ in range(steps):
        x = x.detach().requires_grad_(True)
        loss = F.cross_entropy(model(x), y, reduction="none")
        keep = (loss.detach() >= best_loss).view(-1, *[1] * (x.dim() - 1))
        best = torch.where(keep, x.detach(), best)
        best_loss = torch.maximum(loss.detach(), best_loss)
        (g,) = torch.autograd.grad(loss.sum(), x)
        x = torch.max(torch.min(x.detach() + s * rho * g.sign(), hi), lo)
    if steps == 1:
        return x
    with torch.no_grad():
        loss = F.cross_entropy(model(x), y, reduction="none")
    keep = (loss >= best_loss).view(-1, *[1] * (x.dim() - 1))
    return torch.where(keep, x, best)


# --------------------------------------------------------------------------- boxes and losses

def test_linf_box_exact_and_clipped():
    x = torch.tensor([0.0, 0.05, 0.5, 0.97, 1.0])
    lo, hi = linf_box(x, 0.1)
    torch.testing.assert_close(lo, torch.tensor([0.0, 0.0, 0.4, 0.87, 0.9]))
    torch.testing.assert_close(hi, torch.tensor([0.1, 0.15, 0.6, 1.0, 1.0]))
    lo, hi = linf_box(x, 0.2, low=0.1, high=0.8)
    torch.testing.assert_close(lo, torch.tensor([0.1, 0.1, 0.3, 0.77, 0.8]))
    torch.testing.assert_close(hi, torch.tensor([0.2, 0.25, 0.7, 0.8, 0.8]))


def test_margin_loss_sign():
    logits = torch.tensor([[3.0, 1.0, 2.0], [3.0, 1.0, 2.0], [0.5, 0.5, 0.0]])
    y = torch.tensor([0, 1, 0])
    out = margin_loss(logits, y)
    torch.testing.assert_close(out, torch.tensor([-1.0, 2.0, 0.0]))
    # positive exactly when misclassified (ties aside)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(200, 10, generator=g)
    t = torch.randint(0, 10, (200,), generator=g)
    assert torch.equal(margin_loss(z, t) > 0, z.argmax(1) != t)


def test_invalid_arguments():
    with pytest.raises(ValueError):
        PGD(steps=-1)
    with pytest.raises(ValueError):
        PGD(restarts=0)


# --------------------------------------------------------------------------- box containment

@pytest.mark.parametrize("steps, step_size, restarts, stop", [
    (0, 0.1, 1, False), (1, 10.0, 1, False), (5, 0.25, 1, False), (4, 3.0, 3, False), (6, 0.5, 2, True)])
def test_output_stays_in_box(steps, step_size, restarts, stop):
    model = _relu_net()
    x, y = _data()
    for eps in (0.01, 0.3):
        lo, hi = linf_box(x, eps)
        attack = PGD(steps=steps, step_size=step_size, restarts=restarts, stop_on_success=stop)
        xa = attack(model, x, y, lo, hi, generator=torch.Generator().manual_seed(1))
        assert xa.shape == x.shape
        assert (xa >= lo).all() and (xa <= hi).all()
        assert (xa >= 0).all() and (xa <= 1).all()
        assert not xa.requires_grad


def test_steps_zero_returns_start_or_center():
    model = _relu_net()
    x, y = _data()
    lo, hi = linf_box(x, 0.1)
    xa = PGD(steps=0, random_start=False)(model, x, y, lo, hi)
    assert torch.equal(xa, (lo + hi) / 2)
    xa = PGD(steps=0)(model, x, y, lo, hi, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(xa, _start(x, lo, hi, 7), rtol=0, atol=0)


def test_one_big_step_reaches_a_corner_from_random_start():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 4))
    with torch.no_grad():
        model[1].weight[:, 5] = 0.0  # coordinate 5 gets an exactly-zero gradient
    x, y = _data()
    lo, hi = linf_box(x, 0.05)
    xa = PGD(steps=1, step_size=10.0)(model, x, y, lo, hi, generator=torch.Generator().manual_seed(3))
    start = _start(x, lo, hi, 3).requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(start), y, reduction="sum"), start)
    nz = g != 0
    assert nz.float().mean() > 0.9
    at_corner = (xa == lo) | (xa == hi)
    assert at_corner[nz].all()
    # and the corner is the one the gradient points to
    assert torch.equal(xa[nz & (g > 0)], hi[nz & (g > 0)])
    assert torch.equal(xa[nz & (g < 0)], lo[nz & (g < 0)])
    # coordinates without gradient stay at the random start
    flat_xa, flat_start = xa.flatten(1), start.detach().flatten(1)
    assert torch.equal(flat_xa[:, 5], flat_start[:, 5])
    assert not at_corner.flatten(1)[4:, 5].any()  # (rows 0-3 have degenerate boxes at 0/1 on one side)


def test_step_is_relative_to_clipped_half_width():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[0.0, 0.0, 0.0], [1.0, -1.0, 1.0]]))
        model[1].bias.zero_()
    x = torch.tensor([[0.02, 0.5, 0.99]])
    y = torch.tensor([0])  # CE grows with logit 1: gradient sign (+, −, +)
    lo, hi = linf_box(x, 0.1)  # [0, 0.12], [0.4, 0.6], [0.89, 1]
    xa = PGD(steps=1, step_size=0.5, random_start=False)(model, x, y, lo, hi)
    c, rho = (lo + hi) / 2, (hi - lo) / 2
    expected = c + 0.5 * rho * torch.tensor([[1.0, -1.0, 1.0]])
    torch.testing.assert_close(xa, expected, rtol=0, atol=1e-7)
    torch.testing.assert_close(xa, torch.tensor([[0.09, 0.45, 0.9725]]), rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- best iterate

@pytest.mark.parametrize("steps, s", [(1, 10.0), (1, 2.0), (2, 2.0), (5, 1.5), (8, 0.25)])
def test_matches_reference_iteration(steps, s):
    model = _relu_net(seed=2)
    x, y = _data(n=32, seed=2)
    lo, hi = linf_box(x, 0.2)
    xa = PGD(steps=steps, step_size=s)(model, x, y, lo, hi, generator=torch.Generator().manual_seed(4))
    ref = _reference_pgd(model, y, lo, hi, _start(x, lo, hi, 4), steps, s)
    torch.testing.assert_close(xa, ref, rtol=0, atol=0)


class _Bump(nn.Module):
    """Two classes; logit_1 = −4(Σx − 1.9)², so CE(y=0) peaks at Σx = 1.9 and a full step
    to a corner of the box around x = 0.5 (Σx ∈ [1.6, 2.4]) overshoots the peak."""

    def forward(self, x):
        s = x.flatten(1).sum(1)
        return torch.stack([torch.zeros_like(s), -4.0 * (s - 1.9) ** 2], dim=1)


def _bump_data(n=64):
    x = torch.full((n, 1, 2, 2), 0.5)
    return x, torch.zeros(n, dtype=torch.long), *linf_box(x, 0.1)


@pytest.mark.parametrize("steps", [2, 3, 6])
def test_best_iterate_not_worse_than_random_start(steps):
    model = _Bump()
    x, y, lo, hi = _bump_data()
    xa = PGD(steps=steps, step_size=10.0)(model, x, y, lo, hi, generator=torch.Generator().manual_seed(9))
    start = _start(x, lo, hi, 9)
    l_adv, l_start = _ce(model, xa, y), _ce(model, start, y)
    assert (l_adv >= l_start).all()
    # every iterate after the start sits on a corner (Σx = 1.6 or 2.4), worse than most starts:
    # the start must have been kept for those samples
    kept = torch.isclose(xa, start).flatten(1).all(1)
    assert kept.float().mean() > 0.5


def test_single_step_is_returned_without_comparison():
    # docs/method.md §2.3: with n = 1 the stepped point is returned even when its loss is below the start's
    model = _Bump()
    x, y, lo, hi = _bump_data()
    start = _start(x, lo, hi, 9)
    one = PGD(steps=1, step_size=10.0)(model, x, y, lo, hi, generator=torch.Generator().manual_seed(9))
    assert ((one == lo) | (one == hi)).all()
    worse = _ce(model, one, y) < _ce(model, start, y)
    assert worse.float().mean() > 0.5


def test_restarts_never_lower_loss_than_first_start():
    model = _relu_net(seed=3)
    x, y = _data(n=32, seed=3)
    lo, hi = linf_box(x, 0.3)
    single = PGD(steps=2, step_size=0.1)(model, x, y, lo, hi, generator=torch.Generator().manual_seed(5))
    multi = PGD(steps=2, step_size=0.1, restarts=4)(model, x, y, lo, hi, generator=torch.Generator().manual_seed(5))
    l1, l4 = _ce(model, single, y), _ce(model, multi, y)
    assert (l4 >= l1).all()
    assert (l4 > l1).any()  # the extra starts do help somewhere


def test_restarts_with_single_step_are_scored():
    model = _relu_net(seed=3)
    x, y = _data(n=32, seed=3)
    lo, hi = linf_box(x, 0.3)
    single = PGD(steps=1, step_size=0.5)(model, x, y, lo, hi, generator=torch.Generator().manual_seed(5))
    multi = PGD(steps=1, step_size=0.5, restarts=3)(model, x, y, lo, hi, generator=torch.Generator().manual_seed(5))
    assert (_ce(model, multi, y) >= _ce(model, single, y)).all()


# --------------------------------------------------------------------------- model state

def test_mode_restored_and_no_parameter_gradients():
    model = _relu_net()
    model.train()
    bn_before = copy.deepcopy(model[2].state_dict())
    seen = []
    model[2].register_forward_hook(lambda m, i, o: seen.append(m.training))
    x, y = _data()
    lo, hi = linf_box(x, 0.1)
    PGD(steps=3, step_size=0.5)(model, x, y, lo, hi)
    assert model.training and all(m.training for m in model.modules())
    assert seen and not any(seen)  # the attack ran in eval mode
    for p in model.parameters():
        assert p.grad is None
    for k, v in model[2].state_dict().items():  # running statistics untouched
        assert torch.equal(v, bn_before[k]), k


def test_eval_mode_stays_eval_and_eval_model_false_keeps_train():
    model = _relu_net()
    model.eval()
    x, y = _data()
    lo, hi = linf_box(x, 0.1)
    PGD(steps=2)(model, x, y, lo, hi)
    assert not model.training
    model.train()
    seen = []
    model[2].register_forward_hook(lambda m, i, o: seen.append(m.training))
    PGD(steps=2, eval_model=False)(model, x, y, lo, hi)
    assert seen and all(seen) and model.training


def test_restores_mode_on_error():
    model = _relu_net().train()
    x, y = _data()
    lo, hi = linf_box(x, 0.1)

    def bad_loss(logits, target):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        PGD(steps=2, loss_fn=bad_loss)(model, x, y, lo, hi)
    assert model.training


def test_works_under_no_grad_and_on_certifiable_net():
    model = create_model("cnn-small", 1, 8, 10)
    x = torch.rand(4, 1, 8, 8)
    y = torch.randint(0, 10, (4,))
    lo, hi = linf_box(x, 0.1)
    with torch.no_grad():
        xa = PGD(steps=3, step_size=0.5)(model, x, y, lo, hi, generator=torch.Generator().manual_seed(0))
    assert (xa >= lo).all() and (xa <= hi).all() and not torch.equal(xa, x)
    assert all(p.grad is None for p in model.parameters())


# --------------------------------------------------------------------------- stop on success

def _threshold_model(b0):
    """Two classes; logit_1 = Σx − b0, logit_0 = 0: misclassified (y=0) iff Σx > b0."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[0.0] * 4, [1.0] * 4]))
        model[1].bias.copy_(torch.tensor([0.0, -b0]))
    return model


def test_stop_on_success_finds_reachable_misclassification():
    model = _threshold_model(2.35)  # x = 0.5, ε = 0.1: Σx ∈ [1.6, 2.4], only near the top corner
    x = torch.full((8, 1, 2, 2), 0.5)
    y = torch.zeros(8, dtype=torch.long)
    lo, hi = linf_box(x, 0.1)
    xa = PGD(steps=5, step_size=0.5, stop_on_success=True)(model, x, y, lo, hi,
                                                          generator=torch.Generator().manual_seed(0))
    assert (model(xa).argmax(1) != y).all()


def test_stop_on_success_keeps_misclassified_point_over_higher_loss():
    # the loss rewards *lowering* Σx, but the centre (Σx = 2.0 > 1.9) is already misclassified
    model = _threshold_model(1.9)
    x = torch.full((3, 1, 2, 2), 0.5)
    y = torch.zeros(3, dtype=torch.long)
    lo, hi = linf_box(x, 0.1)
    loss_fn = lambda logits, t: -logits[:, 1]  # noqa: E731
    plain = PGD(steps=3, step_size=1.0, random_start=False, loss_fn=loss_fn)(model, x, y, lo, hi)
    torch.testing.assert_close(plain, lo)  # highest loss at the lower corner, correctly classified
    assert (model(plain).argmax(1) == y).all()
    stop = PGD(steps=3, step_size=1.0, random_start=False, loss_fn=loss_fn, stop_on_success=True)(
        model, x, y, lo, hi)
    assert (model(stop).argmax(1) != y).all()
    torch.testing.assert_close(stop, (lo + hi) / 2)
