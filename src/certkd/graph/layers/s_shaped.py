"""Tangent and chord relaxations of S-shaped activations (Sigmoid, Tanh): not splittable, no MILP.

An S-shaped f is increasing, convex on z ≤ 0, concave on z ≥ 0, with f' even and f(−z) = 2·f(0) − f(z).
Per neuron, on [l, u] (the cases of CROWN, Zhang et al. 2018):

* u ≤ 0 (convex): upper = the chord; lower = the tangent at any d ∈ [l, u];
* l ≥ 0 (concave): lower = the chord; upper = the tangent at any d ∈ [l, u];
* l < 0 < u: upper = the tangent at any d ∈ [d*, u], where the tangent at d* ≥ 0 passes through
  (l, f(l)) (it lies above f on [l, 0] by convexity there and on [0, u] by concavity); when
  d* > u, the chord instead. The lower line mirrors it through the origin.

α-CROWN optimises the tangent points: α (N, S, 2, *shape) holds the lower and the upper line's d,
kept in those ranges, so every α gives sound lines. Lines are widened by a few units of rounding
(:data:`_SLACK`) since f and f' are computed in floating point.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from certkd.graph.layers.activation import Activation, Relaxation

_SLACK = 16.0  # units of rounding (dtype eps times the magnitudes involved) added to each line
_BISECTIONS = 40


class SShaped(Activation):
    """Base of Sigmoid and Tanh: subclasses give f (``forward``), f' (``derivative``) and ``evaluate``."""

    splittable = False

    def derivative(self, z: Tensor) -> Tensor:
        raise NotImplementedError

    def post_box(self, l, u):
        lo, hi = super().post_box(l, u)
        if isinstance(lo, Tensor):  # outward by the rounding of f
            eps = torch.finfo(lo.dtype).eps
            lo, hi = lo - 2 * eps * (lo.abs() + eps), hi + 2 * eps * (hi.abs() + eps)
        return lo, hi

    def _tangent(self, d: Tensor, reach: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """The tangent at d: slope, bias, and a rounding slack for |z| ≤ reach (f' in [0, 1] is
        computed with an absolute error of a few eps, which the line carries over |z| ≤ reach)."""
        fd, s = self.forward(d), self.derivative(d)
        bias = fd - s * d
        eps = torch.finfo(d.dtype).eps
        return s, bias, _SLACK * eps * (1 + fd.abs() + (s * d).abs() + reach)

    def _upper_point(self, l: Tensor, u: Tensor) -> Tuple[Tensor, Tensor]:
        """For l < 0 < u: the smallest d ∈ [0, u] (up to bisection) whose tangent passes above
        (l, f(l)), and whether one exists. In float64; h(d) = f(d) + f'(d)(l − d) − f(l) grows with d."""
        l64, u64 = l.double(), u.double()
        fl = self.forward(l64)
        h = lambda d: self.forward(d) + self.derivative(d) * (l64 - d) - fl  # noqa: E731
        ok = h(u64) >= 0
        lo, hi = torch.zeros_like(u64), u64.clone()
        for _ in range(_BISECTIONS):
            mid = (lo + hi) / 2
            above = h(mid) >= 0
            hi, lo = torch.where(above, mid, hi), torch.where(above, lo, mid)
        return hi.to(l.dtype), ok

    def relax(self, l: Tensor, u: Tensor) -> Relaxation:
        u = torch.maximum(u, l)  # an empty (split) domain: any bounds do, but keep them finite
        reach = torch.maximum(l.abs(), u.abs())
        fl, fu = self.forward(l), self.forward(u)
        width = u - l
        chord_s = torch.where(width > 0, (fu - fl) / torch.where(width > 0, width, torch.ones_like(width)),
                              self.derivative(l))
        chord_b = fl - chord_s * l
        eps = torch.finfo(l.dtype).eps
        chord_slack = _SLACK * eps * (1 + fl.abs() + fu.abs() + chord_s.abs() * reach)
        convex, concave = u <= 0, l >= 0
        straddle = ~convex & ~concave
        d_up, up_ok = self._upper_point(l, u)
        d_lo, lo_ok = self._upper_point(-u, -l)
        d_lo = -d_lo
        lower_tan = convex | (straddle & lo_ok)
        upper_tan = concave | (straddle & up_ok)
        mid = (l + u) / 2
        # α ranges: the tangent points that are sound; default: the middle (one-sided) or d* (straddling)
        lo_range = torch.stack([l, torch.where(straddle, d_up, l)], 0)
        hi_range = torch.stack([torch.where(straddle, d_lo, u), u], 0)
        init = torch.stack([torch.where(straddle, d_lo, mid), torch.where(straddle, d_up, mid)], 0)
        lo_range, hi_range, init = (t.transpose(0, 1) for t in (lo_range, hi_range, init))  # (N, 2, *shape)
        chord = (chord_s, chord_b - chord_slack, chord_b + chord_slack)

        def lines(alpha: Tensor):
            """α (N, S, 2, *shape) -> the four (N, S, *shape) line tensors."""
            r = reach.unsqueeze(1)
            ls, lb, lslack = self._tangent(alpha[:, :, 0], r)
            us, ub, uslack = self._tangent(alpha[:, :, 1], r)
            lt, ut = lower_tan.unsqueeze(1), upper_tan.unsqueeze(1)
            cs, clb, cub = (t.unsqueeze(1) for t in chord)
            return (torch.where(lt, ls, cs), torch.where(lt, lb - lslack, clb),
                    torch.where(ut, us, cs), torch.where(ut, ub + uslack, cub))

        lo_s, lo_b, up_s, up_b = (t.squeeze(1) for t in lines(init.unsqueeze(1)))
        loose = self.loose(l, u)
        return Relaxation(lo_s, up_s, up_b, loose, lower_bias=lo_b, alpha_lo=lo_range, alpha_hi=hi_range,
                          alpha_init=init if bool(loose.any()) else None, lines=lines)


__all__ = ["SShaped"]
