"""CROWN-IBP bounds (certkd.bounds.crown_ibp): by hand, equal to the verifier's CROWN over IBP
intermediate bounds, sound on sampled points, and differentiable in the weights."""
import pytest
import torch
from torch import nn

from certkd.bounds import crown_bounds, ibp_logit_difference_bounds, logit_differences
from certkd.bounds.crown_ibp import crown_ibp_bounds
from certkd.models import create_model


def _tiny():
    """2-2-2: z = W1 x, h = relu(z), logits = h (head = identity)."""
    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 1.0], [1.0, -1.0]]))
        net[0].bias.zero_()
        net[2].weight.copy_(torch.eye(2))
        net[2].bias.zero_()
    return net


def test_tiny_network_by_hand():
    # box [0, 1]^2: z1 = x1 + x2 in [0, 2] (active), z2 = x1 - x2 in [-1, 1] (unstable).
    # IBP: h1 in [0, 2], h2 in [0, 1], so z_0 - z_1 = h1 - h2 >= 0 - 1 = -1.
    # CROWN-IBP: h2 <= 0.5 z2 + 0.5 (chord), so h1 - h2 >= z1 - 0.5 z2 - 0.5 = 0.5 x1 + 1.5 x2 - 0.5 >= -0.5.
    lo, hi = torch.zeros(1, 2), torch.ones(1, 2)
    lb_crown, lb_ibp, fb = crown_ibp_bounds(_tiny(), lo, hi, torch.tensor([0]))
    assert lb_ibp.tolist() == [[-1.0]]
    assert lb_crown.tolist() == [[-0.5]]
    # label 1: z_1 - z_0 = h2 - h1 >= (lower slope 1: h2 >= z2) z2 - z1 = -2 x2 >= -2; IBP: 0 - 2 = -2
    lb_crown, lb_ibp, _ = crown_ibp_bounds(_tiny(), lo, hi, torch.tensor([1]))
    assert lb_crown.tolist() == [[-2.0]] and lb_ibp.tolist() == [[-2.0]]


def _bn_model(seed=0):
    torch.manual_seed(seed)
    model = create_model("cnn7-w16", 1, 8, 10)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(32, 1, 8, 8))
    return model


def test_equals_the_verifiers_crown_with_ibp_intermediate_bounds():
    model = _bn_model().eval()
    x = torch.rand(6, 1, 8, 8)
    y = torch.randint(0, 10, (6,))
    lo, hi = (x - 0.02).clamp(min=0), (x + 0.02).clamp(max=1)
    lb_crown, lb_ibp, _ = crown_ibp_bounds(model, lo, hi, y, point=x)
    ref = crown_bounds(model, lo, hi, y, intermediate="ibp")
    assert torch.allclose(lb_crown, ref, rtol=1e-4, atol=1e-4)
    assert torch.allclose(lb_ibp, ibp_logit_difference_bounds(model, lo, hi, y)[0])


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_sound_on_sampled_points(mode):
    model = _bn_model(1)
    model.train(mode == "train")
    x = torch.rand(4, 1, 8, 8)
    y = torch.randint(0, 10, (4,))
    lo, hi = (x - 0.03).clamp(min=0), (x + 0.03).clamp(max=1)
    with torch.no_grad():
        lb_crown, _, _ = crown_ibp_bounds(model, lo, hi, y, point=x)
        for _ in range(50):
            s = lo + (hi - lo) * torch.rand_like(x)
            if mode == "eval":
                d = logit_differences(model(s), y)
            else:  # the network the bound describes: BN normalised by the point's batch statistics
                d = ibp_logit_difference_bounds(model, s, s, y, point=x)[0]
            assert (d >= lb_crown - 1e-4).all()


def test_train_mode_bn_uses_the_points_statistics_and_updates_running_stats_once():
    model = _bn_model(2)
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    x = torch.rand(4, 1, 8, 8)
    before = bn.num_batches_tracked.item()
    crown_ibp_bounds(model, x, x, torch.zeros(4, dtype=torch.long), point=x)
    assert bn.num_batches_tracked.item() == before + 1
    assert not hasattr(bn, "__dict__") or "forward_with_stats" not in bn.__dict__  # the recorder is gone
    with pytest.raises(ValueError, match="point"):
        crown_ibp_bounds(model, x, x, torch.zeros(4, dtype=torch.long))


