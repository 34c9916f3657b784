"""Exact MILP verification (certkd.verification.milp): exactness, soundness, timeout, encoding.

References used here are independent of the MILP encoding: dense grid search (2 inputs),
enumeration of ReLU activation patterns with one LP per pattern (no big-M, no binaries),
PGD attacks, float32 PyTorch forwards, and IBP.
"""
from __future__ import annotations

import copy
import itertools
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("highspy")
scipy_optimize = pytest.importorskip("scipy.optimize")

from certkd.attacks import PGD, linf_box, margin_loss  # noqa: E402
from certkd.bounds import ibp_logit_difference_bounds, interval_bounds  # noqa: E402
from certkd.models import CertifiableNet, ModelSpec, Normalize, create_model  # noqa: E402
from certkd.verification.milp import EmptyDomainError, MilpResult, milp_verify  # noqa: E402

D = torch.float64


def _margin(model, x, y):
    """float32 z_y − max_{j≠y} z_j of one point (C, H, W)."""
    with torch.no_grad():
        return float(-margin_loss(model(x.unsqueeze(0)), torch.tensor([y]))[0])


def _check_falsified(model, r: MilpResult, y, lo, hi):
    assert r.counterexample is not None and r.counterexample.shape == lo.shape
    assert r.counterexample.dtype == torch.float32
    assert bool(((r.counterexample >= lo) & (r.counterexample <= hi)).all()), "counterexample outside the box"
    m = _margin(model, r.counterexample, y)
    assert m <= 0, f"claimed counterexample is classified correctly (margin {m})"
    assert r.margin == pytest.approx(m, abs=1e-6) and r.margin <= 0


# --------------------------------------------------------------------------- exactness

def _grid_min(model64, lo, hi, y, n=401):
    """min over the 2-D box of z_y − max_{j≠y} z_j: dense grid, then four levels of local refinement
    (each 20× finer) around the best points. The grid only over-estimates the minimum, so a miss
    makes the exactness check fail, never pass."""
    def margins(pts):
        pts = torch.max(torch.min(pts, hi.view(1, 2)), lo.view(1, 2))
        return pts, -margin_loss(model64(pts.view(-1, 2, 1, 1)), torch.full((pts.shape[0],), y))

    with torch.no_grad():
        grid = torch.cartesian_prod(torch.linspace(float(lo[0]), float(hi[0]), n, dtype=D),
                                    torch.linspace(float(lo[1]), float(hi[1]), n, dtype=D))
        pts, m = margins(grid)
        best = float(m.min())
        cand = pts[torch.argsort(m)[:30]]
        step = (hi - lo) / (n - 1)
        offsets = torch.cartesian_prod(torch.linspace(-1, 1, 41, dtype=D), torch.linspace(-1, 1, 41, dtype=D))
        for _ in range(4):
            pts, m = margins((cand.unsqueeze(1) + offsets * step).reshape(-1, 2))
            best = min(best, float(m.min()))
            cand, step = pts[torch.argsort(m)[:10]], step / 20
    return best


def _toy_2d(seed):
    """2 → 8 → 8 → 3 MLP with N(0, 1) weights (PyTorch's default init is nearly constant on a 2-D box)."""
    torch.manual_seed(seed)
    model = create_model("mlp", 2, 1, 3, mean=(0.5,), std=(0.5,), hidden=(8, 8))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape) * (1.0 if p.dim() > 1 else 0.5))
    return model.eval()


def test_exact_margin_matches_grid_search_on_2d_toy():
    torch.manual_seed(0)
    verified = falsified = 0
    for seed in range(6):
        model = _toy_2d(seed)
        model64 = copy.deepcopy(model).double()
        for eps in (0.02, 0.1, 0.3):
            x = 0.3 + 0.4 * torch.rand(2, 1, 1)
            y = int(model(x.unsqueeze(0)).argmax())
            lo, hi = linf_box(x, eps)
            r = milp_verify(model, x, y, eps, early_stop=False, timeout=30)
            true_min = _grid_min(model64, lo.view(2).double(), hi.view(2).double(), y)
            if r.status == "verified":
                verified += 1
                assert r.margin == pytest.approx(true_min, abs=1e-4)
                assert r.margin <= true_min + 1e-6  # a lower bound, whatever the grid resolution
            else:
                assert r.status == "falsified", r.note
                falsified += 1
                _check_falsified(model, r, y, lo, hi)
                assert true_min <= 1e-6
                assert r.margin >= true_min - 1e-5
    assert verified >= 3 and falsified >= 1, (verified, falsified)


