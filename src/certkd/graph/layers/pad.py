"""Constant padding of the per-sample axes (ONNX ``Pad`` in ``constant`` mode): y = P·x + value·m,
with P a 0/1 selection (negative pads crop) and m the mask of the padded positions."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from certkd.graph.layers.base import Layer, Shape, numel, register


class ConstantPad(nn.Module):
    """x (N, *in) -> (N, *out), out[i] = in[i] + before[i] + after[i]; padded entries are ``value``.

    pads: one (before, after) pair per per-sample axis (the batch axis is never padded).
    """

    def __init__(self, pads: Sequence[Tuple[int, int]], value: float = 0.0):
        super().__init__()
        self.pads = tuple((int(b), int(a)) for b, a in pads)
        self.value = float(value)

    def torch_pads(self) -> Tuple[int, ...]:
        """F.pad's order: last axis first."""
        return tuple(v for b, a in reversed(self.pads) for v in (b, a))

    def forward(self, x: Tensor) -> Tensor:
        return F.pad(x, self.torch_pads(), value=self.value)

    def extra_repr(self) -> str:
        return f"pads={self.pads}, value={self.value}"


@register
class Pad(Layer):
    module_types = (ConstantPad,)
    diagonal = True  # maps a box onto a box exactly

    def check(self) -> None:
        if not np.isfinite(self.module.value):
            raise self.unsupported(f"any engine: pad value {self.module.value} is not finite")

    def out_shape(self, in_shape: Shape) -> Shape:
        pads = self.module.pads
        if len(pads) != len(in_shape):
            raise self.unsupported(f"an input of shape {tuple(in_shape)} ({len(pads)} padded axes)")
        out = tuple(int(s) + b + a for s, (b, a) in zip(in_shape, pads))
        if any(s <= 0 for s in out):
            raise self.unsupported(f"an input of shape {tuple(in_shape)}: pads {pads} leave nothing")
        return out

    def _mask(self, in_shape: Shape, like: Tensor) -> Tensor:
        """1 where the output is padding, 0 where it reads the input (per-sample output shape)."""
        return F.pad(torch.zeros(in_shape, dtype=like.dtype, device=like.device), self.module.torch_pads(),
                     value=1.0)

    def interval(self, c: Tensor, r: Tensor, p: Optional[Tensor] = None):
        return self.module(c), F.pad(r, self.module.torch_pads(), value=0.0), self.point(p)

    def backward(self, A: Tensor, bias: Tensor, in_shapes: Sequence[Shape], out_shape: Shape):
        in_shape = tuple(in_shapes[0])
        if self.module.value != 0:
            bias = bias + self.module.value * (A.flatten(2) @ self._mask(in_shape, A).reshape(-1))
        back = tuple(-v for v in self.module.torch_pads())  # crop the padding, re-pad what was cropped
        return [F.pad(A, back, value=0.0).reshape(A.shape[0], A.shape[1], *in_shape)], bias

    def affine(self, in_shapes: Sequence[Shape], out_shape: Shape):
        n_in = numel(in_shapes[0])
        idx = F.pad(torch.arange(n_in, dtype=torch.float64).reshape(in_shapes[0]), self.module.torch_pads(),
                    value=-1.0).reshape(-1).numpy().astype(np.int64)
        rows = np.nonzero(idx >= 0)[0]
        mat = sp.csr_matrix((np.ones(rows.size), (rows, idx[rows])), shape=(idx.size, n_in))
        return [mat], self.module.value * (idx < 0).astype(np.float64)


__all__ = ["ConstantPad", "Pad"]
