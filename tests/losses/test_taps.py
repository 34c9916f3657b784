"""TAPS parts (certkd.losses.taps): the split, the latent PGD, the gradient connector by hand,
the gradient expanding factor."""
import pytest
import torch
from torch import nn

from certkd.bounds import interval_bounds, logit_differences
from certkd.errors import CertkdError
from certkd.losses import taps as T
from certkd.models import CertifiableNet, ModelSpec, Normalize, create_model


def tiny_taps_net() -> CertifiableNet:
    """x in [0, 1]^2 -> h = relu(2 x1, x2) (extractor) -> g = relu(h1 + h2 - 1, h1 - 1) -> logits g.

    With label 0 the margin is g1 - g2 >= 0 everywhere (relu is monotone and h2 >= 0), while IBP on
    the latent box h in [0, 2] x [0, 1] gives g1 in [0, 2], g2 in [0, 1], so the bound 0 - 1 = -1.
    """
    features = nn.Sequential(Normalize([0.0], [1.0]), nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2), nn.ReLU())
    head = nn.Linear(2, 2)
    with torch.no_grad():
        features[1].weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 1.0]]))
        features[1].bias.zero_()
        features[3].weight.copy_(torch.tensor([[1.0, 1.0], [1.0, 0.0]]))
        features[3].bias.fill_(-1.0)
        head.weight.copy_(torch.eye(2))
        head.bias.zero_()
    return CertifiableNet(features, head, ModelSpec("tiny", 1, 2, 2))


def test_split_points():
    model = create_model("cnn7-w16", 1, 8, 10)
    relus = [i for i, m in enumerate(model.features) if isinstance(m, nn.ReLU)]
    ext, cls = T.split_network(model, 1)
    assert len(ext) == relus[-2] + 1 and ext[-1] is model.features[relus[-2]]
    assert cls.head is model.head and len(cls.features) == len(model.features) - len(ext)
    assert all(a is b for a, b in zip(T.split_network(model, 1)[0], ext))  # the same modules each call, no copy
    ext2, cls2 = T.split_network(model, 2)
    assert len(ext2) == relus[-3] + 1
    x = torch.rand(3, 1, 8, 8)
    model.eval()
    assert torch.allclose(cls2(ext2(x)), model(x))
    ext_all, _ = T.split_network(model, len(relus))
    assert len(ext_all) == 1 and isinstance(ext_all[0], Normalize)
    assert not any(m is cls for m in model.modules())  # the split is not registered on the model
    with pytest.raises(CertkdError, match=r"taps_head_relus=9, .* 6 top-level ReLU.*1 <= N <= 6"):
        T.split_network(model, 9)


def test_pivotal_points_find_the_margin_the_box_bound_misses():
    model = tiny_taps_net()
    ext, cls = T.split_network(model, 1)
    lo, hi = torch.zeros(1, 2), torch.ones(1, 2)
    latent = interval_bounds(ext, lo, hi, lo)
    assert latent.lower.tolist() == [[0.0, 0.0]] and latent.upper.tolist() == [[2.0, 1.0]]
    y = torch.tensor([0])
    torch.manual_seed(0)
    pts = T.pivotal_points(cls, latent.lower, latent.upper, y, steps=2, step_size=2.0)
    assert pts.shape == (1, 1, 2)
    lb, margins, _ = T.head_bounds(cls, latent, pts, y)
    assert lb.tolist() == [[-1.0]]  # IBP through the classifier
    assert margins.tolist() == [[0.0]]  # the true minimum, found by the latent PGD
    assert margins.item() == logit_differences(cls(pts[:, 0]), y).item()


def test_head_bounds_take_each_points_own_target():
    torch.manual_seed(0)
    model = create_model("cnn-small", 1, 8, 10).train()
    ext, cls = T.split_network(model, 1)
    x = torch.rand(3, 1, 8, 8)
    latent = interval_bounds(ext, (x - 0.1).clamp(min=0), (x + 0.1).clamp(max=1), x)
    y = torch.tensor([0, 5, 9])
    pts = T.pivotal_points(cls, latent.lower, latent.upper, y, steps=3, step_size=0.5)
    assert ((pts >= latent.lower.unsqueeze(1)) & (pts <= latent.upper.unsqueeze(1))).all()
    lb, margins, fb = T.head_bounds(cls, latent, pts, y)
    cls.eval()  # no BN in cnn-small: eval and train agree
    for n in range(3):
        for i in range(9):
            d = logit_differences(cls(pts[n, i:i + 1]), y[n:n + 1])
            assert torch.allclose(margins[n, i], d[0, i], atol=1e-5)
    assert (margins >= lb - 1e-5).all() and fb.lower.shape[0] == 3