def _pattern_enumeration_min(model, lo, hi, y):
    """Exact min over the box of min_{j≠y} z_y − z_j for a 2-hidden-layer MLP: one LP per activation
    pattern of the neurons IBP leaves unstable (the others are fixed to their IBP state)."""
    w1, b1 = (t.detach().double().numpy() for t in (model.features[2].weight, model.features[2].bias))
    w2, b2 = (t.detach().double().numpy() for t in (model.features[4].weight, model.features[4].bias))
    w3, b3 = (t.detach().double().numpy() for t in (model.head.weight, model.head.bias))
    with torch.no_grad():
        ibp = interval_bounds(model.features, lo.unsqueeze(0), hi.unsqueeze(0))
    states = []
    for c, r in ibp.preactivations:
        lower, upper = (c - r)[0].numpy(), (c + r)[0].numpy()
        states.append([[1] if lo_ > 1e-6 else [0] if up < -1e-6 else [0, 1] for lo_, up in zip(lower, upper)])
    bounds = list(zip(lo.reshape(-1).double().numpy(), hi.reshape(-1).double().numpy()))
    best = np.inf
    n_lp = 0
    for p1 in itertools.product(*states[0]):
        d1 = np.diag(p1).astype(float)
        a2, c2 = w2 @ d1 @ w1, w2 @ d1 @ b1 + b2  # z2 = a2 x + c2
        for p2 in itertools.product(*states[1]):
            d2 = np.diag(p2).astype(float)
            s1, s2 = 1 - 2 * np.array(p1, float), 1 - 2 * np.array(p2, float)  # active: −z ≤ 0
            a_ub = np.vstack([s1[:, None] * w1, s2[:, None] * a2])
            b_ub = np.concatenate([-s1 * b1, -s2 * c2])
            zl, zc = w3 @ d2 @ a2, w3 @ d2 @ c2 + b3  # logits = zl x + zc
            for j in range(w3.shape[0]):
                if j == y:
                    continue
                res = scipy_optimize.linprog(zl[y] - zl[j], A_ub=a_ub, b_ub=b_ub, bounds=bounds, method="highs")
                n_lp += 1
                if res.status == 0:
                    best = min(best, res.fun + zc[y] - zc[j])
    return best, n_lp


def test_exact_margin_matches_activation_pattern_enumeration():
    checked = 0
    for seed in range(6):
        torch.manual_seed(100 + seed)
        model = create_model("mlp", 1, 4, 3, hidden=(8, 8)).eval()
        x = torch.rand(1, 4, 4)
        y = int(model(x.unsqueeze(0)).argmax())
        for eps in (0.02, 0.05, 0.1):
            lo, hi = linf_box(x, eps)
            with torch.no_grad():
                ibp = interval_bounds(model.features, lo.unsqueeze(0), hi.unsqueeze(0))
            unstable = sum(int(((c - r < 0) & (c + r > 0)).sum()) for c, r in ibp.preactivations)
            if unstable > 8 or unstable == 0:
                continue
            ref, _ = _pattern_enumeration_min(model, lo, hi, y)
            r = milp_verify(model, x, y, eps, early_stop=False, timeout=30)
            if r.status == "verified":
                assert r.margin == pytest.approx(ref, abs=1e-4)
            else:
                assert r.status == "falsified", r.note
                _check_falsified(model, r, y, lo, hi)
                assert ref <= 1e-6 and r.margin >= ref - 1e-5
            checked += 1
    assert checked >= 6


@pytest.mark.parametrize("tighten", ["lp", "none"])  # "none": the MILP (not the LP) proves more classes
def test_early_stop_margin_is_a_lower_bound_of_the_exact_one(tighten):
    torch.manual_seed(7)
    model = create_model("mlp", 1, 4, 3, hidden=(8, 8)).eval()
    for _ in range(4):
        x = torch.rand(1, 4, 4)
        y = int(model(x.unsqueeze(0)).argmax())
        for eps in (0.02, 0.1, 0.3):
            exact = milp_verify(model, x, y, eps, early_stop=False, tighten=tighten)
            fast = milp_verify(model, x, y, eps, tighten=tighten)
            assert fast.status == exact.status
            if exact.status == "verified":
                assert 1e-6 < fast.margin <= exact.margin + 1e-7


