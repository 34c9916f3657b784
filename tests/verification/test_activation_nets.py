"""End to end on small random Tanh, Sigmoid and LeakyReLU networks (issue #22).

No ``unsat`` may be contradicted by sampling; a ``sat`` must be a real counterexample. LeakyReLU
is piecewise linear, so its answers must be complete and agree with the MILP; Sigmoid and Tanh
have no exact encoding, so the MILP refuses them in one line and branch and bound leaves what
the bounds cannot decide ``unknown``.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from certkd.graph.layers import UnsupportedLayerError
from certkd.verification.api import verify_model
from certkd.verification.milp import milp_verify

ACTS = {"tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "leaky": lambda: nn.LeakyReLU(0.1)}


def _net(act: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 12), ACTS[act](), nn.Linear(12, 12), ACTS[act](), nn.Linear(12, 3)).eval()


def _cases(model, n=4, seed=0, radii=(0.02, 0.1, 0.4)):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.rand(4, generator=g)
        label = int(model(x.unsqueeze(0)).argmax())
        for eps in radii:
            yield x, label, x - eps, x + eps


def _sampled_min_margin(model, label, lo, hi, k=4000):
    g = torch.Generator().manual_seed(1)
    t = torch.rand(k, 4, generator=g)
    t[: k // 4] = t[: k // 4].round()
    with torch.no_grad():
        y = model(lo + t * (hi - lo))
    others = [j for j in range(3) if j != label]
    return float((y[:, label:label + 1] - y[:, others]).min())


@pytest.mark.parametrize("act", sorted(ACTS))
def test_no_unsat_contradicted_and_sat_is_real(act):
    model = _net(act, seed=5)
    seen = set()
    for x, label, lo, hi in _cases(model):
        res = verify_model(model, lo, hi, label, timeout=20, attack_restarts=5, attack_steps=20)
        seen.add(res.status)
        if res.status == "unsat":
            assert _sampled_min_margin(model, label, lo, hi) > 0
        elif res.status == "sat":
            xs = torch.as_tensor(res.x, dtype=torch.float32)
            assert bool(((xs >= lo) & (xs <= hi)).all())
            out = model(xs.unsqueeze(0))[0]
            assert float(out[label]) <= float(max(out[j] for j in range(3) if j != label))
        else:
            assert act != "leaky", f"LeakyReLU is complete, got {res.status}: {res.note}"
    assert "unsat" in seen and "sat" in seen, seen  # the cases exercise both answers


def test_leaky_relu_answers_agree_with_the_milp():
    seen = set()
    for seed in (6, 8):  # a robust network (BaB proves the wide boxes) and one with counterexamples
        model = _net("leaky", seed=seed)
        for x, label, lo, hi in _cases(model, n=2, seed=2, radii=(0.3, 1.0)):
            # the proof engines alone: no attack, so BaB and its MILP leaves decide
            res = verify_model(model, lo, hi, label, timeout=20, attack_restarts=0)
            milp = milp_verify(model, x, label, lower=lo, upper=hi, timeout=20)
            assert milp.status in ("verified", "falsified")
            assert res.status == {"verified": "unsat", "falsified": "sat"}[milp.status], (res, milp.status)
            seen.add((res.status, res.stage))
    assert {("unsat", "bab"), ("sat", "bab"), ("unsat", "crown")} <= seen, seen


def test_leaky_relu_milp_optimum_is_the_true_minimum():
    """The exact MILP's minimum margin equals the sampled one up to sampling (never above it)."""
    model = _net("leaky", seed=7)
    x = torch.full((4,), 0.5)
    label = int(model(x.unsqueeze(0)).argmax())
    lo, hi = x - 0.05, x + 0.05
    res = milp_verify(model, x, label, lower=lo, upper=hi, timeout=20, early_stop=False)
    sampled = _sampled_min_margin(model, label, lo, hi, k=20000)
    assert res.margin is not None and res.margin <= sampled + 1e-6
    assert res.margin >= sampled - 0.05 * (1 + abs(sampled))


def _twin(act: str) -> nn.Module:
    """margin = 3·f(10x) − 3·f(10x) + 0.5 = 0.5 > 0 on every input, but two copies of one neuron
    relaxed independently leave a gap the linear bounds cannot close on a wide box."""
    first, head = nn.Linear(1, 2), nn.Linear(2, 2)
    with torch.no_grad():
        first.weight.fill_(10.0)
        first.bias.zero_()
        head.weight.copy_(torch.tensor([[3.0, -3.0], [0.0, 0.0]]))
        head.bias.copy_(torch.tensor([0.5, 0.0]))
    return nn.Sequential(first, ACTS[act](), head).eval()


@pytest.mark.parametrize("act", ["sigmoid", "tanh"])
def test_milp_refuses_smooth_activations_in_one_line(act):
    with pytest.raises(UnsupportedLayerError) as e:
        milp_verify(_twin(act), torch.zeros(1), 0, lower=torch.full((1,), -1.0), upper=torch.ones(1), timeout=5)
    msg = str(e.value)
    assert "\n" not in msg and "MILP" in msg and {"sigmoid": "Sigmoid", "tanh": "Tanh"}[act] in msg


@pytest.mark.parametrize("act", ["sigmoid", "tanh"])
def test_undecided_smooth_network_answers_unknown(act):
    """A true property the bounds cannot prove: unknown (branch and bound has nothing to split and no
    MILP leaf), never unsat by mistake and never sat."""
    res = verify_model(_twin(act), torch.full((1,), -1.0), torch.ones(1), 0, timeout=10)
    assert res.status == "unknown", res
    assert "MILP" in res.note and res.stage == "bab"
