"""Flatten and Reshape (the batch dimension is kept): C-order, so the MILP's vectors do not change."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from certkd.graph.layers.base import Layer, Shape, identity_matrix, numel, register


class Reshape(nn.Module):
    """x (N, *in) -> (N, *shape) (ONNX Reshape with the batch dimension kept)."""

    def __init__(self, shape: Sequence[int]):
        super().__init__()
        self.shape = tuple(int(s) for s in shape)

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], *self.shape)

    def extra_repr(self) -> str:
        return f"shape={self.shape}"


@register
class Flatten(Layer):
    module_types = (nn.Flatten, Reshape)
    diagonal = True

    def out_shape(self, in_shape: Shape) -> Shape:
        return tuple(self.module(torch.empty((1,) + tuple(in_shape), device="meta")).shape[1:])

    def interval(self, c: Tensor, r: Tensor, p: Optional[Tensor] = None):
        return self.module(c), self.module(r), self.point(p)

    def backward(self, A: Tensor, bias: Tensor, in_shapes: Sequence[Shape], out_shape: Shape):
        return [A.reshape(A.shape[0], A.shape[1], *in_shapes[0])], bias

    def affine(self, in_shapes: Sequence[Shape], out_shape: Shape):
        return [identity_matrix(numel(in_shapes[0]))], torch.zeros(numel(out_shape), dtype=torch.float64).numpy()


__all__ = ["Flatten", "Reshape", "Tuple"]
