"""Random-network soundness fuzz of ``verify_model`` with the attack off (issue #19, Done when).

Each seeded case is a small random ReLU MLP in float32 or float64, a random box and a random
property whose thresholds sit on ties and near-ties: two output rows with identical weights, rows one
ulp apart, and thresholds equal (or one ulp off) to the network's own value at the centre or a corner
of the box. PGD and the corner probes are off, so only the proof engines (IBP, CROWN, α-CROWN, BaB
with MILP leaves) answer. For every answer:

* ``unsat``: no point of dense sampling (4,096 random points, every corner, the centre), evaluated by
  the module in its own precision, violates the property; and the exact MILP minimum of each refuted
  disjunct's margin is not negative (beyond the solver's 1e-6 tolerance);
Thresholds just below the smallest sampled value of an output sit next to its true minimum, where an
unsound bound would show. Counts of each answer are asserted, so a generator that stopped producing
``unsat`` (or ``sat``) answers would fail the test rather than test nothing.

* ``sat``: the counterexample lies in the box and violates the property in the network's precision.
"""
from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
import torch
from torch import nn

import certkd
from certkd.verification.milp import milp_verify
from certkd.verification.onnx_verify import spec_network
from certkd.verification.vnnlib import parse_vnnlib

pytest.importorskip("highspy")

N_CASES = 30  # per precision


def _net(rng: random.Random, dtype: torch.dtype) -> nn.Sequential:
    d, k = rng.choice([2, 3]), rng.choice([2, 3])
    widths = [d] + [rng.choice([3, 4, 6]) for _ in range(rng.choice([1, 2]))] + [k]
    layers: list = []
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    net = nn.Sequential(*layers[:-1]).to(dtype).eval()
    last = net[-1]
    with torch.no_grad():
        tie = rng.random()
        if tie < 0.35:  # an exact tie: rows 0 and 1 compute the same function
            last.weight[1] = last.weight[0]
            last.bias[1] = last.bias[0]
        elif tie < 0.6:  # a near-tie: one ulp apart
            last.weight[1] = torch.nextafter(last.weight[0], torch.full_like(last.weight[0], 2.0))
            last.bias[1] = last.bias[0]
    return net


def _property(rng: random.Random, net: nn.Sequential, lo: np.ndarray, hi: np.ndarray, dtype: torch.dtype) -> str:
    d, k = len(lo), net[-1].out_features
    lines = [f"(declare-const X_{i} Real)" for i in range(d)] + [f"(declare-const Y_{j} Real)" for j in range(k)]
    for i in range(d):
        lines += [f"(assert (>= X_{i} {float(lo[i])!r}))", f"(assert (<= X_{i} {float(hi[i])!r}))"]
    kind = rng.random()
    if kind < 0.3:  # "class 0 is not the strict winner": the ties make this borderline
        lines.append("(assert (or " + " ".join(f"(and (>= Y_{j} Y_0))" for j in range(1, k)) + "))")
    elif kind < 0.65:  # just below the smallest sampled value of an output: near the true minimum
        gen = torch.Generator().manual_seed(rng.randrange(10 ** 6))
        x = lo + (hi - lo) * torch.rand(2048, len(lo), generator=gen, dtype=torch.float64).numpy()
        corners = np.array(list(itertools.product(*zip(lo, hi))))
        with torch.no_grad():
            y = net(torch.tensor(np.concatenate([x, corners]), dtype=dtype)).double().numpy()
        j = rng.randrange(k)
        t = float(y[:, j].min()) - rng.choice([0.0, 1e-7, 1e-4, 1e-2])
        t = float(np.nextafter(t, -np.inf)) if rng.random() < 0.5 else t
        lines.append(f"(assert (<= Y_{j} {t!r}))")
    else:  # a threshold at the network's own value at the centre or a corner, or one ulp off
        where = rng.choice(["centre", "corner"])
        x = (lo + hi) / 2 if where == "centre" else np.where(np.array([rng.random() < 0.5 for _ in lo]), lo, hi)
        with torch.no_grad():
            y = net(torch.tensor(x, dtype=dtype).unsqueeze(0))[0].double().numpy()
        j = rng.randrange(k)
        t = float(y[j])
        t = {0: t, 1: float(np.nextafter(t, np.inf)), 2: float(np.nextafter(t, -np.inf))}[rng.randrange(3)]
        lines.append(f"(assert (<= Y_{j} {t!r}))" if rng.random() < 0.5 else f"(assert (>= Y_{j} {t!r}))")
    return "\n".join(lines) + "\n"