def test_bounds_choice_does_not_change_the_exact_margin():
    """Big-M constants only affect speed: IBP-only, LP-tightened and caller-supplied bounds give one optimum."""
    torch.manual_seed(3)
    model = create_model("mlp", 1, 4, 3, hidden=(8, 8)).eval()
    x = torch.rand(1, 4, 4)
    y = int(model(x.unsqueeze(0)).argmax())
    lo, hi = linf_box(x, 0.1)
    with torch.no_grad():
        ibp = interval_bounds(model.features, lo.unsqueeze(0), hi.unsqueeze(0))
    supplied = [(c - r, c + r) for c, r in ibp.preactivations]
    results = [milp_verify(model, x, y, 0.1, early_stop=False, tighten="none"),
               milp_verify(model, x, y, 0.1, early_stop=False, tighten="lp"),
               milp_verify(model, x, y, 0.1, early_stop=False, preactivation_bounds=supplied)]
    assert len({r.status for r in results}) == 1
    if results[0].status == "verified":
        assert max(r.margin for r in results) - min(r.margin for r in results) < 1e-6
    assert results[1].num_binaries <= results[0].num_binaries
    with pytest.raises(EmptyDomainError):  # bounds that exclude every reachable value cannot be valid
        milp_verify(model, x, y, 0.1, preactivation_bounds=[(u + 1, u + 2) for _, u in supplied])
    with pytest.raises(ValueError):
        milp_verify(model, x, y, 0.1, preactivation_bounds=supplied[:1])


def test_split_subdomains_recombine_to_the_full_minimum():
    """Bounds valid on a branch-and-bound split restrict the MILP to that split; the two halves of a
    split of an unstable neuron give back the minimum over the whole box."""
    checked = 0
    for seed in range(6):
        torch.manual_seed(200 + seed)
        model = create_model("mlp", 1, 4, 3, hidden=(8, 8)).eval()
        x = torch.rand(1, 4, 4)
        y = int(model(x.unsqueeze(0)).argmax())
        lo, hi = linf_box(x, 0.1)
        with torch.no_grad():
            ibp = interval_bounds(model.features, lo.unsqueeze(0), hi.unsqueeze(0))
        pre = [((c - r)[0], (c + r)[0]) for c, r in ibp.preactivations]
        unstable = torch.nonzero((pre[1][0] < 0) & (pre[1][1] > 0)).flatten()
        if unstable.numel() == 0:
            continue
        i = int(unstable[0])
        full = milp_verify(model, x, y, 0.1, early_stop=False)
        parts = []
        for side in ("active", "inactive"):
            l1, u1 = pre[1][0].clone(), pre[1][1].clone()
            if side == "active":
                l1[i] = 0.0
            else:
                u1[i] = 0.0
            try:
                parts.append(milp_verify(model, x, y, 0.1, early_stop=False, preactivation_bounds=[pre[0], (l1, u1)]))
            except EmptyDomainError:
                pass
        assert parts
        if full.status == "verified":
            assert all(p.status == "verified" for p in parts)
            assert min(p.margin for p in parts) == pytest.approx(full.margin, abs=1e-5)
        else:
            assert full.status == "falsified"
            assert any(p.status == "falsified" for p in parts)
            for p in parts:
                if p.status == "falsified":
                    _check_falsified(model, p, y, lo, hi)
        checked += 1
    assert checked >= 3


def test_jointly_infeasible_bounds_raise_empty_domain():
    model = create_model("mlp", 1, 2, 2, mean=(0.5,), hidden=(2, 2))
    with torch.no_grad():
        first = model.features[2]
        first.weight.copy_(torch.tensor([[1.0, 1.0, 1.0, 1.0], [-1.0, -1.0, -1.0, -1.0]]))
        first.bias.zero_()  # z_1 = −z_0
    model.eval()
    x = torch.full((1, 2, 2), 0.5)
    y = int(model(x.unsqueeze(0)).argmax())
    half = torch.full((2,), 0.5)
    big = torch.full((2,), 10.0)
    second = (-big, big)
    with pytest.raises(EmptyDomainError, match="do not intersect"):  # z_0 ≥ 0.5 and z_1 ≥ 0.5: no such x
        milp_verify(model, x, y, 0.25, preactivation_bounds=[(half, big), second])
    r = milp_verify(model, x, y, 0.25, preactivation_bounds=[(-big, big), second])  # valid bounds: decided
    assert r.status in ("verified", "falsified")


