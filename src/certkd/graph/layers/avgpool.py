"""AvgPool2d as a depthwise convolution with weights 1/(kh·kw): every engine's rule comes from
:class:`~certkd.graph.layers.conv.Conv2d` (the worked example of ``docs/adding_a_layer.md``)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from certkd.graph.layers.base import register
from certkd.graph.layers.conv import Conv2d, _pair


@register
class AvgPool2d(Conv2d):
    module_types = (nn.AvgPool2d,)

    def check(self) -> None:
        m = self.module
        if m.ceil_mode or m.divisor_override is not None or (not m.count_include_pad and _pair(m.padding) != (0, 0)):
            raise self.unsupported("any engine: AvgPool2d needs ceil_mode=False, no divisor_override, and "
                                   "count_include_pad=True when padded")

    def hyper(self, channels: int = 0):
        m = self.module
        k = _pair(m.kernel_size)
        return k, _pair(m.stride if m.stride is not None else m.kernel_size), (1, 1), channels, _pair(m.padding)

    def params(self, channels: int, like: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        k = _pair(self.module.kernel_size)
        return torch.full((channels, 1) + k, 1.0 / (k[0] * k[1]), dtype=like.dtype, device=like.device), None

    def interval(self, c: Tensor, r: Tensor, p: Optional[Tensor] = None):
        return self.module(c), self.module(r), self.point(p)  # non-negative weights: |W| = W
