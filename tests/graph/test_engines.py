"""Every engine walks the one graph (certkd.graph): soundness of every layer rule in IBP, CROWN and
the MILP, residual nets included, and the cases where the engines used to disagree."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from certkd.bounds.crown import alpha_crown_bounds, crown_bounds
from certkd.bounds.ibp import ibp_logit_difference_bounds, interval_bounds
from certkd.graph import Network, UnsupportedLayerError, from_module
from certkd.graph.layers import ReLU
from certkd.models.layers import Normalize, Residual

D = torch.float64


def _nets():
    """(name, model, per-sample input shape): every layer type, residual blocks included."""
    torch.manual_seed(0)
    conv = nn.Sequential(
        Normalize((0.1, 0.2), (0.5, 0.7)),
        nn.Conv2d(2, 3, 3, padding="same"), nn.BatchNorm2d(3), nn.ReLU(),
        Residual(nn.Sequential(nn.Conv2d(3, 3, 3, padding=1, dilation=1), nn.ReLU(),
                               nn.Sequential(nn.Conv2d(3, 3, 2, padding="same")))),
        nn.AvgPool2d(2), nn.Identity(), nn.Dropout(0.3),
        nn.Conv2d(3, 4, 3, stride=2, padding=1, dilation=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(16, 6), nn.BatchNorm1d(6), nn.ReLU(),
        Residual(nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6)), nn.Linear(6, 6)),
        nn.ReLU(), nn.Linear(6, 4))
    dilated = nn.Sequential(nn.Conv2d(2, 4, 3, dilation=2, padding=2, groups=2), nn.ReLU(),
                            nn.Conv2d(4, 2, 4, padding="same"), nn.ReLU(), nn.AvgPool2d(3, stride=1, padding=1),
                            nn.Flatten(), nn.Linear(2 * 8 * 8, 3))
    mlp = nn.Sequential(nn.Flatten(), nn.Sequential(nn.Linear(8, 7), nn.ReLU(), nn.Dropout()),
                        Residual(nn.Sequential(nn.Linear(7, 7), nn.ReLU())), nn.ReLU(), nn.Linear(7, 3))
    out = [("conv_residual", conv, (2, 8, 8)), ("dilated_avgpool", dilated, (2, 8, 8)),
           ("mlp_residual", mlp, (8,))]
    for _, m, _ in out:
        for mod in m.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                mod.running_mean.uniform_(-0.3, 0.3)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.data.uniform_(0.5, 1.5)
                mod.bias.data.uniform_(-0.2, 0.2)
        m.eval().double()
    return out


NETS = _nets()


def _box(shape, eps, seed, n=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((n,) + tuple(shape), generator=g, dtype=D)
    return x, (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)


def _samples(lo, hi, k=300, seed=1):
    g = torch.Generator().manual_seed(seed)
    t = torch.rand((k,) + tuple(lo.shape), generator=g, dtype=D)
    t[:50] = t[:50].round()  # vertices
    return lo + t * (hi - lo)


@pytest.mark.parametrize("name,model,shape", NETS, ids=[n for n, _, _ in NETS])
def test_ibp_and_crown_sound_and_consistent(name, model, shape):
    _, lo, hi = _box(shape, 0.05, seed=3)
    net = from_module(model)
    with torch.no_grad():
        ibp = interval_bounds(net, lo, hi)
        out = torch.stack([model(p) for p in _samples(lo, hi)])  # (k, N, K)
        K = out.shape[-1]
        assert (out >= ibp.lower - 1e-9).all() and (out <= ibp.upper + 1e-9).all()
        C = torch.eye(K, dtype=D)
        crown_lo = crown_bounds(model, lo, hi, C=C)
        crown_up = -crown_bounds(model, lo, hi, C=-C)
        assert (out >= crown_lo - 1e-9).all() and (out <= crown_up + 1e-9).all()
        res = crown_bounds(model, lo, hi, C=C, return_intermediate=True)
        ibp_res = crown_bounds(model, lo, hi, C=C, intermediate="ibp", return_intermediate=True)
        for (l1, u1), (l2, u2) in zip(res.intermediate, ibp_res.intermediate):  # CROWN ⊆ IBP
            assert (l1 >= l2 - 1e-9).all() and (u1 <= u2 + 1e-9).all()
        # the plain graph forward is the model's forward
        torch.testing.assert_close(net(lo), model(lo))
    y = model(lo).argmax(1)
    a = alpha_crown_bounds(model, lo, hi, y, iterations=5)
    margins = torch.stack([model(p) for p in _samples(lo, hi)]).detach()
    true = margins.gather(2, y.view(1, -1, 1).expand(margins.shape[0], -1, 1))
    assert (a.min(1).values <= (true - margins).masked_fill(true == margins, 1e9).min(2).values.min(0).values + 1e-9).all()


@pytest.mark.parametrize("name,model,shape", NETS, ids=[n for n, _, _ in NETS])
def test_milp_optimum_within_bounds(name, model, shape):
    pytest.importorskip("highspy")
    from certkd.verification.milp import milp_verify
    x, lo, hi = _box(shape, 0.02, seed=5, n=1)
    model = model.float()
    try:
        xf, lof, hif = x.float(), lo.float(), hi.float()
        y = int(model(xf).argmax(1))
        res = milp_verify(model, xf[0], y, lower=lof[0], upper=hif[0], early_stop=False, timeout=600)  # a loaded CPU needs more than a minute
        assert res.status in ("verified", "falsified")
        ibp_lb, _ = ibp_logit_difference_bounds(model, lof, hif, torch.tensor([y]))
        crown_lb = crown_bounds(model, lof, hif, torch.tensor([y]))
        samples = _samples(lof, hif).float()
        with torch.no_grad():
            z = torch.stack([model(p)[0] for p in samples])
        others = torch.cat([z[:, :y], z[:, y + 1:]], 1)
        sampled = float((z[:, y] - others.max(1).values).min())
        if res.status == "verified":
            assert float(ibp_lb.min()) <= res.margin + 1e-4 and float(crown_lb.min()) <= res.margin + 1e-4
            assert res.margin <= sampled + 1e-4
    finally:
        model.double()


def test_engines_agree_on_former_disagreements():
    """Dropout (IBP raised TypeError), nested Sequential (IBP and MILP failed), padding='same'
    (IBP passed, CROWN crashed): now every engine handles all three."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Sequential(nn.Conv2d(1, 2, 3, padding="same"), nn.ReLU()), nn.Dropout(0.5),
                          nn.Sequential(nn.Flatten(), nn.Sequential(nn.Linear(32, 5), nn.ReLU())),
                          nn.Linear(5, 3)).eval()
    x = torch.rand(1, 1, 4, 4)
    lo, hi = (x - 0.05).clamp(0, 1), (x + 0.05).clamp(0, 1)
    y = model(x).argmax(1)
    ibp = interval_bounds(model, lo, hi)
    assert (ibp.lower <= model(x)).all() and (model(x) <= ibp.upper).all()
    lb = crown_bounds(model, lo, hi, y)
    assert lb.shape == (1, 2)
    pytest.importorskip("highspy")
    from certkd.verification.milp import milp_verify
    res = milp_verify(model, x[0], int(y), lower=lo[0], upper=hi[0], early_stop=False)
    assert res.status in ("verified", "falsified")
    if res.status == "verified":
        assert float(lb.min()) <= res.margin + 1e-5


def test_unsupported_layer_is_one_line_naming_the_node():
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.GELU()))
    with pytest.raises(UnsupportedLayerError) as e:
        from_module(model)
    msg = str(e.value)
    assert "GELU" in msg and "1.0" in msg and "\n" not in msg


def test_fx_traced_residual_module():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(5, 5), nn.Linear(5, 3)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)) + x)

    torch.manual_seed(2)
    m = Block().double().eval()
    net = from_module(m)
    assert isinstance(net, Network) and sum(isinstance(n.rule, ReLU) for n in net.nodes) == 1
    x, lo, hi = _box((5,), 0.1, seed=7)
    torch.testing.assert_close(net(x), m(x))
    lb = crown_bounds(m, lo, hi, C=torch.eye(3, dtype=D))
    out = torch.stack([m(p) for p in _samples(lo, hi)]).detach()
    assert (out >= lb - 1e-9).all()
