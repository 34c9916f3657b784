"""Residual Add of two branches of the same shape: y = a + b."""
from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np
from torch import Tensor, nn

from certkd.graph.layers.base import Layer, Shape, identity_matrix, numel, register


class AddModule(nn.Module):
    """y = a + b (the merge of a residual block)."""

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return a + b


@register
class Add(Layer):
    module_types = (AddModule,)
    arity = 2
    diagonal = False

    def out_shape(self, a: Shape, b: Shape) -> Shape:
        if tuple(a) != tuple(b):
            raise self.unsupported(f"any engine with branch shapes {tuple(a)} and {tuple(b)} (no broadcasting)")
        return tuple(a)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return a + b

    def interval(self, c: Tuple[Tensor, Tensor], r: Tuple[Tensor, Tensor], p=None):
        return c[0] + c[1], r[0] + r[1], (None if p is None or p[0] is None else p[0] + p[1])

    def backward(self, A: Tensor, bias: Tensor, in_shapes: Sequence[Shape], out_shape: Shape):
        return [A, A], bias

    def affine(self, in_shapes: Sequence[Shape], out_shape: Shape):
        n = numel(out_shape)
        return [identity_matrix(n), identity_matrix(n)], np.zeros(n)
