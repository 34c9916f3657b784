"""Tests for certkd.bounds.crown: CROWN / α-CROWN soundness, exactness and tightness."""
from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from certkd.attacks import PGD
from certkd.bounds.crown import CrownResult, alpha_crown_bounds, crown_bounds, activation_layer_shapes
from certkd.bounds.ibp import ibp_logit_difference_bounds
from certkd.bounds.spec import logit_differences, specification_matrix
from certkd.models import CertifiableNet, ModelSpec, Normalize, create_model

TOL = 1e-5


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------

def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics and affine parameters for every BatchNorm layer."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.running_mean.copy_(torch.rand(c, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.3)
                if m.affine:
                    m.weight.copy_(torch.rand(c, generator=g) * 1.5 + 0.3)
                    m.bias.copy_(torch.rand(c, generator=g) - 0.5)
    return model


def toy_net(features, head, in_channels=1, input_size=1, num_classes=None) -> CertifiableNet:
    spec = ModelSpec(name="toy", in_channels=in_channels, input_size=input_size,
                     num_classes=num_classes or head.out_features)
    return CertifiableNet(nn.Sequential(*features), head, spec)


def make_box(shape, eps, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g, dtype=dtype)
    return x, (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)


def spec_values(model, x, labels):
    """C(y)·f(x) for a batch of points."""
    with torch.no_grad():
        return logit_differences(model(x), labels)


def empirical_min(model, lower, upper, labels, samples=1000, corners=256, pgd_steps=20, seed=0):
    """Per (sample, row) minimum of C·f over uniform samples, random corners and PGD points."""
    g = torch.Generator().manual_seed(seed)
    n = lower.shape[0]
    best = spec_values(model, (lower + upper) / 2, labels)
    for kind, count in (("uniform", samples), ("corner", corners)):
        for start in range(0, count, 250):
            m = min(250, count - start)
            u = torch.rand((m,) + tuple(lower.shape), generator=g)
            if kind == "corner":
                u = (u > 0.5).float()
            pts = lower + (upper - lower) * u  # (m, N, ...)
            vals = spec_values(model, pts.reshape(m * n, *lower.shape[1:]), labels.repeat(m))
            best = torch.minimum(best, vals.view(m, n, -1).amin(0))
    x0 = (lower + upper) / 2
    for j in range(best.shape[1]):
        def row_loss(logits, y, j=j):
            return -logit_differences(logits, y)[:, j]
        attack = PGD(steps=pgd_steps, step_size=0.25, loss_fn=row_loss)
        xa = attack(model, x0, labels, lower, upper, generator=g)
        best = torch.minimum(best, spec_values(model, xa, labels))
    return best


def assert_sound(lb, emp, tol=TOL):
    gap = emp - lb
    assert torch.isfinite(lb).all()
    assert gap.min().item() >= -tol, f"unsound bound: violation {gap.min().item():.3g}"


# ------------------------------------------------------------------------------------------
# tiny networks exercising each layer type
# ------------------------------------------------------------------------------------------

def net_conv_bn():
    """Normalize(3 ch) – conv s2 (output_padding 0) – BN2d – ReLU – conv s2 (output_padding 1) –
    ReLU – Flatten – Linear – BN1d – ReLU – head."""
    feats = [Normalize((0.1, 0.2, 0.3), (0.5, 0.6, 0.7)),
             nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
             nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU(),
             nn.Flatten(), nn.Linear(24, 10), nn.BatchNorm1d(10), nn.ReLU()]
    return toy_net(feats, nn.Linear(10, 5), 3, 7), (3, 7, 7)


def net_dilated_groups():
    """Dilation, groups, stride 3 with output_padding 2, no biases, BN without affine."""
    feats = [Normalize((0.5, 0.5, 0.5), (0.25, 0.3, 0.2)),
             nn.Conv2d(3, 6, 3, padding=2, dilation=2, groups=3, bias=False), nn.BatchNorm2d(6, affine=False),
             nn.ReLU(), nn.Conv2d(6, 4, 2, stride=3), nn.ReLU(), nn.Flatten(),
             nn.Linear(16, 12, bias=False), nn.ReLU()]
    return toy_net(feats, nn.Linear(12, 4), 3, 7), (3, 7, 7)


