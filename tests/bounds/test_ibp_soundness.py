"""Soundness and exactness of interval bound propagation (docs/method.md §2.1, §2.2).

Every box check compares IBP bounds with outputs at points of the box evaluated with the
*same* BatchNorm statistics: running statistics in eval mode, the statistics of the batch
carried as ``point`` in train mode (docs/method.md §2.2).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from certkd.attacks import PGD, linf_box, margin_loss
from certkd.bounds import (elided_lower_bounds, ibp_logit_difference_bounds, interval_bounds, logit_differences,
                           specification_matrix)
from certkd.models import Normalize, create_model

D = torch.float64
TOL = 1e-5
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)


# --------------------------------------------------------------------------- helpers

def _box(shape, n=4, seed=0, width=0.3, dtype=D):
    """n random boxes with random (some zero) widths, plus a point inside each."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(n, *shape, generator=g, dtype=dtype)
    r = torch.rand(n, *shape, generator=g, dtype=dtype) * width
    r[0].view(-1)[::5] = 0.0
    lo, hi = c - r, c + r
    point = lo + (hi - lo) * torch.rand(n, *shape, generator=g, dtype=dtype)
    return lo, hi, point


def _samples(lo, hi, n_uniform=250, n_corners=16, seed=1):
    """(S, N, *) points of each box: uniform samples and random corners (vertices)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n_uniform, *lo.shape, generator=g, dtype=lo.dtype)
    corners = (torch.rand(n_corners, *lo.shape, generator=g) < 0.5).to(lo.dtype)
    t = torch.cat([u, corners, torch.zeros_like(lo)[None], torch.ones_like(lo)[None]])
    return lo + (hi - lo) * t


def _eval_samples(fn, pts):
    s, n = pts.shape[:2]
    out = fn(pts.reshape(s * n, *pts.shape[2:]))
    return out.reshape(s, n, *out.shape[1:])


def _assert_inside(vals, lower, upper, tol=TOL):
    below = (lower - vals).max().item()
    above = (vals - upper).max().item()
    assert below <= tol and above <= tol, f"outside the IBP box by {max(below, above):.3g}"


def _jacobian(fn, shape, dtype=D):
    """Matrix of an affine map on (1, *shape) inputs: (out_dim, in_dim)."""
    d = int(torch.tensor(shape).prod())
    return torch.autograd.functional.jacobian(lambda v: fn(v.view(1, *shape)).flatten(), torch.zeros(d, dtype=dtype))


def _check_affine_exact(fn, lo, hi, bounds):
    """For affine fn, IBP is exact: bounds = fn(c) ± |A| r with A the Jacobian."""
    a = _jacobian(fn, lo.shape[1:])
    c, r = ((hi + lo) / 2).flatten(1), ((hi - lo) / 2).flatten(1)
    center = fn((hi + lo) / 2).flatten(1)
    rad = r @ a.abs().T
    torch.testing.assert_close(bounds.lower.flatten(1), center - rad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(bounds.upper.flatten(1), center + rad, rtol=1e-10, atol=1e-10)
    # the upper bound of every output is attained at the vertex c + r·sign(A_i)
    i = torch.arange(a.shape[0])[:: max(1, a.shape[0] // 7)]
    vert = c[:, None, :] + r[:, None, :] * a[i].sign()[None]  # (N, |i|, in)
    vals = fn(vert.reshape(-1, *lo.shape[1:])).flatten(1).reshape(c.shape[0], len(i), -1)
    attained = vals[:, torch.arange(len(i)), i]
    torch.testing.assert_close(attained, bounds.upper.flatten(1)[:, i], rtol=1e-10, atol=1e-10)


def _bn_reference(bn, point):
    """The affine map of a BN layer with the point batch's statistics (biased variance)."""
    dims = [0] + list(range(2, point.dim()))
    mean, var = point.mean(dims), point.var(dims, unbiased=False)
    shape = (1, -1) + (1,) * (point.dim() - 2)
    w = bn.weight.detach() if bn.affine else torch.ones_like(mean)
    b = bn.bias.detach() if bn.affine else torch.zeros_like(mean)

    def fn(x):
        return (x - mean.view(shape)) / torch.sqrt(var.view(shape) + bn.eps) * w.view(shape) + b.view(shape)

    return fn, mean, var