def test_gradient_matches_finite_differences():
    torch.manual_seed(6)  # a seed with unstable neurons in both layers (CROWN-IBP tighter than IBP)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3)).double()
    x = torch.rand(2, 3, dtype=torch.float64)
    y = torch.tensor([0, 2])
    lo, hi = x - 0.3, x + 0.3
    w = net[2].weight
    lb, lb_ibp, _ = crown_ibp_bounds(net, lo, hi, y)
    assert (lb - lb_ibp).sum() > 0.1
    (g,) = torch.autograd.grad(lb.sum(), w)
    assert (g != 0).sum() >= 8
    h = 1e-6
    for i, j in [(i, j) for i in range(4) for j in range(4)]:
        with torch.no_grad():
            w[i, j] += h
            up = crown_ibp_bounds(net, lo, hi, y)[0].sum()
            w[i, j] -= 2 * h
            down = crown_ibp_bounds(net, lo, hi, y)[0].sum()
            w[i, j] += h
        assert abs((up - down).item() / (2 * h) - g[i, j].item()) < 1e-5


def test_verification_still_reads_parameters_detached():
    model = _bn_model(4).eval()
    x = torch.rand(2, 1, 8, 8)
    lb = crown_bounds(model, x - 0.01, x + 0.01, torch.tensor([1, 2]), intermediate="ibp")
    assert not lb.requires_grad


@pytest.mark.parametrize("eps_sched,start,end,margin", [(0.5, 1.0, 0.0, -0.75), (1.0, 1.0, 0.0, -1.0),
                                                         (0.25, 1.0, 1.0, 0.25), (0.5, 0.0, 1.0, -0.75)])
def test_crown_ibp_method_loss_by_hand(eps_sched, start, end, margin):
    """The tiny network above as a CertifiableNet; box [0, 1]^2 for every ε_s >= 0.5 (clipped).

    β = start + (end - start)·ε_s/ε; the bound β·(-0.5) + (1 - β)·(-1) enters log(1 + e^{-bound}).
    ε_s = 0.25 gives the box [0.25, 0.75]^2: z2 in [-0.5, 0.5], chord h2 <= 0.5 z2 + 0.25, so CROWN-IBP
    z1 - 0.5 z2 - 0.25 = 0.5 x1 + 1.5 x2 - 0.25 >= 0.125 + 0.375 - 0.25 = 0.25.
    """
    from certkd.attacks import PGD
    from certkd.config import TrainConfig
    from certkd.models import CertifiableNet, ModelSpec, Normalize
    from certkd.training import training_loss

    net = _tiny()
    model = CertifiableNet(nn.Sequential(Normalize([0.0], [1.0]), net[0], net[1]), net[2], ModelSpec("tiny", 1, 2, 2))
    cfg = TrainConfig(method="crown-ibp", eps=1.0, reg_lambda=0.0, crown_ibp_beta_start=start, crown_ibp_beta_end=end)
    loss, logs = training_loss(model.train(), torch.tensor([[0.5, 0.5]]), torch.tensor([0]), cfg, eps_sched, False,
                               PGD(1, 10.0))
    assert loss.item() == pytest.approx(torch.log1p(torch.exp(torch.tensor(-margin))).item(), rel=1e-6)
    assert logs["crown_weight"] == pytest.approx(start + (end - start) * eps_sched)


def test_gradient_through_train_mode_batchnorm_matches_finite_differences():
    """With train-mode BN the bound depends on the weights also through the point's batch statistics."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(32, 5),
                        nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3)).double().train()
    x = torch.rand(4, 1, 6, 6, dtype=torch.float64)
    y = torch.tensor([0, 2, 1, 0])
    lo, hi = x - 0.1, x + 0.1
    w = net[0].weight
    lb, lb_ibp, _ = crown_ibp_bounds(net, lo, hi, y, point=x)
    assert (lb - lb_ibp).sum() > 1.0
    (g,) = torch.autograd.grad(lb.sum(), w)
    h = 1e-6
    for idx in [(0, 0, 0, 0), (1, 0, 1, 2), (0, 0, 2, 1), (1, 0, 2, 2)]:
        with torch.no_grad():
            w[idx] += h
            up = crown_ibp_bounds(net, lo, hi, y, point=x)[0].sum()
            w[idx] -= 2 * h
            down = crown_ibp_bounds(net, lo, hi, y, point=x)[0].sum()
            w[idx] += h
        assert abs((up - down).item() / (2 * h) - g[idx].item()) < 1e-6