def net_mlp_misc():
    """Flatten, Dropout and Identity (eval), consecutive Linear layers without a ReLU between."""
    feats = [Normalize((0.3,), (0.4,)), nn.Flatten(), nn.Linear(16, 12), nn.Dropout(0.5), nn.Linear(12, 12),
             nn.ReLU(), nn.Identity(), nn.Linear(12, 8), nn.BatchNorm1d(8), nn.ReLU()]
    return toy_net(feats, nn.Linear(8, 6), 1, 4), (1, 4, 4)


TINY_NETS = [net_conv_bn, net_dilated_groups, net_mlp_misc]


@pytest.mark.parametrize("builder", TINY_NETS, ids=lambda b: b.__name__)
def test_zero_width_box_equals_forward(builder):
    """With lower = upper every neuron is stable and each backward rule must be exact."""
    torch.manual_seed(1)
    model, shape = builder()
    model = randomize_batchnorm(model).eval().double()
    x = torch.rand((3,) + shape, dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    lb = crown_bounds(model, x, x.clone(), y)
    assert lb.shape == (3, model.num_classes - 1)
    torch.testing.assert_close(lb, spec_values(model, x, y), atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("builder", TINY_NETS, ids=lambda b: b.__name__)
@pytest.mark.parametrize("intermediate", ["crown", "ibp"])
def test_tiny_nets_sound(builder, intermediate):
    torch.manual_seed(2)
    model, shape = builder()
    model = randomize_batchnorm(model, seed=3).eval()
    x, lo, hi = make_box((4,) + shape, 0.1, seed=4)
    y = torch.tensor([0, 1, 2, 3]) % model.num_classes
    emp = empirical_min(model, lo, hi, y, samples=1000, corners=200, pgd_steps=10)
    lb = crown_bounds(model, lo, hi, y, intermediate=intermediate)
    assert_sound(lb, emp)
    la = alpha_crown_bounds(model, lo, hi, y, intermediate=intermediate, iterations=10)
    assert_sound(la, emp)
    assert (la >= lb - 1e-6).all()


def test_affine_network_bound_is_exact():
    """No ReLU at all: the network is affine and CROWN must return min over the box exactly."""
    feats = [Normalize((0.2, 0.4), (0.3, 0.5)), nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.BatchNorm2d(3),
             nn.Flatten(), nn.Linear(27, 7), nn.BatchNorm1d(7)]
    model = randomize_batchnorm(toy_net(feats, nn.Linear(7, 4), 2, 5)).eval().double()
    x, lo, hi = make_box((2, 2, 5, 5), 0.2, dtype=torch.float64)
    y = torch.tensor([1, 3])
    lb = crown_bounds(model, lo, hi, y)
    c, r = (hi + lo) / 2, (hi - lo) / 2
    for i in range(2):
        jac = torch.autograd.functional.jacobian(lambda z: logit_differences(model(z), y[i:i + 1]), c[i:i + 1])
        jac = jac.reshape(3, -1)
        exact = spec_values(model, c[i:i + 1], y[i:i + 1])[0] - jac.abs() @ r[i].reshape(-1)
        torch.testing.assert_close(lb[i], exact, atol=1e-9, rtol=1e-9)


# ------------------------------------------------------------------------------------------
# whole registered models with random BatchNorm statistics
# ------------------------------------------------------------------------------------------

MODELS = [("mlp", 8, dict(hidden=(32, 32))), ("cnn-small", 8, {}), ("cnn7", 12, dict(width=4, linear=16))]


@pytest.mark.parametrize("name,size,kwargs", MODELS, ids=[m[0] for m in MODELS])
def test_registered_models_sound(name, size, kwargs):
    torch.manual_seed(5)
    model = randomize_batchnorm(create_model(name, 1, size, 10, **kwargs), seed=6).eval()
    x, lo, hi = make_box((3, 1, size, size), 0.04, seed=7)
    y = torch.tensor([2, 5, 9])
    emp = empirical_min(model, lo, hi, y, samples=1000, corners=500, pgd_steps=20)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = crown_bounds(model, lo, hi, y, return_intermediate=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN folding copies
    assert isinstance(res, CrownResult) and res.lower.shape == (3, 9)
    assert_sound(res.lower, emp)
    assert_sound(crown_bounds(model, lo, hi, y, intermediate="ibp"), emp)
    la = alpha_crown_bounds(model, lo, hi, y, iterations=15)
    assert_sound(la, emp)
    assert (la >= res.lower - 1e-6).all()
    # intermediate bounds are sound too: they contain the pre-activations of sampled points
    pts = lo + (hi - lo) * torch.rand((200,) + tuple(lo.shape))
    pre, h = [], pts.reshape(-1, *lo.shape[1:])
    with torch.no_grad():
        for layer in model.features:
            if isinstance(layer, nn.ReLU):
                pre.append(h.view(200, 3, *h.shape[1:]))
            h = layer(h)
    assert len(pre) == len(res.intermediate)
    for (l, u), p in zip(res.intermediate, pre):
        assert (p >= l - TOL).all() and (p <= u + TOL).all()


def test_random_alpha_is_sound():
    """Any α in [0, 1] (per sample, row and neuron) gives a sound bound."""
    torch.manual_seed(8)
    model = randomize_batchnorm(create_model("cnn7", 1, 8, 10, width=4, linear=16), seed=9).eval()
    x, lo, hi = make_box((2, 1, 8, 8), 0.1, seed=10)
    y = torch.tensor([3, 4])
    res = crown_bounds(model, lo, hi, y, return_intermediate=True)
    assert sum(int(((l < 0) & (u > 0)).sum()) for l, u in res.intermediate) > 10
    emp = empirical_min(model, lo, hi, y, samples=1000, corners=200, pgd_steps=10)
    for trial in range(3):
        alpha = [torch.rand((2, 9) + tuple(l.shape[1:])) for l, _ in res.intermediate]
        assert_sound(crown_bounds(model, lo, hi, y, alpha=alpha), emp)


# ------------------------------------------------------------------------------------------
# tightness on a trained network
# ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_mlp():
    from certkd.data import load_dataset
    torch.manual_seed(11)
    train, test, _ = load_dataset("digits")
    model = create_model("mlp", 1, 8, 10, hidden=(64, 32))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(12)
    for _ in range(300):
        idx = torch.randint(0, len(train), (64,), generator=g)
        loss = nn.functional.cross_entropy(model(train.images[idx]), train.labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    x, y = test.images[:24], test.labels[:24]
    with torch.no_grad():
        acc = (model(test.images).argmax(1) == test.labels).float().mean().item()
    assert acc > 0.85, f"training the test MLP failed (accuracy {acc:.2f})"
    return model, x, y


def test_crown_tighter_than_ibp_and_alpha_tighter_than_crown(trained_mlp):
    model, x, y = trained_mlp
    lo, hi = (x - 0.03).clamp(0, 1), (x + 0.03).clamp(0, 1)
    ibp, _ = ibp_logit_difference_bounds(model, lo, hi, y)
    crown = crown_bounds(model, lo, hi, y)
    crown_ibp = crown_bounds(model, lo, hi, y, intermediate="ibp")
    alpha = alpha_crown_bounds(model, lo, hi, y, iterations=20)
    assert crown.mean() > ibp.mean()
    assert crown.mean() >= crown_ibp.mean() - 1e-6
    assert (alpha >= crown - 1e-6).all()
    assert (alpha > crown + 1e-4).any(), "α optimisation never improved a bound"
    emp = empirical_min(model, lo, hi, y, samples=1000, corners=200, pgd_steps=20)
    assert_sound(alpha, emp)
    assert_sound(crown, emp)


def test_alpha_zero_iterations_equals_crown_and_no_param_grads(trained_mlp):
    model, x, y = trained_mlp
    lo, hi = (x - 0.03).clamp(0, 1), (x + 0.03).clamp(0, 1)
    model.zero_grad(set_to_none=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    crown = crown_bounds(model, lo, hi, y)
    torch.testing.assert_close(alpha_crown_bounds(model, lo, hi, y, iterations=0), crown, atol=1e-6, rtol=0)
    res = alpha_crown_bounds(model, lo, hi, y, iterations=3, return_intermediate=True)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not res.lower.requires_grad
    for (l, _), a in zip(res.intermediate, res.alpha):
        assert a is None or (a.shape == (24, 9) + tuple(l.shape[1:]) and a.min() >= 0 and a.max() <= 1)
    # warm start from the best α reproduces at least that bound
    warm = alpha_crown_bounds(model, lo, hi, y, iterations=0, alpha_init=res.alpha)
    assert (warm >= res.lower - 1e-5).all()


# ------------------------------------------------------------------------------------------
# 2-D toy networks: exact answers are available
# ------------------------------------------------------------------------------------------

def toy_2d(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    feats = [Normalize((0.5,), (0.5,)), nn.Linear(2, 10), nn.ReLU(), nn.Linear(10, 10), nn.ReLU()]
    return toy_net(feats, nn.Linear(10, 3), 1, 2).eval().to(dtype)


def test_no_unstable_relu_equals_exact_linearisation():
    model = toy_2d(seed=13)
    x = torch.tensor([[0.31, 0.62], [0.8, 0.15]], dtype=torch.float64)
    lo, hi = x - 1e-4, x + 1e-4
    y = torch.tensor([0, 2])
    res = crown_bounds(model, lo, hi, y, return_intermediate=True)
    for l, u in res.intermediate:  # precondition: every ReLU is stable on this box
        assert not ((l < 0) & (u > 0)).any()
    corners = torch.tensor(list(itertools.product([0.0, 1.0], repeat=2)), dtype=torch.float64)
    pts = lo.unsqueeze(0) + (hi - lo).unsqueeze(0) * corners.unsqueeze(1)  # (4, N, 2)
    vals = torch.stack([spec_values(model, p, y) for p in pts]).amin(0)
    torch.testing.assert_close(res.lower, vals, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(alpha_crown_bounds(model, lo, hi, y, iterations=5), vals, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("seed", [14, 15, 16])
def test_two_input_network_below_grid_minimum(seed):
    model = toy_2d(seed=seed)
    lo = torch.tensor([[0.2, 0.3]], dtype=torch.float64)
    hi = torch.tensor([[0.7, 0.6]], dtype=torch.float64)
    y = torch.tensor([1])
    g = torch.linspace(0, 1, 401, dtype=torch.float64)
    grid = torch.cartesian_prod(g, g)
    pts = lo + (hi - lo) * grid
    true_min = spec_values(model, pts, y.expand(pts.shape[0])).amin(0, keepdim=True)
    res = crown_bounds(model, lo, hi, y, return_intermediate=True)
    assert any(((l < 0) & (u > 0)).any() for l, u in res.intermediate), "box too small to test relaxations"
    assert (res.lower <= true_min + 1e-9).all()
    alpha = alpha_crown_bounds(model, lo, hi, y, iterations=30)
    assert (alpha <= true_min + 1e-9).all()
    assert (alpha >= res.lower - 1e-9).all()
    ibp, _ = ibp_logit_difference_bounds(model, lo, hi, y)
    assert (ibp <= true_min + 1e-9).all()


# ------------------------------------------------------------------------------------------
# API: specification, overrides / split constraints, chunking, errors
# ------------------------------------------------------------------------------------------

def test_specification_forms_agree():
    model = randomize_batchnorm(create_model("cnn-small", 1, 8, 10, width=4, linear=16)).eval()
    x, lo, hi = make_box((2, 1, 8, 8), 0.03, seed=17)
    y = torch.tensor([4, 7])
    by_label = crown_bounds(model, lo, hi, y)
    by_c = crown_bounds(model, lo, hi, C=specification_matrix(y, 10))
    torch.testing.assert_close(by_label, by_c)
    logits_lb = crown_bounds(model, lo, hi)  # no spec: bounds of the logits
    assert logits_lb.shape == (2, 10)
    with torch.no_grad():
        assert (model(x) >= logits_lb - TOL).all()
    shared = crown_bounds(model, lo, hi, C=torch.eye(10)[:3])  # (S, K) shared by the batch
    torch.testing.assert_close(shared, logits_lb[:, :3])


def test_overrides_reproduce_and_split_constraints_are_sound():
    torch.manual_seed(18)
    model = randomize_batchnorm(create_model("cnn7", 1, 8, 10, width=4, linear=16), seed=19).eval()
    x, lo, hi = make_box((1, 1, 8, 8), 0.1, seed=20)
    y = torch.tensor([6])
    root = crown_bounds(model, lo, hi, y, return_intermediate=True)
    assert activation_layer_shapes(model, (1, 8, 8)) == [tuple(l.shape[1:]) for l, _ in root.intermediate]
    fixed = {k: b for k, b in enumerate(root.intermediate)}
    again = crown_bounds(model, lo, hi, y, intermediate_overrides=fixed, return_intermediate=True)
    torch.testing.assert_close(again.lower, root.lower)
    assert not again.infeasible.any()

    # split the first unstable neuron of the deepest ReLU layer that has one, both ways
    candidates = [k for k, (l, u) in enumerate(root.intermediate) if ((l < 0) & (u > 0)).any()]
    assert len(candidates) > 0 and candidates[-1] > 0
    layer = candidates[-1]
    l, u = root.intermediate[layer]
    j = ((l < 0) & (u > 0)).flatten().nonzero()[0, 0]
    pts = lo + (hi - lo) * torch.rand((3000,) + tuple(lo.shape[1:]))
    with torch.no_grad():
        h = pts
        count = 0
        for mod in model.features:
            if isinstance(mod, nn.ReLU):
                if count == layer:
                    z = h.flatten(1)[:, j]
                count += 1
            h = mod(h)
        vals = logit_differences(model.head(h), y.expand(len(pts)))
    for active in (True, False):
        ov = {k: (a.clone(), b.clone()) for k, (a, b) in fixed.items()}
        if active:
            ov[layer][0].view(1, -1)[0, j] = 0.0
        else:
            ov[layer][1].view(1, -1)[0, j] = 0.0
        sub = crown_bounds(model, lo, hi, y, intermediate_overrides=ov)
        sub_a = alpha_crown_bounds(model, lo, hi, y, intermediate_overrides=ov, iterations=5)
        inside = z >= 0 if active else z <= 0
        if inside.any():
            emp = vals[inside].amin(0, keepdim=True)
            assert_sound(sub, emp)
            assert_sound(sub_a, emp)
    # crossing bounds flag an empty sub-domain
    ov = {k: (a.clone(), b.clone()) for k, (a, b) in fixed.items()}
    ov[layer][0].view(1, -1)[0, j] = 1.0
    ov[layer][1].view(1, -1)[0, j] = -1.0
    assert crown_bounds(model, lo, hi, y, intermediate_overrides=ov, return_intermediate=True).infeasible.all()


def test_chunking_does_not_change_bounds():
    model = randomize_batchnorm(create_model("cnn7", 1, 8, 10, width=4, linear=16), seed=21).eval()
    x, lo, hi = make_box((2, 1, 8, 8), 0.1, seed=22)
    y = torch.tensor([0, 9])
    full = crown_bounds(model, lo, hi, y, return_intermediate=True)
    assert sum(int(((l < 0) & (u > 0)).sum()) for l, u in full.intermediate[1:]) > 10
    tiny = crown_bounds(model, lo, hi, y, chunk_size=3, return_intermediate=True)
    torch.testing.assert_close(full.lower, tiny.lower, atol=1e-6, rtol=1e-6)
    for (a, b), (c, d) in zip(full.intermediate, tiny.intermediate):
        torch.testing.assert_close(a, c, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(b, d, atol=1e-6, rtol=1e-6)


def test_crown_intermediate_is_intersection_with_ibp():
    """CROWN intermediates are never looser than the IBP ones."""
    model = randomize_batchnorm(create_model("cnn7", 1, 8, 10, width=4, linear=16), seed=23).eval()
    x, lo, hi = make_box((2, 1, 8, 8), 0.1, seed=24)
    y = torch.tensor([1, 2])
    a = crown_bounds(model, lo, hi, y, return_intermediate=True)
    b = crown_bounds(model, lo, hi, y, intermediate="ibp", return_intermediate=True)
    for (l1, u1), (l2, u2) in zip(a.intermediate, b.intermediate):
        assert (l1 >= l2 - 1e-6).all() and (u1 <= u2 + 1e-6).all()
    assert any((l1 > l2 + 1e-4).any() for (l1, _), (l2, _) in zip(a.intermediate, b.intermediate))


def test_errors():
    model = create_model("mlp", 1, 4, 3, hidden=(5,))
    lo, hi = torch.zeros(1, 1, 4, 4), torch.ones(1, 1, 4, 4)
    with pytest.raises(ValueError):
        crown_bounds(model, lo, hi, torch.tensor([0]), C=torch.eye(3))
    with pytest.raises(ValueError):
        crown_bounds(model, lo, hi, torch.tensor([0]), intermediate="lp")
    with pytest.raises(ValueError):
        crown_bounds(model, lo, hi, torch.tensor([0]), intermediate_overrides={5: (lo, hi)})
    bn = create_model("cnn7", 1, 8, 3, width=2, linear=4).train()
    with pytest.raises(ValueError, match="eval"):
        crown_bounds(bn, torch.zeros(1, 1, 8, 8), torch.ones(1, 1, 8, 8), torch.tensor([0]))
    odd = toy_net([Normalize((0.0,), (1.0,)), nn.Flatten(), nn.Linear(16, 4), nn.GELU()], nn.Linear(4, 3))
    with pytest.raises(TypeError, match="GELU"):
        crown_bounds(odd, lo, hi, torch.tensor([0]))


def test_alpha_is_clamped_and_layer_selection():
    model = randomize_batchnorm(create_model("cnn7", 1, 8, 10, width=4, linear=16), seed=25).eval()
    x, lo, hi = make_box((2, 1, 8, 8), 0.1, seed=26)
    y = torch.tensor([5, 8])
    res = crown_bounds(model, lo, hi, y, return_intermediate=True)
    big = [torch.full((1, 1) + tuple(l.shape[1:]), 2.0) for l, _ in res.intermediate]
    one = [torch.ones((1, 1) + tuple(l.shape[1:])) for l, _ in res.intermediate]
    torch.testing.assert_close(crown_bounds(model, lo, hi, y, alpha=big), crown_bounds(model, lo, hi, y, alpha=one))
    # CROWN on the last ReLU layer only: between the IBP-only and the all-CROWN intermediates
    n_relu = len(res.intermediate)
    last = crown_bounds(model, lo, hi, y, intermediate=[n_relu - 1], return_intermediate=True)
    ibp = crown_bounds(model, lo, hi, y, intermediate="ibp", return_intermediate=True)
    for k in range(n_relu - 1):
        torch.testing.assert_close(last.intermediate[k], ibp.intermediate[k])
    l_last, u_last = last.intermediate[-1]
    l_ibp, u_ibp = ibp.intermediate[-1]
    assert (l_last >= l_ibp - 1e-6).all() and (u_last <= u_ibp + 1e-6).all()
    with pytest.raises(ValueError):
        crown_bounds(model, lo, hi, y, intermediate=[n_relu])


@pytest.mark.parametrize("builder", [net_conv_bn, net_dilated_groups,
                                     lambda: (create_model("cnn7", 1, 12, 10, width=4, linear=16), (1, 12, 12)),
                                     lambda: (create_model("cnn-small", 1, 9, 10, width=4, linear=16), (1, 9, 9))],
                         ids=["conv_bn", "dilated_groups", "cnn7", "cnn-small"])
def test_windowed_conv_pass_equals_dense(builder):
    """The receptive-field (windowed) backward pass of conv layers gives the dense pass's bounds."""
    from certkd.bounds import crown as crown_module
    torch.manual_seed(27)
    model, shape = builder()
    model = randomize_batchnorm(model, seed=28).eval().double()
    x, lo, hi = make_box((2,) + shape, 0.1, seed=29, dtype=torch.float64)
    ops = crown_module._build_plan(model.features, shape, torch.float64, torch.device("cpu"))
    bounds, relax = crown_module._intermediate(ops, lo, hi, "crown", None, 5, 0)
    c, r = (hi + lo) / 2, (hi - lo) / 2
    relu_at = [i for i, op in enumerate(ops) if isinstance(op, crown_module._ActivationMarker)]
    checked = 0
    for k, i in enumerate(relu_at):
        l0 = torch.full_like(bounds[k][0], -1e9)  # every neuron "unstable": all get a CROWN pass
        got = [crown_module._crown_layer_bounds(ops, i, ops[i].shape, l0, -l0, relax[:k], c, r, 7, 0, windows=w)
               for w in (True, False)]
        torch.testing.assert_close(got[0][0], got[1][0], atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(got[0][1], got[1][1], atol=1e-10, rtol=1e-10)
        checked += len(ops[i].shape) == 3
    assert checked >= 2


def reference_crown_mlp(weights, biases, head_w, head_b, C, lo, hi):
    """Textbook CROWN for x -> W1 x + b1 -> ReLU -> ... -> head (one sample, float64, matrices).

    Intermediate bounds: CROWN (adaptive lower slope) intersected with IBP from the previous
    layer's bounds, as crown_bounds documents. Returns the lower bound of C·f over [lo, hi].
    """
    c, r = (hi + lo) / 2, (hi - lo) / 2
    pre = []  # (l, u) of the input of each ReLU

    def lower_bound(A, bias, top):
        """min over the box of A·z_top + bias, z_top the output of affine layer `top`."""
        for k in range(top, -1, -1):
            bias = bias + A @ biases[k]
            A = A @ weights[k]
            if k > 0:  # through ReLU k−1
                l, u = pre[k - 1]
                unstable = (l < 0) & (u > 0)
                up = torch.where(unstable, u / (u - l), (l >= 0).double())
                ub = torch.where(unstable, -l * u / (u - l), torch.zeros_like(l))
                lo_s = torch.where(unstable, (u >= -l).double(), (l >= 0).double())
                bias = bias + A.clamp(max=0) @ ub
                A = A.clamp(min=0) * lo_s + A.clamp(max=0) * up
        return A @ c - A.abs() @ r + bias

    for k in range(len(weights)):
        if k == 0:
            ic, ir = weights[0] @ c + biases[0], weights[0].abs() @ r
        else:
            pl, pu = pre[-1][0].clamp(min=0), pre[-1][1].clamp(min=0)
            ic, ir = weights[k] @ ((pl + pu) / 2) + biases[k], weights[k].abs() @ ((pu - pl) / 2)
        l, u = ic - ir, ic + ir
        if k > 0:
            eye = torch.eye(weights[k].shape[0], dtype=torch.float64)
            zero = torch.zeros(weights[k].shape[0], dtype=torch.float64)
            l = torch.maximum(l, lower_bound(eye, zero, k))
            u = torch.minimum(u, -lower_bound(-eye, zero, k))
        pre.append((l, u))
    # the head merged with C acts on the output of the last ReLU: push it through that ReLU
    weights, biases = weights + [head_w], biases + [head_b]
    return lower_bound(C, torch.zeros(C.shape[0], dtype=torch.float64), len(weights) - 1)


@pytest.mark.parametrize("seed", [30, 31])
def test_matches_textbook_crown_on_mlp(seed):
    """Same numbers as an independent matrix implementation of CROWN (not just sound: as tight)."""
    torch.manual_seed(seed)
    model = create_model("mlp", 1, 4, 5, hidden=(12, 10, 8)).eval().double()
    x, lo, hi = make_box((2, 1, 4, 4), 0.15, seed=seed, dtype=torch.float64)
    y = torch.tensor([1, 4])
    got = crown_bounds(model, lo, hi, y)
    linears = [m for m in model.features if isinstance(m, nn.Linear)]
    for i in range(2):
        ws = [m.weight.detach() for m in linears]
        bs = [m.bias.detach() for m in linears]
        C = specification_matrix(y[i:i + 1], 5)[0].double()
        ref = reference_crown_mlp(ws, bs, model.head.weight.detach(), model.head.bias.detach(), C,
                                  lo[i].flatten(), hi[i].flatten())
        torch.testing.assert_close(got[i], ref, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("name,size,kwargs,eps", [("cnn7", 8, dict(width=4, linear=16), 0.1),
                                                  ("mlp", 8, dict(hidden=(32, 32, 32)), 0.1),
                                                  # deep and narrow, wide box: IBP beats CROWN on some neurons
                                                  ("mlp", 8, dict(hidden=(16, 16, 16, 16)), 0.3)])
def test_intermediate_bounds_within_ibp_of_previous_layer(name, size, kwargs, eps):
    """Each layer's returned bounds lie inside the IBP image of the previous layer's returned
    bounds (CROWN ∩ IBP), and are strictly tighter than it somewhere (CROWN helps)."""
    from certkd.bounds.ibp import interval_bounds
    torch.manual_seed(32)
    model = randomize_batchnorm(create_model(name, 1, size, 10, **kwargs), seed=33).eval()
    x, lo, hi = make_box((3, 1, size, size), eps, seed=34)
    res = crown_bounds(model, lo, hi, torch.tensor([0, 1, 2]), return_intermediate=True)
    layers = list(model.features)
    relu_at = [i for i, m in enumerate(layers) if isinstance(m, nn.ReLU)]
    box, start, tighter = (lo, hi), 0, 0
    for k, pos in enumerate(relu_at):
        ibp = interval_bounds(nn.Sequential(*layers[start:pos]), *box)
        l, u = res.intermediate[k]
        assert (l >= ibp.lower - 1e-5).all() and (u <= ibp.upper + 1e-5).all()
        tighter += int((l > ibp.lower + 1e-3).sum() + (u < ibp.upper - 1e-3).sum())
        box, start = (l.clamp(min=0), u.clamp(min=0)), pos + 1
    assert tighter > 0


# ------------------------------------------------------------------------------------------
# β-CROWN: split constraints through Lagrange multipliers (branch and bound)
# ------------------------------------------------------------------------------------------

def _subdomain(root, splits):
    """Overrides and split signs for one sub-domain {(layer, neuron): ±1}."""
    ov, signs = {}, []
    for k, (l, u) in enumerate(root.intermediate):
        l, u = l.clone(), u.clone()
        sg = torch.zeros_like(l)
        for (layer, j), s in splits.items():
            if layer == k:
                sg.view(-1)[j] = s
                if s > 0:
                    l.view(-1)[j] = l.view(-1)[j].clamp(min=0)
                else:
                    u.view(-1)[j] = u.view(-1)[j].clamp(max=0)
        ov[k] = (l, u)
        signs.append(sg)
    return ov, signs


@pytest.mark.slow  # 61–75 s on a 2-core CPU (six exact MILPs); runs in CI (.ci/run)
def test_beta_crown_is_sound_below_the_exact_subdomain_minimum_and_tighter(trained_mlp):
    """Random splits of unstable neurons: β-CROWN ≤ the MILP's exact minimum on the sub-domain,
    ≤ every sampled point satisfying the splits, and ≥ α-CROWN without multipliers somewhere."""
    from certkd.verification.milp import EmptyDomainError, milp_verify

    model, x, y = trained_mlp
    g = torch.Generator().manual_seed(41)
    improved, checked = 0, 0
    for i in range(6):
        xi, yi = x[i:i + 1], y[i:i + 1]
        lo, hi = (xi - 0.04).clamp(0, 1), (xi + 0.04).clamp(0, 1)
        root = crown_bounds(model, lo, hi, yi, return_intermediate=True)
        unstable = [(k, int(j)) for k, (l, u) in enumerate(root.intermediate)
                    for j in ((l < 0) & (u > 0)).flatten().nonzero().flatten()]
        if len(unstable) < 3:
            continue
        pick = torch.randperm(len(unstable), generator=g)[:3]
        splits = {unstable[int(p)]: (1 if torch.rand(1, generator=g).item() < 0.5 else -1) for p in pick}
        ov, signs = _subdomain(root, splits)
        plain = alpha_crown_bounds(model, lo, hi, yi, iterations=30, intermediate_overrides=ov)
        res = alpha_crown_bounds(model, lo, hi, yi, iterations=30, intermediate_overrides=ov,
                                 split_signs=signs, return_intermediate=True)
        assert res.minimizer.shape == lo.shape
        assert bool(((res.minimizer >= lo) & (res.minimizer <= hi)).all())
        try:
            exact = milp_verify(model, xi[0], int(yi), lower=lo[0], upper=hi[0], early_stop=False,
                                preactivation_bounds=[ov[k] for k in range(len(ov))], timeout=60)
        except EmptyDomainError:
            continue
        assert exact.status != "timeout"
        assert float(res.lower.min()) <= exact.margin + 1e-4, (i, splits, float(res.lower.min()), exact.margin)
        # sampled points of the sub-domain
        pts = lo + (hi - lo) * torch.rand((4000,) + tuple(lo.shape[1:]), generator=g)
        with torch.no_grad():
            h, count, keep = pts, 0, torch.ones(len(pts), dtype=torch.bool)
            for mod in model.features:
                if isinstance(mod, nn.ReLU):
                    for (layer, j), s in splits.items():
                        if layer == count:
                            keep &= (s * h.flatten(1)[:, j]) >= 0
                    count += 1
                h = mod(h)
            vals = logit_differences(model.head(h), yi.expand(len(pts)))
        if keep.any():
            assert_sound(res.lower, vals[keep].amin(0, keepdim=True))
        checked += 1
        improved += int(bool((res.lower > plain + 1e-4).any()))
    assert checked >= 3
    assert improved >= 1, "the β multipliers never tightened a split sub-domain"


def test_beta_zero_signs_equal_alpha_crown(trained_mlp):
    model, x, y = trained_mlp
    lo, hi = (x[:4] - 0.03).clamp(0, 1), (x[:4] + 0.03).clamp(0, 1)
    shapes = activation_layer_shapes(model, lo.shape[1:])
    zeros = [torch.zeros((4,) + s) for s in shapes]
    a = alpha_crown_bounds(model, lo, hi, y[:4], iterations=8)
    b = alpha_crown_bounds(model, lo, hi, y[:4], iterations=8, split_signs=zeros)
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="split_signs"):
        alpha_crown_bounds(model, lo, hi, y[:4], iterations=1, split_signs=zeros[:1])
