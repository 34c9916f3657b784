"""Linear / ONNX Gemm / MatMul(+Add): y = x Wᵀ + b on the last dimension."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import scipy.sparse as sp
import torch.nn.functional as F
from torch import Tensor, nn

from certkd.graph.layers.base import Layer, Shape, abs_weight, detached, numel, register, to_numpy


@register
class Linear(Layer):
    module_types = (nn.Linear,)

    def out_shape(self, in_shape: Shape) -> Shape:
        return tuple(in_shape[:-1]) + (self.module.out_features,)

    def interval(self, c: Tensor, r: Tensor, p: Optional[Tensor] = None):
        m = self.module
        return m(c), F.linear(r, abs_weight(m.weight)), self.point(p)

    def backward(self, A: Tensor, bias: Tensor, in_shapes: Sequence[Shape], out_shape: Shape):
        w, b = detached(self.module.weight, A), detached(self.module.bias, A)
        if b is not None:
            bias = bias + (A @ b if A.dim() == 3 else A.flatten(2) @ b.repeat(A[0, 0].numel() // b.numel()))
        return [A @ w], bias

    def affine(self, in_shapes: Sequence[Shape], out_shape: Shape):
        w = to_numpy(self.module.weight)
        b = np.zeros(w.shape[0]) if self.module.bias is None else to_numpy(self.module.bias)
        rows = numel(tuple(in_shapes[0])[:-1])  # on the last axis of each row (C order: blocks)
        if rows == 1:
            return [sp.csr_matrix(w)], b
        return [sp.csr_matrix(sp.kron(sp.identity(rows, format="csr"), sp.csr_matrix(w)))], np.tile(b, rows)