def _dense_violations(net: nn.Sequential, prop, dtype: torch.dtype, seed: int) -> int:
    lo, hi = prop.lower, prop.upper
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(4096, len(lo), generator=gen, dtype=torch.float64).numpy()
    corners = np.array(list(itertools.product(*zip(lo, hi))))
    pts = np.concatenate([lo + (hi - lo) * u, corners, ((lo + hi) / 2)[None]])
    x = torch.tensor(pts, dtype=dtype)
    x = torch.max(torch.min(x, torch.tensor(hi, dtype=dtype)), torch.tensor(lo, dtype=dtype))
    with torch.no_grad():
        ys = net(x).double().numpy()
    return sum(prop.violated_by(y) for y in ys if prop.contains(x[0].double().numpy()))


def _milp_minimum(net: nn.Sequential, prop, row: int, dtype: torch.dtype) -> float:
    """The exact minimum over the box of margin ``row`` (A y − b), by MILP, early stop off."""
    from certkd.graph import from_module

    snet = spec_network(from_module(net), prop.rows[[row]], prop.offsets[[row]], (len(prop.lower),))
    lo = torch.tensor(prop.lower, dtype=dtype)
    hi = torch.tensor(prop.upper, dtype=dtype)
    res = milp_verify(snet, (lo + hi) / 2, 0, lower=lo, upper=hi, timeout=30, early_stop=False, margin_tol=0.0)
    if res.status == "falsified":
        return float(res.margin)
    assert res.margin is not None, res.note
    return float(res.margin)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_no_unsound_answer_on_random_networks(dtype):
    answers = {}
    for seed in range(N_CASES):
        rng = random.Random(1000 * seed + (64 if dtype == torch.float64 else 32))
        torch.manual_seed(seed)
        net = _net(rng, dtype)
        d = net[0].in_features
        centre = np.array([rng.uniform(-1, 1) for _ in range(d)])
        radius = np.array([rng.choice([0.0, 1e-3, 0.05, 0.3]) for _ in range(d)])
        lo, hi = centre - radius, centre + radius
        if dtype == torch.float32:  # float32-representable boxes, so the float32 network sees them exactly
            lo, hi = lo.astype(np.float32).astype(np.float64), hi.astype(np.float32).astype(np.float64)
        prop = parse_vnnlib(_property(rng, net, lo, hi, dtype), f"<case {seed}>")
        res = certkd.verify_model(net, spec=prop, timeout=10, attack_restarts=0)
        answers[res.status] = answers.get(res.status, 0) + 1
        if res.status == "unsat":
            assert _dense_violations(net, prop, dtype, seed) == 0, f"case {seed}: sampled counterexample"
            for dj, (A, b) in enumerate(prop.matrices):
                mins = [_milp_minimum(net, prop, int(r), dtype) for r in np.nonzero(prop.owner == dj)[0]]
                assert max(mins) > -1e-6, f"case {seed}: disjunct {dj} has an exact counterexample ({mins})"
        elif res.status == "sat":
            assert prop.contains(res.x)
            with torch.no_grad():
                y = net(torch.tensor(res.x, dtype=dtype).unsqueeze(0))[0].double().numpy()
            assert prop.violated_by(y), f"case {seed}: the counterexample does not violate the property"
    print(f"{dtype}: {answers}")
    # the fuzz exercises both answers (it can fail: a generator producing only one kind would not test much)
    assert answers.get("unsat", 0) >= 3 and answers.get("sat", 0) >= 3, answers