def _randomize_bn(bn, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bn.weight.copy_(torch.randn(bn.num_features, generator=g, dtype=bn.weight.dtype))
        bn.weight[0] = -bn.weight[0].abs() - 0.1  # at least one negative γ
        bn.bias.copy_(torch.randn(bn.num_features, generator=g, dtype=bn.bias.dtype))
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=g, dtype=bn.running_mean.dtype))
        bn.running_var.copy_(torch.rand(bn.num_features, generator=g, dtype=bn.running_var.dtype) * 2 + 0.1)
    assert (bn.weight < 0).any()
    return bn


# --------------------------------------------------------------------------- single layers

AFFINE_LAYERS = [
    ("normalize", lambda: Normalize(CIFAR_MEAN, CIFAR_STD), (3, 5, 5)),
    ("linear", lambda: nn.Linear(12, 7), (12,)),
    ("linear-nobias", lambda: nn.Linear(6, 4, bias=False), (6,)),
    ("conv-s1-p1", lambda: nn.Conv2d(3, 5, 3, stride=1, padding=1), (3, 6, 6)),
    ("conv-s2-p1", lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1), (3, 7, 7)),
    ("conv-k2-s2-p0", lambda: nn.Conv2d(2, 3, 2, stride=2, padding=0), (2, 6, 6)),
    ("conv-k4-s2-p1", lambda: nn.Conv2d(1, 4, 4, stride=2, padding=1), (1, 8, 8)),
    ("conv-dil-groups", lambda: nn.Conv2d(2, 4, 3, padding=2, dilation=2, groups=2, bias=False), (2, 5, 5)),
    ("flatten", lambda: nn.Flatten(), (2, 3, 3)),
]


@pytest.mark.parametrize("name, make, shape", AFFINE_LAYERS, ids=[a[0] for a in AFFINE_LAYERS])
def test_affine_layer_exact_and_sound(name, make, shape):
    torch.manual_seed(0)
    layer = make().to(D)
    lo, hi, point = _box(shape)
    b = interval_bounds(nn.Sequential(layer), lo, hi, point=point)
    assert b.preactivations == []
    with torch.no_grad():
        _assert_inside(_eval_samples(layer, _samples(lo, hi)), b.lower, b.upper)
        _check_affine_exact(layer, lo, hi, b)
        torch.testing.assert_close(b.point_output, layer(point), rtol=0, atol=0)


@pytest.mark.parametrize("cls, shape", [(nn.BatchNorm1d, (6,)), (nn.BatchNorm1d, (3, 5)), (nn.BatchNorm2d, (3, 4, 4))])
def test_batchnorm_eval_exact_and_sound(cls, shape):
    bn = _randomize_bn(cls(shape[0]).to(D), seed=1).eval()
    lo, hi, point = _box(shape, n=5)
    b = interval_bounds(nn.Sequential(bn), lo, hi, point=point)
    with torch.no_grad():
        _assert_inside(_eval_samples(bn, _samples(lo, hi)), b.lower, b.upper)
        _check_affine_exact(bn, lo, hi, b)
        torch.testing.assert_close(b.point_output, bn(point), rtol=1e-12, atol=1e-12)
    # eval mode needs no point
    b2 = interval_bounds(nn.Sequential(bn), lo, hi)
    assert b2.point_output is None
    torch.testing.assert_close(b2.lower, b.lower, rtol=0, atol=0)


