"""LeakyReLU f(z) = max(z, a·z), negative slope a ∈ [0, 1]: splittable, exact MILP encoding."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from certkd.graph.layers.activation import Activation, Relaxation
from certkd.graph.layers.base import UnsupportedLayerError, register


@register
class LeakyReLU(Activation):
    module_types = (nn.LeakyReLU,)
    splittable = True

    def check(self) -> None:
        a = self.slope
        if not 0.0 <= a <= 1.0:
            raise UnsupportedLayerError(f"LeakyReLU at node '{self.name}' has negative_slope {a}: only slopes in "
                                        "[0, 1] are supported (a monotone, convex activation)")

    @property
    def slope(self) -> float:
        return float(self.module.negative_slope)

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.leaky_relu(x, self.slope)

    def evaluate(self, z: np.ndarray) -> np.ndarray:
        return np.where(z >= 0, z, self.slope * z)

    def loose(self, l, u):
        return (l < 0) & (u > 0)

    def relax(self, l: Tensor, u: Tensor) -> Relaxation:
        """Upper: the chord through (l, a·l) and (u, u); lower: α·z with α ∈ [a, 1] (CROWN: 1 if
        u ≥ −l else a) on unstable neurons; slope 1 (active) or a (inactive) elsewhere."""
        a = self.slope
        active, unstable = l >= 0, self.loose(l, u)
        stable_slope = torch.where(active, torch.ones_like(l), torch.full_like(l, a))
        width = torch.where(unstable, u - l, torch.ones_like(u))
        chord = (u - a * l) / width
        upper_slope = torch.where(unstable, chord, stable_slope)
        upper_bias = torch.where(unstable, (a - chord) * l, torch.zeros_like(l))
        adaptive = torch.where(u >= -l, torch.ones_like(l), torch.full_like(l, a))
        lower_slope = torch.where(unstable, adaptive, stable_slope)
        return Relaxation(lower_slope, upper_slope, upper_bias, unstable, alpha_lo=a, alpha_hi=1.0,
                          alpha_init=lower_slope if bool(unstable.any()) else None)

    def encode_milp(self, milp, pre, l, u, lp, up):
        """Active: the output is z. Inactive: h = a·z. Unstable: h and a binary δ with h ≥ z,
        h ≥ a·z, h ≤ z − (1−a)·l·(1 − δ), h ≤ a·z + (1−a)·u·δ (δ = 1: h = z ≥ 0; δ = 0: h = a·z).
        """
        a = self.slope
        active = l >= 0
        z = pre(np.ones(l.size, bool))
        post = np.full(l.size, -1)
        post[active] = z[active]
        ina = np.flatnonzero(u <= 0)
        if ina.size:
            h = milp.add_cols(a * lp[ina], a * up[ina], False)
            post[ina] = h
            q = np.arange(ina.size)
            milp.add_rows(np.concatenate([q, q]), np.concatenate([h, z[ina]]),
                          np.concatenate([np.ones(ina.size), np.full(ina.size, -a)]), np.zeros(ina.size),
                          np.zeros(ina.size))                                                 # h − a·z = 0
        uns = np.flatnonzero(self.loose(l, u))
        if uns.size:
            lu, uu, zu, m = lp[uns], up[uns], z[uns], uns.size
            h = milp.add_cols(a * lu, uu, False)
            d = milp.add_cols(np.zeros(m), np.ones(m), True)
            post[uns] = h
            q, one, inf = np.arange(m), np.ones(m), np.full(m, np.inf)
            milp.add_rows(np.concatenate([q, q]), np.concatenate([h, zu]), np.concatenate([one, -one]),
                          np.zeros(m), inf)                                                   # h − z ≥ 0
            milp.add_rows(np.concatenate([q, q]), np.concatenate([h, zu]), np.concatenate([one, -a * one]),
                          np.zeros(m), inf)                                                   # h − a·z ≥ 0
            milp.add_rows(np.concatenate([q, q, q]), np.concatenate([h, zu, d]),
                          np.concatenate([one, -one, -(1 - a) * lu]), -inf, -(1 - a) * lu)  # h ≤ z−(1−a)l(1−δ)
            milp.add_rows(np.concatenate([q, q, q]), np.concatenate([h, zu, d]),
                          np.concatenate([one, -a * one, -(1 - a) * uu]), -inf, np.zeros(m))  # h ≤ az + (1−a)uδ
        return post, int(uns.size)
