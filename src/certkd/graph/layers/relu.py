"""ReLU: every engine's rule (interval, triangle relaxation, big-M MILP encoding); see ``docs/adding_a_layer.md``."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor, nn

from certkd.graph.layers.activation import Activation, Relaxation
from certkd.graph.layers.base import register


def _grad_through(*ts: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in ts)


@register
class ReLU(Activation):
    module_types = (nn.ReLU,)
    splittable = True
    exact_lipschitz = 1.0  # max(x, 0) rounds nothing, and |relu(a) - relu(b)| <= |a - b|

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(x)

    def evaluate(self, z: np.ndarray) -> np.ndarray:
        return np.maximum(z, 0.0)

    def interval(self, c: Tensor, r: Tensor, p: Optional[Tensor] = None):
        # upper, lower = relu(c ± r); centre/radius = (upper ± lower) / 2 (·0.5 is exact, as /2).
        # Fresh temporaries are modified in place; c and r are kept (the recorded pre-activations),
        # and relu's saved output is left intact when autograd records.
        upper = torch.add(c, r).relu_()
        lower = torch.sub(c, r).relu_()
        center = torch.add(upper, lower).mul_(0.5)
        radius = (torch.sub(upper, lower) if _grad_through(upper, lower) else upper.sub_(lower)).mul_(0.5)
        return center, radius, (torch.relu(p) if p is not None else None)

    def loose(self, l, u):
        return (l < 0) & (u > 0)

    def relax(self, l: Tensor, u: Tensor) -> Relaxation:
        """Triangle: upper = chord u/(u−l)·(z−l), lower = α·z with α ∈ [0, 1] (CROWN: 1 if u ≥ −l
        else 0) on unstable neurons; slope 1 (active) or 0 (inactive) elsewhere."""
        active = l >= 0
        unstable = self.loose(l, u)
        width = torch.where(unstable, u - l, torch.ones_like(u))
        chord = u / width
        upper_slope = torch.where(unstable, chord, active.to(l.dtype))
        upper_bias = torch.where(unstable, -l * chord, torch.zeros_like(l))
        adaptive = (u >= -l).to(l.dtype)
        lower_slope = torch.where(unstable, adaptive, active.to(l.dtype))
        return Relaxation(lower_slope, upper_slope, upper_bias, unstable,
                          alpha_init=lower_slope if bool(unstable.any()) else None)

    def encode_milp(self, milp, pre, l, u, lp, up):
        """Inactive (u ≤ 0): no variable, the constant 0. Active (l ≥ 0): the output is z. Unstable:
        h ∈ [0, u] and a binary a with h ≥ z, h ≤ z − l(1 − a), h ≤ u·a (Tjeng et al. 2019)."""
        inactive, active = u <= 0, l >= 0
        z = pre(~inactive)
        post = np.full(l.size, -1)
        post[active] = z[active]
        uns = np.flatnonzero(~inactive & ~active)
        if uns.size:
            lu, uu, zu = lp[uns], up[uns], z[uns]
            h = milp.add_cols(np.zeros(uns.size), uu, False)
            a = milp.add_cols(np.zeros(uns.size), np.ones(uns.size), True)
            post[uns] = h
            q, one = np.arange(uns.size), np.ones(uns.size)
            milp.add_rows(np.concatenate([q, q]), np.concatenate([h, zu]), np.concatenate([one, -one]),
                          np.zeros(uns.size), np.full(uns.size, np.inf))                      # h − z ≥ 0
            milp.add_rows(np.concatenate([q, q, q]), np.concatenate([h, zu, a]), np.concatenate([one, -one, -lu]),
                          np.full(uns.size, -np.inf), -lu)                                   # h − z − l·a ≤ −l
            milp.add_rows(np.concatenate([q, q]), np.concatenate([h, a]), np.concatenate([one, -uu]),
                          np.full(uns.size, -np.inf), np.zeros(uns.size))                     # h − u·a ≤ 0
        return post, int(uns.size)