@pytest.mark.parametrize("cls, shape", [(nn.BatchNorm1d, (6,)), (nn.BatchNorm1d, (3, 5)), (nn.BatchNorm2d, (3, 4, 4))])
def test_batchnorm_train_uses_point_batch_statistics(cls, shape):
    bn = _randomize_bn(cls(shape[0]).to(D), seed=2).train()
    lo, hi, point = _box(shape, n=6)
    twin = copy.deepcopy(bn)  # a normal train-mode forward for comparison
    ref_fn, mean, var = _bn_reference(bn, point)
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    b = interval_bounds(nn.Sequential(bn), lo, hi, point=point)
    assert bn.training
    with torch.no_grad():
        expected_point = twin(point)
        torch.testing.assert_close(b.point_output, expected_point, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(b.point_output, ref_fn(point), rtol=1e-10, atol=1e-10)
        # samples evaluated with the SAME statistics (the point batch's, biased variance)
        _assert_inside(_eval_samples(ref_fn, _samples(lo, hi)), b.lower, b.upper)
        _check_affine_exact(ref_fn, lo, hi, b)
    # the running statistics moved exactly as in one normal forward (momentum 0.1, unbiased var)
    n = point.numel() // point.shape[1]
    torch.testing.assert_close(bn.running_mean, 0.9 * rm + 0.1 * mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bn.running_var, 0.9 * rv + 0.1 * var * n / (n - 1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bn.running_var, twin.running_var, rtol=1e-12, atol=1e-12)


def test_batchnorm_train_bounds_differ_from_eval_bounds():
    bn = _randomize_bn(nn.BatchNorm2d(3).to(D), seed=3)
    lo, hi, point = _box((3, 4, 4))
    train_b = interval_bounds(nn.Sequential(bn.train()), lo, hi, point=point)
    eval_b = interval_bounds(nn.Sequential(bn.eval()), lo, hi)
    assert (train_b.lower - eval_b.lower).abs().max() > 1e-3


def test_batchnorm_train_gradient_flows_through_statistics():
    bn = nn.BatchNorm1d(4).to(D).train()
    lo, hi, point = _box((4,), n=5)
    point = point.clone().requires_grad_(True)
    b = interval_bounds(nn.Sequential(bn), lo, hi, point=point)
    (g,) = torch.autograd.grad(b.upper.sum(), point)
    assert g.abs().max() > 1e-6  # the box bounds depend on the point via μ_B, σ²_B


def test_batchnorm_train_without_point_raises():
    bn = nn.BatchNorm2d(3).train()
    lo, hi, _ = _box((3, 4, 4), dtype=torch.float32)
    with pytest.raises(ValueError, match="point"):
        interval_bounds(nn.Sequential(bn), lo, hi)
    with pytest.raises(ValueError, match="point"):
        model = create_model("cnn7", 1, 8, 10, width=2, linear=8).train()
        ibp_logit_difference_bounds(model, torch.zeros(2, 1, 8, 8), torch.ones(2, 1, 8, 8), torch.tensor([0, 1]))


def test_relu_exact_and_sound():
    lo, hi, point = _box((3, 4, 4), width=1.0)
    b = interval_bounds(nn.Sequential(nn.ReLU()), lo, hi, point=point)
    torch.testing.assert_close(b.lower, lo.clamp(min=0), rtol=0, atol=1e-15)
    torch.testing.assert_close(b.upper, hi.clamp(min=0), rtol=0, atol=1e-15)
    _assert_inside(_eval_samples(torch.relu, _samples(lo, hi)), b.lower, b.upper)
    assert len(b.preactivations) == 1
    c, r = b.preactivations[0]
    torch.testing.assert_close(c, (hi + lo) / 2, rtol=0, atol=0)
    torch.testing.assert_close(r, (hi - lo) / 2, rtol=0, atol=0)
    torch.testing.assert_close(b.point_output, torch.relu(point), rtol=0, atol=0)
    # stable units keep exact widths, inactive units collapse to 0
    assert ((hi <= 0) <= (b.upper == 0)).all()


def test_unsupported_layers_raise_type_error():
    lo, hi, _ = _box((1, 4, 4), dtype=torch.float32)
    for layer in (nn.GELU(), nn.MaxPool2d(2), nn.Softplus()):
        with pytest.raises(TypeError, match="no interval bound rule"):
            interval_bounds(nn.Sequential(layer), lo, hi)
    with pytest.raises(TypeError, match="zero padding"):
        interval_bounds(nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect")), lo, hi)


def test_subclass_of_supported_layer_uses_parent_rule():
    class MyLinear(nn.Linear):
        pass

    torch.manual_seed(0)
    layer = MyLinear(5, 3).to(D)
    lo, hi, _ = _box((5,))
    b = interval_bounds(nn.Sequential(layer), lo, hi)
    _check_affine_exact(layer, lo, hi, b)


# --------------------------------------------------------------------------- whole models

MODELS = [
    ("cnn7-3x16", "cnn7", 3, 16, dict(width=8, linear=32), CIFAR_MEAN, CIFAR_STD),
    ("cnn7-1x28", "cnn7", 1, 28, dict(width=4), (0.0,), (1.0,)),
    ("cnn-small", "cnn-small", 1, 28, {}, (0.1307,), (0.3081,)),
    ("mlp", "mlp", 1, 12, {}, (0.0,), (1.0,)),
]


def _make_model(name, c, size, kwargs, mean, std, seed=0):
    torch.manual_seed(seed)
    model = create_model(name, c, size, 10, mean=mean, std=std, **kwargs).to(D)
    # realistic running statistics: one train-mode pass over random images with momentum 1
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.momentum = 1.0
    with torch.no_grad():
        model.train()(torch.rand(32, c, size, size, dtype=D))
    for bn in bns:
        bn.momentum = 0.1
    return model


def _batch_stats_twin(model, point):
    """Deep copy in eval mode whose BN layers use ``point``'s train-mode batch statistics."""
    twin = copy.deepcopy(model).train()
    stats, hooks = {}, []
    for name, m in twin.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            def hook(mod, inp, out, name=name):
                x = inp[0]
                dims = [0] + list(range(2, x.dim()))
                stats[name] = (x.mean(dims).detach(), x.var(dims, unbiased=False).detach())
            hooks.append(m.register_forward_hook(hook))
    with torch.no_grad():
        twin(point)
    for h in hooks:
        h.remove()
    for name, m in twin.named_modules():
        if name in stats:
            m.running_mean.copy_(stats[name][0])
            m.running_var.copy_(stats[name][1])  # biased: eval mode uses running_var as is
    return twin.eval()


class _FeatureProbe(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.features(x)


def _relu_inputs(model, x):
    seen = []
    hooks = [m.register_forward_hook(lambda mod, i, o: seen.append(i[0].detach()))
             for m in model.features if isinstance(m, nn.ReLU)]
    with torch.no_grad():
        model.features(x)
    for h in hooks:
        h.remove()
    return seen


def _check_model_soundness(model, ref, x, y, lo, hi, point):
    """IBP on ``model`` (its own mode, ``point`` for train BN) against ``ref`` (eval, same statistics)."""
    lb, feats = ibp_logit_difference_bounds(model, lo, hi, y, point=point)
    assert lb.shape == (x.shape[0], 9)
    assert feats.lower.shape == (x.shape[0], model.feature_dim)
    assert (feats.upper >= feats.lower).all()
    # sampled points: uniform, vertices and the box corners
    pts = _samples(lo, hi, n_uniform=250, n_corners=16)
    assert pts.shape[0] * pts.shape[1] >= 1000
    with torch.no_grad():
        f = _eval_samples(ref.features, pts)
        _assert_inside(f, feats.lower, feats.upper)
        z = _eval_samples(ref.head, f)
        d = logit_differences(z.flatten(0, 1), y.repeat(pts.shape[0])).view(pts.shape[0], x.shape[0], -1)
        assert (d >= lb - TOL).all(), f"lb violated by {(lb - d).max().item():.3g}"
    # intermediate (pre-ReLU) boxes hold the pre-activations of the samples too
    flat = pts.flatten(0, 1)
    for (c, r), act in zip(feats.preactivations, _relu_inputs(ref, flat)):
        act = act.view(pts.shape[0], x.shape[0], *act.shape[1:])
        _assert_inside(act, c - r, c + r)
    assert len(feats.preactivations) == sum(isinstance(m, nn.ReLU) for m in model.features)
    # PGD points: against the logit-difference bound (margin) and against random feature directions
    gen = torch.Generator().manual_seed(11)
    attack = PGD(steps=8, step_size=0.25, restarts=2, loss_fn=margin_loss)
    xa = attack(ref, x, y, lo, hi, generator=gen)
    with torch.no_grad():
        assert (logit_differences(ref(xa), y) >= lb - TOL).all()
    probe = _FeatureProbe(ref).eval()  # (a train-mode wrapper would be restored to train, recursively)
    for sign in (1.0, -1.0):
        direction = sign * torch.randn(x.shape[0], model.feature_dim, generator=gen, dtype=D)
        xf = PGD(steps=8, step_size=0.25, loss_fn=lambda out, t, dd=direction: (out * dd).sum(1))(
            probe, x, y, lo, hi, generator=gen)
        with torch.no_grad():
            _assert_inside(ref.features(xf), feats.lower, feats.upper)
    return lb, feats


def _inputs(c, size, eps, n=4, seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, c, size, size, generator=g, dtype=D)
    x[0, :, : size // 2] = 0.0  # boxes clipped at 0 and 1
    x[1, :, size // 2:] = 1.0
    y = torch.randint(0, 10, (n,), generator=g)
    lo, hi = linf_box(x, eps)
    return x, y, lo, hi


@pytest.mark.parametrize("eps", [0.01, 0.05])
@pytest.mark.parametrize("mid, name, c, size, kwargs, mean, std", MODELS, ids=[m[0] for m in MODELS])
def test_model_eval_mode_sound(mid, name, c, size, kwargs, mean, std, eps):
    model = _make_model(name, c, size, kwargs, mean, std).eval()
    x, y, lo, hi = _inputs(c, size, eps)
    before = copy.deepcopy(model.state_dict())
    lb, feats = _check_model_soundness(model, model, x, y, lo, hi, point=None)
    for k, v in model.state_dict().items():  # eval-mode IBP changes nothing
        assert torch.equal(v, before[k]), k
    # a point carried through in eval mode is an ordinary eval forward
    _, f2 = ibp_logit_difference_bounds(model, lo, hi, y, point=x)
    with torch.no_grad():
        torch.testing.assert_close(f2.point_output, model.features(x), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(f2.lower, feats.lower, rtol=0, atol=0)


@pytest.mark.parametrize("mid, name, c, size, kwargs, mean, std", MODELS, ids=[m[0] for m in MODELS])
def test_model_train_mode_sound(mid, name, c, size, kwargs, mean, std):
    model = _make_model(name, c, size, kwargs, mean, std)
    x, y, lo, hi = _inputs(c, size, eps=0.03)
    # as in training: attack in eval mode, then bounds in train mode with the adversarial batch
    x_adv = PGD(steps=3, step_size=0.5)(model.eval(), x, y, lo, hi, generator=torch.Generator().manual_seed(0))
    model.train()
    twin_train = copy.deepcopy(model)
    ref = _batch_stats_twin(model, x_adv)
    lb, feats = _check_model_soundness(model, ref, x, y, lo, hi, point=x_adv)
    assert model.training
    with torch.no_grad():
        train_forward = twin_train.features(x_adv)  # train-mode forward (updates twin's running stats)
    torch.testing.assert_close(feats.point_output, train_forward, rtol=1e-10, atol=1e-10)
    with torch.no_grad():
        torch.testing.assert_close(feats.point_output, ref.features(x_adv), rtol=1e-8, atol=1e-8)
    # the IBP pass updated the running statistics exactly like one train-mode forward
    for (k, v), (k2, v2) in zip(model.state_dict().items(), twin_train.state_dict().items()):
        assert k == k2
        torch.testing.assert_close(v, v2, rtol=1e-12, atol=1e-12)


def test_model_float32_sound():
    model = create_model("cnn7", 3, 16, 10, mean=CIFAR_MEAN, std=CIFAR_STD, width=8, linear=32).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, 3, 16, 16, generator=g)
    y = torch.randint(0, 10, (8,), generator=g)
    lo, hi = linf_box(x, 2 / 255)
    lb, feats = ibp_logit_difference_bounds(model, lo, hi, y)
    pts = _samples(lo, hi, n_uniform=125, n_corners=8)
    with torch.no_grad():
        f = _eval_samples(model.features, pts)
        _assert_inside(f, feats.lower, feats.upper)
        d = logit_differences(model.head(f.flatten(0, 1)), y.repeat(pts.shape[0])).view(pts.shape[0], 8, -1)
    assert (d >= lb - TOL).all()


# --------------------------------------------------------------------------- exactness and tightness

def test_affine_network_zero_width_box_is_exact():
    torch.manual_seed(0)
    bn2, bn1 = _randomize_bn(nn.BatchNorm2d(4), 1), _randomize_bn(nn.BatchNorm1d(6), 2)
    net = nn.Sequential(Normalize(CIFAR_MEAN, CIFAR_STD), nn.Conv2d(3, 4, 3, stride=2, padding=1), bn2,
                        nn.Flatten(), nn.Linear(4 * 3 * 3, 6), bn1).to(D).eval()
    x = torch.rand(5, 3, 6, 6, dtype=D)
    b = interval_bounds(net, x, x)
    with torch.no_grad():
        out = net(x)
    assert torch.equal(b.lower, b.upper)
    torch.testing.assert_close(b.lower, out, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_zero_width_box_is_exact_through_relu_network(mode):
    model = _make_model("cnn7", 3, 16, dict(width=8, linear=32), CIFAR_MEAN, CIFAR_STD).train(mode == "train")
    x, y, _, _ = _inputs(3, 16, 0.01)
    twin = copy.deepcopy(model)
    lb, feats = ibp_logit_difference_bounds(model, x, x, y, point=x)
    with torch.no_grad():
        z = twin(x)
    assert torch.equal(feats.lower, feats.upper)
    torch.testing.assert_close(feats.lower, feats.point_output, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lb, logit_differences(z, y), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_bounds_monotone_under_box_inclusion(mode):
    model = _make_model("cnn7", 3, 16, dict(width=8, linear=32), CIFAR_MEAN, CIFAR_STD).train(mode == "train")
    x, y, lo, hi = _inputs(3, 16, 0.05)
    g = torch.Generator().manual_seed(5)
    a = torch.rand(lo.shape, generator=g, dtype=D) * 0.5
    b = torch.rand(lo.shape, generator=g, dtype=D) * 0.5
    sub_lo, sub_hi = lo + (hi - lo) * a, hi - (hi - lo) * b
    point = (sub_lo + sub_hi) / 2  # same batch statistics for both boxes in train mode
    lb_big, f_big = ibp_logit_difference_bounds(model, lo, hi, y, point=point)
    lb_sub, f_sub = ibp_logit_difference_bounds(model, sub_lo, sub_hi, y, point=point)
    eps = 1e-10
    assert (f_sub.lower >= f_big.lower - eps).all() and (f_sub.upper <= f_big.upper + eps).all()
    assert (lb_sub >= lb_big - eps).all()
    assert (lb_sub > lb_big + 1e-6).float().mean() > 0.5  # genuinely tighter
    for (cb, rb), (cs, rs) in zip(f_big.preactivations, f_sub.preactivations):
        assert (cs - rs >= cb - rb - eps).all() and (cs + rs <= cb + rb + eps).all()


def _trained_ish(seed=0):
    """A few Adam steps of ordinary training on random data, so weights are not i.i.d. anymore."""
    model = _make_model("cnn-small", 1, 12, {}, (0.0,), (1.0,), seed=seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(64, 1, 12, 12, generator=g, dtype=D)
    y = (x.flatten(1)[:, :10].argmax(1))
    model.train()
    for _ in range(10):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def test_elided_bounds_tighter_than_naive():
    model = _trained_ish()
    x, y, lo, hi = _inputs(1, 12, 0.05, n=16)
    lb, feats = ibp_logit_difference_bounds(model, lo, hi, y)
    # naive: IBP through the head, then l_y − u_j
    logits = interval_bounds(nn.Sequential(model.head), feats.lower, feats.upper)
    zl, zu = logits.lower, logits.upper
    naive = zl.gather(1, y[:, None]) - zu
    naive = naive[torch.arange(10)[None].expand(16, -1) != y[:, None]].view(16, 9)
    assert (lb >= naive - 1e-10).all()
    assert (lb > naive + 1e-6).float().mean() > 0.5


def test_elided_bounds_match_merged_specification():
    torch.manual_seed(0)
    head = nn.Linear(7, 5).to(D)
    g = torch.Generator().manual_seed(1)
    lo = torch.rand(6, 7, generator=g, dtype=D)
    hi = lo + torch.rand(6, 7, generator=g, dtype=D)
    y = torch.tensor([0, 1, 2, 3, 4, 2])
    lb = elided_lower_bounds(head, lo, hi, y)
    c = specification_matrix(y, 5).to(D)               # (N, K−1, K)
    wt = c @ head.weight                                # C W
    bt = c @ head.bias                                  # C b
    cen, rad = (hi + lo) / 2, (hi - lo) / 2
    expected = (wt @ cen[..., None]).squeeze(-1) + bt - (wt.abs() @ rad[..., None]).squeeze(-1)
    torch.testing.assert_close(lb, expected, rtol=1e-12, atol=1e-12)
    # exact: attained at the vertex c − r·sign(W̃_j)
    vert = cen[:, None, :] - rad[:, None, :] * wt.sign()  # (N, K−1, m)
    z = head(vert.reshape(-1, 7)).view(6, 4, 5)
    d = torch.stack([logit_differences(z[:, j], y)[:, j] for j in range(4)], dim=1)
    torch.testing.assert_close(d, lb, rtol=1e-12, atol=1e-12)


def test_elided_bounds_head_without_bias():
    torch.manual_seed(0)
    head = nn.Linear(4, 3, bias=False).to(D)
    x = torch.rand(2, 4, dtype=D)
    y = torch.tensor([2, 0])
    torch.testing.assert_close(elided_lower_bounds(head, x, x, y), logit_differences(head(x), y),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_linear_model_bounds_are_attained(mode):
    """With no hidden layer the feature box is exact, so every lb_j is attained at a vertex."""
    torch.manual_seed(0)
    model = create_model("mlp", 2, 3, 10, mean=(0.5,), std=(0.25,), hidden=()).to(D).train(mode == "train")
    x, y, lo, hi = _inputs(2, 3, 0.1, n=6)
    lb, _ = ibp_logit_difference_bounds(model, lo, hi, y, point=x)
    w = model.head.weight  # (K, 18) acting on normalised, flattened inputs
    c, r = ((hi + lo) / 2).flatten(1), ((hi - lo) / 2).flatten(1)
    others = torch.stack([torch.tensor([j for j in range(10) if j != int(t)]) for t in y])
    for k in range(9):
        wd = w[y] - w[others[:, k]]                     # gradient direction of z_y − z_j (σ > 0)
        vert = (c - r * wd.sign()).view_as(x)
        with torch.no_grad():
            d = logit_differences(model(vert), y)[:, k]
        torch.testing.assert_close(d, lb[:, k], rtol=1e-10, atol=1e-10)
