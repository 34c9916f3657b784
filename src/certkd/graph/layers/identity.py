"""Identity and Dropout (eval mode: the identity)."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from torch import Tensor, nn

from certkd.graph.layers.base import Layer, Shape, identity_matrix, numel, register
from certkd.graph.windows import Window


@register
class Identity(Layer):
    module_types = (nn.Identity, nn.Dropout)
    diagonal = True

    def forward(self, x: Tensor) -> Tensor:
        if self.module is not None and self.module.training and isinstance(self.module, nn.Dropout):
            return self.module(x)
        return x

    def interval(self, c: Tensor, r: Tensor, p: Optional[Tensor] = None):
        if isinstance(self.module, nn.Dropout) and self.module.training and self.module.p > 0:
            raise ValueError(f"Dropout at node '{self.name}' is in train mode: bounds need model.eval()")
        return c, r, self.point(p)

    def backward(self, A: Tensor, bias: Tensor, in_shapes: Sequence[Shape], out_shape: Shape):
        return [A], bias

    def window(self, win: Window, in_shape: Shape, out_shape: Shape) -> Window:
        return win

    def affine(self, in_shapes: Sequence[Shape], out_shape: Shape):
        return [identity_matrix(numel(in_shapes[0]))], np.zeros(numel(out_shape))
