"""Elementwise affine maps y = x·scale + shift: input normalisation (certkd's ``Normalize``) and
ONNX Sub / Div / Mul / Add by constants. Eval-mode BatchNorm reuses these rules."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor, nn

from certkd.graph.layers.base import Layer, Shape, numel, register
from certkd.graph.windows import Window
from certkd.models.layers import Normalize


class ScaleShiftModule(nn.Module):
    """y = x·scale + shift with constant ``scale``/``shift`` broadcastable to (1, *shape)."""

    def __init__(self, scale: Tensor, shift: Tensor, op: str = "affine"):
        super().__init__()
        self.register_buffer("scale", scale.detach().clone().float())
        self.register_buffer("shift", shift.detach().clone().float())
        self.op = op

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale + self.shift

    def extra_repr(self) -> str:
        return f"op={self.op}"


class ElementwiseAffine(Layer):
    """Base of diagonal layers: subclasses implement :meth:`scale_shift`."""

    diagonal = True

    def scale_shift(self, shape: Shape, like: Tensor) -> Tuple[Tensor, Tensor]:
        """(scale, shift), detached, each broadcastable to the per-sample ``shape``."""
        raise NotImplementedError

    def _pair(self, shape: Shape, like: Tensor) -> Tuple[Tensor, Tensor]:
        s, t = self.scale_shift(shape, like)
        return s.to(like), t.to(like)

    def interval(self, c: Tensor, r: Tensor, p: Optional[Tensor] = None):
        s, t = self._pair(tuple(c.shape[1:]), c)
        return torch.addcmul(t, c, s), r * s.abs(), self.point(p)

    @staticmethod
    def _per_channel(t: Tensor, shape: Shape) -> bool:
        return t.dim() == len(shape) and all(v == 1 for v in t.shape[1:])

    def backward(self, A: Tensor, bias: Tensor, in_shapes: Sequence[Shape], out_shape: Shape):
        shape = tuple(in_shapes[0])
        s, t = self._pair(shape, A)
        if len(shape) > 1 and self._per_channel(t, shape):  # (C, 1, ...): per-channel sums first
            bias = bias + A.sum(dim=tuple(range(3, A.dim()))) @ t.reshape(-1).expand(shape[0])
        else:
            bias = bias + A.flatten(2) @ t.expand(shape).reshape(-1)
        return [A * s], bias

    def window(self, win: Window, in_shape: Shape, out_shape: Shape) -> Optional[Window]:
        s, t = self._pair(tuple(in_shape), win.A)
        if len(in_shape) != 3 or not (self._per_channel(s, in_shape) and self._per_channel(t, in_shape)):
            return None
        c = in_shape[0]
        bias = win.bias + win.A.sum((4, 5)) @ t.reshape(-1).expand(c)
        return Window(win.A * s, bias, win.oy, win.ox)

    def affine(self, in_shapes: Sequence[Shape], out_shape: Shape):
        shape = tuple(in_shapes[0])
        s, t = self._pair(shape, torch.empty(0, dtype=torch.float64))
        diag = s.expand(shape).reshape(-1).cpu().numpy()
        return [sp.diags(diag, format="csr")], t.expand(shape).reshape(-1).cpu().numpy().copy()


def _broadcast(t: Tensor, shape: Shape) -> Tensor:
    """A constant given for (1, *shape) (or per-sample) -> broadcastable to the per-sample shape."""
    t = t.detach()
    while t.dim() > len(shape):
        if t.shape[0] != 1:
            raise ValueError(f"constant of shape {tuple(t.shape)} does not broadcast to {shape}")
        t = t[0]
    return t


@register
class ScaleShift(ElementwiseAffine):
    module_types = (ScaleShiftModule,)

    def scale_shift(self, shape: Shape, like: Tensor):
        return _broadcast(self.module.scale, shape), _broadcast(self.module.shift, shape)


@register
class NormalizeRule(ElementwiseAffine):
    """certkd's per-channel ``(x − mean) / std``."""

    module_types = (Normalize,)

    def scale_shift(self, shape: Shape, like: Tensor):
        m = self.module
        c = shape[0]
        view = (c,) + (1,) * (len(shape) - 1)
        std = m.std.detach().to(like.dtype).expand(c).reshape(view)
        mean = m.mean.detach().to(like.dtype).expand(c).reshape(view)
        return 1.0 / std, -mean / std

    def interval(self, c: Tensor, r: Tensor, p: Optional[Tensor] = None):
        m = self.module
        return m(c), r / m._view(m.std, c), self.point(p)


__all__ = ["ElementwiseAffine", "NormalizeRule", "ScaleShift", "ScaleShiftModule", "numel", "np"]