# --------------------------------------------------------------------------- soundness on trained nets

@pytest.fixture(scope="module")
def trained():
    from certkd.data import load_dataset

    train, test, _ = load_dataset("digits")
    xs, ys = train.images.float(), train.labels
    nets = {}
    for name, kwargs in (("mlp", dict(hidden=(32, 32))), ("cnn-small", {})):
        torch.manual_seed(0)
        model = create_model(name, 1, 8, 10, **kwargs)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(0)
        for _ in range(300):
            idx = torch.randint(0, xs.shape[0], (128,), generator=g)
            loss = F.cross_entropy(model(xs[idx]), ys[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        nets[name] = model.eval()
    return nets, test.images.float(), test.labels


def _soundness(model, xs, ys, epsilons, timeout):
    attack = PGD(steps=50, step_size=0.1, restarts=5, loss_fn=margin_loss, stop_on_success=True)
    g = torch.Generator().manual_seed(0)
    counts = {"verified": 0, "falsified": 0, "timeout": 0, "pgd": 0}
    for eps in epsilons:
        lo, hi = linf_box(xs, eps)
        x_adv = attack(model, xs, ys, lo, hi, generator=g)  # the whole batch at once
        with torch.no_grad():
            pgd_found = (margin_loss(model(x_adv), ys) >= 0).tolist()
            ibp_ok = (ibp_logit_difference_bounds(model, lo, hi, ys)[0].min(1).values > 0).tolist()
        for i in range(xs.shape[0]):
            y = int(ys[i])
            t0 = time.perf_counter()
            r = milp_verify(model, xs[i], y, eps, timeout=timeout)
            assert time.perf_counter() - t0 <= timeout * 1.1 + 1.0
            counts[r.status] += 1
            counts["pgd"] += pgd_found[i]
            if r.status == "verified":
                assert not pgd_found[i], f"verified but PGD misclassifies (eps={eps}, point {i})"
                assert r.margin > 0
            elif r.status == "falsified":
                _check_falsified(model, r, y, lo[i], hi[i])
            if ibp_ok[i]:
                assert r.status == "verified", f"IBP verifies but MILP says {r.status}: {r.note}"
            if pgd_found[i]:
                assert r.status in ("falsified", "timeout")
    return counts


@pytest.mark.parametrize("name, n_points, epsilons", [
    ("mlp", 15, (0.01, 0.03, 0.05)),
    ("cnn-small", 3, (0.01, 0.03, 0.05)),
    pytest.param("mlp", 15, (0.1,), marks=pytest.mark.slow),  # more properties the MILP must falsify
    pytest.param("cnn-small", 15, (0.01, 0.03, 0.05), marks=pytest.mark.slow),
])
def test_soundness_against_pgd_and_ibp(trained, name, n_points, epsilons):
    nets, xs, ys = trained
    counts = _soundness(nets[name], xs[:n_points], ys[:n_points], epsilons, timeout=20)
    total = len(epsilons) * n_points
    assert counts["verified"] + counts["falsified"] + counts["timeout"] == total
    assert counts["timeout"] <= total // 10, counts  # small nets: MILP should decide nearly everything
    assert counts["verified"] >= total // 3, counts
    if name == "mlp":  # the undefended MLP breaks at eps 0.03-0.1 (its clean points are all correct)
        assert counts["falsified"] >= 2 and counts["pgd"] >= 2, counts


# --------------------------------------------------------------------------- timeout

def test_timeout_is_honoured_on_a_hard_instance():
    torch.manual_seed(0)
    model = create_model("mlp", 1, 8, 10, hidden=(128, 128)).eval()
    x = torch.rand(1, 8, 8)
    y = int(model(x.unsqueeze(0)).argmax())
    t0 = time.perf_counter()
    r = milp_verify(model, x, y, 0.05, timeout=1.0)
    wall = time.perf_counter() - t0
    # ±10% of the budget plus the non-interruptible set-up (sparse maps, ~0.1 s on an idle
    # 2-core machine; up to ~0.7 s when other jobs share the cores)
    assert wall <= 1.1 * 1.0 + 1.0 and r.time_s <= wall
    assert r.status in ("timeout", "verified", "falsified")
    if r.status == "timeout":
        assert r.margin is None or r.margin <= 1e-6
        assert r.counterexample is None


# --------------------------------------------------------------------------- encoding of conv / BN

def _randomize_bn(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 2 + 0.2)
                m.weight.copy_(torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.3)
    return model.eval()


def _custom_conv_net():
    """Conv2d with stride, asymmetric padding, dilation, groups, no bias, 'same' padding; BN2d/BN1d."""
    features = nn.Sequential(
        Normalize((0.4, 0.5, 0.6), (0.2, 0.25, 0.3)),
        nn.Conv2d(3, 6, 3, stride=2, padding=(1, 0)), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=2, dilation=2, groups=3, bias=False), nn.ReLU(),
        nn.Conv2d(6, 4, 2, padding="same"), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 5 * 4, 12), nn.BatchNorm1d(12), nn.ReLU())
    spec = ModelSpec("custom", 3, 10, 5)
    return CertifiableNet(features, nn.Linear(12, 5), spec)


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("build", [
    lambda: create_model("cnn-small", 1, 8, 10, width=4, linear=16),
    lambda: create_model("cnn7", 3, 8, 10, width=4, linear=16, mean=(0.49, 0.48, 0.45), std=(0.2, 0.2, 0.2)),
    _custom_conv_net,
])
def test_zero_width_box_margin_equals_pytorch(build):
    torch.manual_seed(0)
    model = _randomize_bn(build(), seed=1)
    c, s = model.spec.in_channels, model.spec.input_size
    for trial in range(3):
        x = torch.rand(c, s, s)
        with torch.no_grad():
            z = model(x.unsqueeze(0))[0]
        y = int(z.argmax())
        model.train(trial == 0)  # train mode in: BN still uses running statistics, and the mode is restored
        r = milp_verify(model, x, y, lower=x.clone(), upper=x.clone(), early_stop=False, timeout=30)
        assert model.training == (trial == 0)
        model.eval()
        assert r.status == "verified", r.note
        assert r.margin == pytest.approx(_margin(model, x, y), abs=1e-5)
        # the wrong label is a counterexample at the point itself
        r2 = milp_verify(model, x, int(z.argmin()), lower=x.clone(), upper=x.clone(), timeout=30)
        assert r2.status == "falsified" and torch.equal(r2.counterexample, x)


