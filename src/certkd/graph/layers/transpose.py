"""Transpose of the per-sample axes (ONNX ``Transpose`` that keeps the batch first): a permutation
of the coordinates, so every rule is exact."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor, nn

from certkd.graph.layers.base import Layer, Shape, numel, register


class Permute(nn.Module):
    """x (N, *in) -> (N, *(in[p] for p in perm)); ``perm`` permutes the per-sample axes."""

    def __init__(self, perm: Sequence[int]):
        super().__init__()
        self.perm = tuple(int(p) for p in perm)
        if sorted(self.perm) != list(range(len(self.perm))):
            raise ValueError(f"perm {self.perm} is not a permutation of 0..{len(self.perm) - 1}")

    def forward(self, x: Tensor) -> Tensor:
        return x.permute(0, *(p + 1 for p in self.perm))

    def extra_repr(self) -> str:
        return f"perm={self.perm}"


@register
class Transpose(Layer):
    module_types = (Permute,)
    diagonal = True  # maps a box onto a box exactly

    def out_shape(self, in_shape: Shape) -> Shape:
        perm = self.module.perm
        if len(perm) != len(in_shape):
            raise self.unsupported(f"an input of shape {tuple(in_shape)} (perm {perm})")
        return tuple(int(in_shape[p]) for p in perm)

    def interval(self, c: Tensor, r: Tensor, p: Optional[Tensor] = None):
        return self.module(c), self.module(r), self.point(p)

    def backward(self, A: Tensor, bias: Tensor, in_shapes: Sequence[Shape], out_shape: Shape):
        inv = np.argsort(self.module.perm)  # input axis i is output axis inv[i]
        return [A.permute(0, 1, *(int(i) + 2 for i in inv)).contiguous()], bias

    def affine(self, in_shapes: Sequence[Shape], out_shape: Shape):
        n = numel(in_shapes[0])
        idx = torch.arange(n).reshape(in_shapes[0]).permute(*self.module.perm).reshape(-1).numpy()
        return [sp.csr_matrix((np.ones(n), (np.arange(n), idx)), shape=(n, n))], np.zeros(n)


__all__ = ["Permute", "Transpose"]
