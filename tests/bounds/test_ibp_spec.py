"""Soundness of ``ibp_spec_lower_bounds`` (a general specification matrix C, the last Linear merged):
sampled points of the box never fall below the bound, and with C(y) it equals the label version."""
from __future__ import annotations

import torch
from torch import nn

from certkd.bounds.ibp import ibp_logit_difference_bounds, ibp_spec_lower_bounds
from certkd.bounds.spec import specification_matrix


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 6), nn.ReLU(),
                         nn.Linear(6, 4)).eval()


def test_sampled_points_lie_above_the_bound():
    gen = torch.Generator().manual_seed(0)
    for seed in range(5):
        net = _net(seed)
        x = torch.rand(1, 1, 4, 4, generator=gen)
        lo, hi = x - 0.2, x + 0.2
        C = torch.randn(7, 4, generator=gen)
        with torch.no_grad():
            lb = ibp_spec_lower_bounds(net, lo, hi, C)[0]
            pts = lo + (hi - lo) * torch.rand(2000, 1, 4, 4, generator=gen)
            vals = net(pts) @ C.T
        assert (vals >= lb - 1e-5).all()
        assert (vals.min(0).values - lb).min() < 5.0  # the bound is not vacuous


def test_equals_the_label_version_with_the_label_matrix():
    net = _net(0)
    x = torch.rand(1, 1, 4, 4)
    y = torch.tensor([2])
    with torch.no_grad():
        ref = ibp_logit_difference_bounds(net, x - 0.1, x + 0.1, y)[0][0]
        got = ibp_spec_lower_bounds(net, x - 0.1, x + 0.1, specification_matrix(y, 4)[0])[0]
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
