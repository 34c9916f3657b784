"""Elementwise activations: the one kind of non-affine layer, owning its relaxation for every engine.

An :class:`Activation` rule gives (``docs/adding_a_layer.md``; per neuron, l/u the pre-activation
bounds, tensors (N, *shape) unless said otherwise):

* ``relax(l, u)``: a :class:`Relaxation`, the linear bounds CROWN propagates and the range of the
  parameters α-CROWN optimises;
* ``post_box(l, u)``: the interval of f over [l, u] (IBP, CROWN's intermediate boxes, the MILP);
* ``loose(l, u)``: where the relaxation is not exact (CROWN tightens only these neurons);
* ``evaluate(z)``: f on a float64 numpy array (the MILP's forward);
* ``splittable``: piecewise linear with its kink at 0, so branch and bound may split it and
  ``encode_milp`` is exact. A rule that is not splittable has no MILP encoding: the MILP refuses
  it and branch and bound leaves its instances undecided.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from certkd.graph.layers.base import Layer
from certkd.graph.windows import Window, win_gather

Range = Union[float, Tensor]
Lines = Tuple[Tensor, Optional[Tensor], Tensor, Tensor]


def _dot(A: Tensor, b: Tensor) -> Tensor:
    """Σ over neurons of A (N, S, *shape) times b (N, *shape) or (N, S, *shape) -> (N, S)."""
    if b.dim() == A.dim():
        return torch.einsum("nsd,nsd->ns", A.flatten(2), b.flatten(2))
    return torch.einsum("nsd,nd->ns", A.flatten(2), b.flatten(1))


class Relaxation:
    """Linear bounds of one activation layer over its pre-activation box, for every z in [l, u]:

        lower_slope·z + lower_bias <= f(z) <= upper_slope·z + upper_bias      (all (N, *shape)).

    ``lower_bias`` None means 0. ``loose``: bool (N, *shape), where the bounds are not exact.
    α-CROWN: ``alpha_init`` (N, *a_shape) is the starting α (None: nothing to optimise), every α in
    [``alpha_lo``, ``alpha_hi``] (floats, or tensors (N, *a_shape)) gives sound bounds, and
    ``lines(α)`` maps α (N, S, *a_shape) to (lower slope, lower bias or None, upper slope, upper
    bias), each broadcastable to (N, S, *shape). Without ``lines``, α is the lower slope of the
    loose neurons (a line through the origin), as for ReLU and LeakyReLU.
    """

    def __init__(self, lower_slope: Tensor, upper_slope: Tensor, upper_bias: Tensor, loose: Tensor, *,
                 lower_bias: Optional[Tensor] = None, alpha_init: Optional[Tensor] = None,
                 alpha_lo: Range = 0.0, alpha_hi: Range = 1.0,
                 lines: Optional[Callable[[Tensor], Lines]] = None):
        self.lower_slope, self.upper_slope, self.upper_bias = lower_slope, upper_slope, upper_bias
        self.lower_bias, self.loose = lower_bias, loose
        self.alpha_init, self.alpha_lo, self.alpha_hi = alpha_init, alpha_lo, alpha_hi
        self._lines = lines

    def project(self, alpha: Tensor) -> Tensor:
        """α (N, S, *a_shape) clamped into its sound range."""
        if not isinstance(self.alpha_lo, Tensor):
            return alpha.clamp(self.alpha_lo, self.alpha_hi)
        return torch.maximum(torch.minimum(alpha, self.alpha_hi.unsqueeze(1)), self.alpha_lo.unsqueeze(1))

    def lines(self, alpha: Tensor) -> Lines:
        """The bounds with parameters α (N, S, *a_shape), projected into their range first."""
        if self._lines is not None:
            return self._lines(self.project(alpha))
        lo = torch.where(self.loose.unsqueeze(1), self.project(alpha), self.lower_slope.unsqueeze(1))
        return lo, self.lower_bias, self.upper_slope.unsqueeze(1), self.upper_bias

    def backward(self, A: Tensor, bias: Tensor, alpha: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """A (N, S, *shape) on the activation's output -> A on its input (lower bound direction)."""
        if alpha is None:
            lo, lb, up, ub = self.lower_slope.unsqueeze(1), self.lower_bias, self.upper_slope.unsqueeze(1), \
                self.upper_bias
        else:
            lo, lb, up, ub = self.lines(alpha)
        bias = bias + _dot(A.clamp(max=0), ub)
        if lb is not None:
            bias = bias + _dot(A.clamp(min=0), lb)
        return A * torch.where(A >= 0, lo, up), bias

    def window(self, win: Window) -> Window:
        """:meth:`backward` on receptive-field windows (default bounds; A (N, P, G, C, py, px))."""
        py, px = win.A.shape[-2:]
        lo, up, ub = (win_gather(t, win.oy, win.ox, py, px) for t in (self.lower_slope, self.upper_slope,
                                                                        self.upper_bias))
        bias = win.bias + torch.einsum("npgd,npd->npg", win.A.clamp(max=0).flatten(3), ub.flatten(3).squeeze(2))
        if self.lower_bias is not None:
            lb = win_gather(self.lower_bias, win.oy, win.ox, py, px)
            bias = bias + torch.einsum("npgd,npd->npg", win.A.clamp(min=0).flatten(3), lb.flatten(3).squeeze(2))
        return Window(win.A * torch.where(win.A >= 0, lo, up), bias, win.oy, win.ox)


class Activation(Layer):
    """Base rule of an elementwise activation f (monotone non-decreasing unless ``post_box`` is overridden)."""

    diagonal = True

    def evaluate(self, z: np.ndarray) -> np.ndarray:
        """f on a float64 numpy array (any shape)."""
        raise self.unsupported("a float64 evaluation")

    def post_box(self, l, u):
        """[f(l), f(u)] for tensors or float64 arrays (a monotone f; override otherwise)."""
        f = self.evaluate if isinstance(l, np.ndarray) else self.forward
        return f(l), f(u)

    def interval(self, c: Tensor, r: Tensor, p: Optional[Tensor] = None):
        lo, hi = self.post_box(c - r, c + r)
        return (hi + lo) / 2, (hi - lo) / 2, self.point(p)

    def loose(self, l, u):
        """Bool mask of the neurons whose relaxation is not exact (tensors or arrays)."""
        return u > l

    def relax(self, l: Tensor, u: Tensor) -> Relaxation:
        raise self.unsupported("CROWN")

    def backward(self, A, bias, in_shapes, out_shape):  # CROWN calls relax(l, u) instead
        raise self.unsupported("CROWN without pre-activation bounds")

    def encode_milp(self, milp, pre: Callable[[np.ndarray], np.ndarray], l: np.ndarray, u: np.ndarray,
                    lp: np.ndarray, up: np.ndarray) -> Tuple[np.ndarray, int]:
        """Add the layer's MILP variables and rows (``certkd.verification.milp_encoding``).

        ``pre(mask)`` creates the pre-activation columns of the masked neurons (−1 elsewhere), tied
        to the layers before; ``milp.add_cols(lower, upper, integer)`` and ``milp.add_rows(rows,
        cols, values, lower, upper)`` add the rest. l, u: the sound bounds (n,), lp, up: the same
        padded outward. Returns the output columns (n,) (−1: the constant 0) and the binaries added.
        """
        raise self.unsupported("the MILP (no exact encoding: it is not piecewise linear)")


__all__ = ["Activation", "Relaxation"]
