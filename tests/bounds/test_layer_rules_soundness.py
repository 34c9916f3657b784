"""Every registered activation rule inside networks: sampled inputs of the box stay within EVERY
intermediate bound of IBP (every node), CROWN and α-CROWN (every activation's pre-activation
bounds and the ``post_box`` of them), not only within the final bounds (issue #22: a wrong
post-activation box passed tests that compared samples with the final bounds alone)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from certkd.bounds.crown import alpha_crown_bounds, crown_bounds
from certkd.bounds.ibp import walk_intervals
from certkd.graph import from_module
from certkd.graph.layers import Activation
from certkd.graph.layers.base import _REGISTRY

ACTIVATIONS = sorted({cls for cls in _REGISTRY.values() if issubclass(cls, Activation)}, key=lambda c: c.__name__)
MODULES = [cls.module_types[0]() for cls in ACTIVATIONS] + [nn.LeakyReLU(0.3)]


def test_the_new_activations_are_registered():
    assert {"ReLU", "LeakyReLU", "Sigmoid", "Tanh"} <= {c.__name__ for c in ACTIVATIONS}


def _mlp(act):
    return nn.Sequential(nn.Linear(6, 10), act, nn.Linear(10, 10), act, nn.Linear(10, 10), act, nn.Linear(10, 3))


def _cnn(act):
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), act, nn.Conv2d(3, 4, 3, stride=2, padding=1), act,
                         nn.Conv2d(4, 4, 3, padding=1), act, nn.Flatten(), nn.Linear(64, 5), act, nn.Linear(5, 3))


def _node_values(net, x):
    vals = [x]
    for node in net.nodes[1:]:
        vals.append(node.rule.forward(*[vals[j] for j in node.inputs]))
    return vals


def _inside(v, lo, hi, what, tol=1e-9):
    assert bool((v >= lo - tol).all()), f"{what}: below by {float((lo - v).max()):.3g}"
    assert bool((v <= hi + tol).all()), f"{what}: above by {float((v - hi).max()):.3g}"


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
@pytest.mark.parametrize("act", MODULES, ids=[repr(m) for m in MODULES])
def test_samples_within_every_intermediate_bound(act, arch):
    torch.manual_seed(3)
    model = (_mlp if arch == "mlp" else _cnn)(act).double().eval()
    shape = (6,) if arch == "mlp" else (1, 8, 8)
    x = torch.rand(2, *shape, dtype=torch.float64)
    lo, hi = x - 0.25, x + 0.25
    net = from_module(model)
    g = torch.Generator().manual_seed(4)
    t = torch.rand(300, *x.shape, generator=g, dtype=torch.float64)
    t[:100] = t[:100].round()  # vertices of the box too
    pts = (lo + t * (hi - lo)).reshape(-1, *shape)  # (300·N, *shape): sample j of box n is row j·N + n
    vals = [v.reshape(300, 2, *v.shape[1:]) for v in _node_values(net, pts)]
    acts = net.activation_nodes()

    # IBP: every node's box
    c, r = (hi + lo) / 2, (hi - lo) / 2
    for i in range(1, len(net.nodes)):
        ci, ri, _ = walk_intervals(net, c, r, stop=i)
        _inside(vals[i], ci - ri, ci + ri, f"IBP node {i} ({net.nodes[i].name})")

    # CROWN and α-CROWN: every activation's pre-activation bounds and its post_box, then the final bounds
    labels = torch.tensor([0, 1])
    results = {"crown": crown_bounds(model, lo, hi, labels, return_intermediate=True),
               "alpha": alpha_crown_bounds(model, lo, hi, labels, iterations=5, return_intermediate=True)}
    for name, res in results.items():
        assert len(res.intermediate) == len(acts)
        for k, i in enumerate(acts):
            l, u = res.intermediate[k]
            rule, src = net.nodes[i].rule, net.nodes[i].inputs[0]
            _inside(vals[src], l, u, f"{name} pre-activation {k}")
            post_lo, post_hi = rule.post_box(l, u)
            _inside(vals[i], post_lo, post_hi, f"{name} post-activation {k}")
        out = vals[-1]
        margins = torch.stack([out[:, n, labels[n]].unsqueeze(1) - out[:, n, [j for j in range(3) if j != labels[n]]]
                               for n in range(2)], 1)  # (300, 2, 2)
        assert bool((margins >= res.lower.unsqueeze(0) - 1e-9).all()), name
    assert bool((results["alpha"].lower >= results["crown"].lower - 1e-9).all())