def test_gradient_connector_by_hand():
    lo = torch.tensor([[0.0, 0.0]], requires_grad=True)
    hi = torch.tensor([[2.0, 1.0]], requires_grad=True)
    pts = torch.tensor([[[2.0, 0.25], [1.5, 1.0]]])  # two points of one sample
    out = T.RectifiedLinearLink.apply(lo, hi, pts, 0.5, 1e-5)
    assert torch.equal(out, pts)
    (out * torch.tensor([[[3.0, 4.0], [2.0, 1.0]]])).sum().backward()
    # slack = 0.5 * (u - l) = (1, 0.5); u-side threshold u - slack = (1, 0.5), l-side l + slack = (1, 0.5).
    # point 1: x1 = 2 -> weight (2 - 1)/1 = 1 to u1; x2 = 0.25 -> weight (0.5 - 0.25)/0.5 = 0.5 to l2.
    # point 2: x1 = 1.5 -> 0.5 to u1; x2 = 1 -> 1 to u2.
    assert hi.grad.tolist() == [[3.0 * 1 + 2.0 * 0.5, 1.0 * 1]]
    assert lo.grad.tolist() == [[0.0, 4.0 * 0.5]]


def test_scale_grad():
    t = torch.tensor(2.0, requires_grad=True)
    out = T.scale_grad(t * t, 5.0) * 3.0
    assert out.item() == 12.0
    out.backward()
    assert t.grad.item() == 5.0 * 3.0 * 2 * 2.0


def _taps_loss(model, cfg, eps_sched):
    from certkd.attacks import PGD
    from certkd.training import training_loss

    x, y = torch.tensor([[0.5, 0.5]]), torch.tensor([0])
    return training_loss(model, x, y, cfg, eps_sched, False, PGD(1, 10.0))


def test_taps_method_loss_by_hand():
    from certkd.config import TrainConfig

    # box [0, 1]^2 (x = (0.5, 0.5), ε = 0.5): the TAPS margin is 0 (test above), the IBP bound -1, so
    # L = L_TAPS · L_IBP = log(1 + e^0) · log(1 + e^1).
    cfg = TrainConfig(method="taps", eps=1.0, reg_lambda=0.0, l1=0.0, taps_steps=2, taps_step_size=2.0)
    torch.manual_seed(0)
    loss, logs = _taps_loss(tiny_taps_net().train(), cfg, 0.5)
    expected = torch.log(torch.tensor(2.0)) * torch.log1p(torch.exp(torch.tensor(1.0)))
    assert torch.allclose(loss, expected, rtol=1e-6)
    assert logs["taps_loss"] == pytest.approx(0.6931472) and logs["ibp_loss"] == pytest.approx(1.3132616)


def test_taps_gradient_expanding_factor_scales_the_taps_term_only():
    from certkd.config import TrainConfig

    grads = {}
    for w in (1.0, 2.0, 5.0):
        model = tiny_taps_net().train()
        cfg = TrainConfig(method="taps", eps=1.0, reg_lambda=0.0, l1=0.0, taps_steps=2, taps_step_size=2.0,
                          taps_grad_scale=w)
        torch.manual_seed(0)
        loss, _ = _taps_loss(model, cfg, 0.5)
        loss.backward()
        grads[w] = torch.cat([p.grad.flatten() for p in model.parameters()])
    # ∇L = w · L_IBP · ∇L_TAPS + L_TAPS · ∇L_IBP: linear in w, and the TAPS part is not zero
    assert not torch.allclose(grads[5.0], grads[1.0])
    assert torch.allclose(grads[5.0] - grads[1.0], 4 * (grads[2.0] - grads[1.0]), atol=1e-6)