@pytest.mark.filterwarnings("ignore:Using padding='same'")
def test_small_box_on_bn_cnn_is_sound():
    """Non-degenerate boxes through BN and strided/padded convs: bounds agree with PGD and sampling."""
    torch.manual_seed(0)
    model = _randomize_bn(_custom_conv_net(), seed=2)
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        x = torch.rand(3, 10, 10, generator=g)
        y = int(model(x.unsqueeze(0)).argmax())
        lo, hi = linf_box(x, 0.005)
        r = milp_verify(model, x, y, 0.005, early_stop=False, timeout=20)
        samples = lo + (hi - lo) * torch.rand(2000, *x.shape, generator=g)
        with torch.no_grad():
            sampled = float(-margin_loss(model(samples), torch.full((2000,), y)).min())
        if r.status == "verified":
            assert r.margin <= sampled + 1e-5
        else:
            assert r.status == "falsified", r.note
            _check_falsified(model, r, y, lo, hi)


def test_argument_errors():
    model = create_model("mlp", 1, 4, 3, hidden=(8,)).eval()
    x = torch.rand(1, 4, 4)
    with pytest.raises(ValueError):
        milp_verify(model, x, 0)
    with pytest.raises(ValueError):
        milp_verify(model, x, 0, lower=x + 0.1, upper=x)
    with pytest.raises(ValueError):
        milp_verify(model, x, 0, 0.1, tighten="crown")


def test_highs_banner_does_not_reach_stdout(tmp_path):
    """HiGHS prints a banner on its first instance; certkd's tables and JSON on stdout stay clean."""
    import subprocess
    import sys

    code = ("import torch\n"
            "from certkd.models import create_model\n"
            "from certkd.verification.milp import milp_verify\n"
            "torch.manual_seed(0)\n"
            "m = create_model('mlp', 1, 4, 3, hidden=(6,)).eval()\n"
            "r = milp_verify(m, torch.rand(1, 4, 4), 0, eps=0.05, timeout=20)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout == ""
