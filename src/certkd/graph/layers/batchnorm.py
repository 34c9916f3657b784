"""BatchNorm1d/2d: eval mode (running statistics) as an elementwise affine map for every engine;
train mode (the statistics of the batch the model saw) for the training IBP path only.

:func:`bn_scale_shift` is the one place where BatchNorm becomes ``v·scale + shift``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from certkd.graph.layers.base import Shape, register
from certkd.graph.layers.scale_shift import ElementwiseAffine


def bn_scale_shift(bn: nn.modules.batchnorm._BatchNorm, mean: Tensor, var: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-channel (scale, shift) (C,) with BN(v) = v·scale + shift, in the dtype of ``mean``."""
    scale = torch.rsqrt(var + bn.eps)
    if bn.affine:
        scale = scale * bn.weight.to(scale)
        shift = bn.bias.to(scale) - mean * scale
    else:
        shift = -mean * scale
    return scale, shift


def batch_stats(bn: nn.modules.batchnorm._BatchNorm, p: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    """(mean, var) that normalise ``p`` in train-mode ``bn``, and the layer's output at ``p``.

    A BN with ``forward_with_stats(p) -> (out, mean, var)`` (the sync BN of
    :mod:`certkd.distributed`) supplies the statistics of the global batch.
    """
    if p is None:
        raise ValueError("train-mode IBP through BatchNorm needs the point whose batch statistics define "
                         "the layer (pass point=...), or put the model in eval mode")
    with_stats = getattr(bn, "forward_with_stats", None)
    if with_stats is not None:
        out, mean, var = with_stats(p)
        return mean, var, out
    dims = [0] + list(range(2, p.dim()))
    var, mean = torch.var_mean(p, dims, unbiased=False)
    return mean, var, bn(p)  # same statistics; updates the running ones as a normal forward does


@register
class BatchNorm(ElementwiseAffine):
    module_types = (nn.BatchNorm1d, nn.BatchNorm2d)

    def eval_ready(self) -> bool:
        m = self.module
        return not m.training and m.running_mean is not None and m.running_var is not None

    def scale_shift(self, shape: Shape, like: Tensor):
        m = self.module
        if m.training:
            raise ValueError("CROWN and the MILP use eval-mode BatchNorm (running statistics); call model.eval()")
        if m.running_mean is None or m.running_var is None:
            raise self.unsupported("verification without running statistics (track_running_stats=False)")
        mean, var = m.running_mean.detach().to(like.dtype), m.running_var.detach().to(like.dtype)
        scale, shift = bn_scale_shift(m, mean, var)
        view = (-1,) + (1,) * (len(shape) - 1)
        return scale.detach().reshape(view), shift.detach().reshape(view)

    def interval(self, c: Tensor, r: Tensor, p: Optional[Tensor] = None):
        m = self.module
        if m.training:
            mean, var, p = batch_stats(m, p)
        else:
            mean, var = m.running_mean, m.running_var
        scale, shift = bn_scale_shift(m, mean, var)
        shape = (1, -1) + (1,) * (c.dim() - 2)
        c = torch.addcmul(shift.view(shape), c, scale.view(shape))
        r = r * scale.abs().view(shape)
        if p is not None and not m.training:
            p = m(p)
        return c, r, p

    def fusable_after(self, conv) -> bool:
        """Whether the training IBP path may fold this BN into the preceding Conv2d rule."""
        m = self.module
        return isinstance(m, nn.BatchNorm2d) and (m.training or self.eval_ready())

    def interval_after_conv(self, conv, c: Tensor, r: Tensor, p: Optional[Tensor]):
        """Conv2d followed by this BatchNorm2d as one affine map (BN folded into the weights).

        Training speed (``benchmarks/bench_bounds.py``): two convolutions for the box and no extra
        elementwise passes. In train mode the statistics are those of the point's pre-BN
        activations; the point goes through the unfused layers (running statistics update as usual).
        """
        m, layer = self.module, conv.module
        if m.training:
            mean, var, p = batch_stats(m, layer(p) if p is not None else None)
        else:
            mean, var = m.running_mean, m.running_var
            if p is not None:
                p = m(layer(p))
        scale, shift = bn_scale_shift(m, mean, var)
        weight = layer.weight * scale.view(-1, 1, 1, 1)
        bias = shift if layer.bias is None else torch.addcmul(shift, layer.bias, scale)
        return conv._conv(c, weight, bias), conv._conv(r, weight.abs(), None), p


__all__ = ["BatchNorm", "batch_stats", "bn_scale_shift", "F"]
