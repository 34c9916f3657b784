"""Interval bound propagation (IBP) in center/radius form, one rule per layer type.

Design notes
------------
* One pass, batched: each rule maps (center, radius) of a box to those of the next layer;
  affine layers cost one op on the center and one with |W| on the radius.
* Train-mode BatchNorm uses the statistics of the batch the model *actually saw* (SPEC §1.2).
  That is why :func:`interval_bounds` can carry a ``point`` through the same pass: in train
  mode the point's batch statistics normalise both the point and the box, and the running
  statistics are updated exactly as in a normal forward. The point's features come back
  for free (the CC-IBP and CC-Dist losses need them), so no forward is done twice. A BN layer
  with a ``forward_with_stats(p) -> (output, mean, var)`` method supplies these statistics
  itself: the sync BN of :mod:`certkd.distributed` returns those of the *global* batch in
  multi-process training, so the bounds match a single process with the global batch.
* Speed (``benchmarks/bench_bounds.py``): a Conv2d followed by BatchNorm2d is propagated
  as one fused affine map (the BN scale/shift folded into the conv weights), in eval mode
  with the running statistics and in train mode with the point's batch statistics, so the
  box costs two convolutions per layer and no extra elementwise passes; the ReLU rule
  allocates as few full-size temporaries as autograd allows. On CPU the box travels in
  channels_last (NHWC) layout, which oneDNN convolves faster; rules must therefore not assume
  a contiguous NCHW layout (use ``reshape``, not ``view``). Results equal the plain
  layer-by-layer NCHW computation up to float32 rounding.
* Why not auto_LiRPA: the PyPI ``auto-lirpa`` 0.3 does not import on torch 2.x, and a
  hand-written IBP for this small layer set is short, measurable and fast
  (``benchmarks/bench_bounds.py``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple, Type

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from certkd.bounds.spec import drop_label_column
from certkd.models.layers import Normalize


@dataclass
class IntervalBounds:
    """Result of an IBP pass through a sequence of layers.

    lower, upper: (N, *) bounds of the output (the features h for ``model.features``).
    preactivations: (center, radius) of the input box of every ReLU, in order; used by the
        warm-up regularisers.
    point_output: output at ``point`` (N, *) when a point was carried through the pass.
    """

    lower: Tensor
    upper: Tensor
    preactivations: List[Tuple[Tensor, Tensor]] = field(default_factory=list)
    point_output: Optional[Tensor] = None

    @property
    def center(self) -> Tensor:
        return (self.upper + self.lower) / 2

    @property
    def radius(self) -> Tensor:
        return (self.upper - self.lower) / 2


# A rule maps (layer, center, radius, point) -> (center, radius, point); point may be None.
Rule = Callable[[nn.Module, Tensor, Tensor, Optional[Tensor]], Tuple[Tensor, Tensor, Optional[Tensor]]]
_RULES: Dict[Type[nn.Module], Rule] = {}


def interval_rule(*types: Type[nn.Module]):
    """Register the IBP rule of a layer type (auto_LiRPA-style: one rule per layer)."""

    def wrap(fn: Rule) -> Rule:
        for t in types:
            _RULES[t] = fn
        return fn

    return wrap


def _rule_for(layer: nn.Module) -> Rule:
    for t in type(layer).__mro__:
        if t in _RULES:
            return _RULES[t]
    supported = ", ".join(sorted(t.__name__ for t in _RULES))
    raise TypeError(f"no interval bound rule for layer {type(layer).__name__}; supported: {supported}")


@interval_rule(Normalize)
def _normalize(layer: Normalize, c: Tensor, r: Tensor, p: Optional[Tensor]):
    std = layer._view(layer.std, c)
    return layer(c), r / std, (layer(p) if p is not None else None)


@interval_rule(nn.Linear)
def _linear(layer: nn.Linear, c: Tensor, r: Tensor, p: Optional[Tensor]):
    return layer(c), F.linear(r, layer.weight.abs()), (layer(p) if p is not None else None)


@interval_rule(nn.Conv2d)
def _conv2d(layer: nn.Conv2d, c: Tensor, r: Tensor, p: Optional[Tensor]):
    if layer.padding_mode != "zeros":
        raise TypeError("interval bounds support Conv2d with zero padding only")
    r = F.conv2d(r, layer.weight.abs(), None, layer.stride, layer.padding, layer.dilation, layer.groups)
    return layer(c), r, (layer(p) if p is not None else None)


def _batch_stats(layer: nn.modules.batchnorm._BatchNorm, p: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    """(mean, var) that normalise ``p`` in ``layer`` and the layer's output at ``p`` (train mode)."""
    if p is None:
        raise ValueError("train-mode IBP through BatchNorm needs the point whose batch statistics define "
                         "the layer (pass point=...), or put the model in eval mode")
    with_stats = getattr(layer, "forward_with_stats", None)
    if with_stats is not None:  # sync BN (certkd.distributed): statistics of the global batch
        out, mean, var = with_stats(p)
        return mean, var, out
    dims = [0] + list(range(2, p.dim()))
    var, mean = torch.var_mean(p, dims, unbiased=False)
    return mean, var, layer(p)  # same statistics; updates the running ones as a normal forward does


def _bn_affine(layer: nn.modules.batchnorm._BatchNorm, mean: Tensor, var: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-channel (scale, shift) with BN(v) = v·scale + shift."""
    scale = torch.rsqrt(var + layer.eps)
    if layer.affine:
        scale = scale * layer.weight
        shift = layer.bias - mean * scale
    else:
        shift = -mean * scale
    return scale, shift


@interval_rule(nn.BatchNorm1d, nn.BatchNorm2d)
def _batchnorm(layer: nn.modules.batchnorm._BatchNorm, c: Tensor, r: Tensor, p: Optional[Tensor]):
    if layer.training:
        mean, var, p = _batch_stats(layer, p)
    else:
        mean, var = layer.running_mean, layer.running_var
    scale, shift = _bn_affine(layer, mean, var)
    shape = (1, -1) + (1,) * (c.dim() - 2)
    c = torch.addcmul(shift.view(shape), c, scale.view(shape))
    r = r * scale.abs().view(shape)
    if p is not None and not layer.training:
        p = layer(p)
    return c, r, p


def _fusable(layer: nn.Module, bn: Optional[nn.Module]) -> bool:
    """Whether ``layer`` → ``bn`` is propagated as one fused affine map.

    Only Conv2d → BatchNorm2d: there the activations dwarf the weights, so folding BN into the
    weights saves full-size passes. A Linear's weight is usually larger than its (N, m)
    activations, so Linear → BatchNorm1d keeps the plain rules.
    """
    if not isinstance(bn, nn.BatchNorm2d) or _rule_for(bn) is not _batchnorm:
        return False
    if not bn.training and (bn.running_mean is None or bn.running_var is None):
        return False  # eval mode with batch statistics: leave it to the plain rule (and its error)
    return _rule_for(layer) is _conv2d and layer.padding_mode == "zeros"


def _affine_batchnorm(layer: nn.Conv2d, bn: nn.modules.batchnorm._BatchNorm, c: Tensor, r: Tensor,
                      p: Optional[Tensor]):
    """Conv2d followed by BatchNorm2d as one affine map (BN folded into the weights).

    In train mode the statistics are those of the point's pre-BN activations, as in the
    layer-by-layer rules; the point itself goes through the unfused layers, so its output and
    the running statistics are exactly those of a normal forward.
    """
    if bn.training:
        mean, var, p = _batch_stats(bn, layer(p) if p is not None else None)
    else:
        mean, var = bn.running_mean, bn.running_var
        if p is not None:
            p = bn(layer(p))
    scale, shift = _bn_affine(bn, mean, var)
    weight = layer.weight * scale.view(-1, 1, 1, 1)
    bias = shift if layer.bias is None else torch.addcmul(shift, layer.bias, scale)
    args = (layer.stride, layer.padding, layer.dilation, layer.groups)
    return F.conv2d(c, weight, bias, *args), F.conv2d(r, weight.abs(), None, *args), p


def _grad_through(*ts: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in ts)


@interval_rule(nn.ReLU)
def _relu(layer: nn.ReLU, c: Tensor, r: Tensor, p: Optional[Tensor]):
    # upper, lower = relu(c ± r); centre/radius = (upper ± lower) / 2 (·0.5 is exact, as /2).
    # Fresh temporaries are modified in place; c and r are kept (they are the recorded
    # pre-activations), and relu's saved output is left intact when autograd records.
    upper = torch.add(c, r).relu_()
    lower = torch.sub(c, r).relu_()
    center = torch.add(upper, lower).mul_(0.5)
    radius = (torch.sub(upper, lower) if _grad_through(upper, lower) else upper.sub_(lower)).mul_(0.5)
    return center, radius, (torch.relu(p) if p is not None else None)


@interval_rule(nn.Flatten)
def _flatten(layer: nn.Flatten, c: Tensor, r: Tensor, p: Optional[Tensor]):
    return layer(c), layer(r), (layer(p) if p is not None else None)


@interval_rule(nn.Identity)
def _identity(layer: nn.Module, c: Tensor, r: Tensor, p: Optional[Tensor]):
    return c, r, (layer(p) if p is not None else None)


def interval_bounds(layers: nn.Sequential, lower: Tensor, upper: Tensor, point: Optional[Tensor] = None) -> IntervalBounds:
    """Propagate the box [lower, upper] (and optionally a point inside it) through ``layers``.

    Args:
        layers: a sequence of supported layers, e.g. ``model.features``.
        lower, upper: (N, C, H, W) input box, lower <= upper elementwise.
        point: (N, C, H, W) optional input whose forward is computed in the same pass; required
            when the sequence contains train-mode BatchNorm (its batch statistics are used).
    Returns:
        :class:`IntervalBounds` of the output of ``layers``.
    """
    c, r, p = (upper + lower) / 2, (upper - lower) / 2, point
    pre: List[Tuple[Tensor, Tensor]] = []
    channels_last = c.dim() == 4 and c.device.type == "cpu"
    if channels_last:  # oneDNN convolutions on CPU run faster on NHWC than on NCHW activations
        c, r = c.contiguous(memory_format=torch.channels_last), r.contiguous(memory_format=torch.channels_last)
    seq = list(layers)
    i = 0
    while i < len(seq):
        layer = seq[i]
        nxt = seq[i + 1] if i + 1 < len(seq) else None
        if _fusable(layer, nxt):
            c, r, p = _affine_batchnorm(layer, nxt, c, r, p)
            i += 2
            continue
        if isinstance(layer, nn.ReLU):
            pre.append((c, r))
        c, r, p = _rule_for(layer)(layer, c, r, p)
        i += 1
    lower, upper = c - r, c + r
    if channels_last and lower.dim() == 4:  # hand back the default layout
        lower, upper = lower.contiguous(), upper.contiguous()
    return IntervalBounds(lower=lower, upper=upper, preactivations=pre, point_output=p)


def elided_lower_bounds(head: nn.Linear, lower: Tensor, upper: Tensor, labels: Tensor) -> Tensor:
    """Lower bounds of z_y − z_j over a feature box, with the last layer merged into C (SPEC §1.1).

    lb_j = (w_y − w_j)·c + (b_y − b_j) − |w_y − w_j|·r, which is exact for the box [lower, upper].

    Args:
        head: final affine layer g, weight (K, m).
        lower, upper: (N, m) feature box.
        labels: (N,) true classes.
    Returns:
        (N, K−1) lower bounds, columns ordered as :func:`certkd.bounds.spec.other_classes`.
    """
    c, r = (upper + lower) / 2, (upper - lower) / 2
    w, b = head.weight, head.bias
    w_diff = w[labels].unsqueeze(1) - w.unsqueeze(0)  # (N, K, m)
    lb = torch.einsum("nkm,nm->nk", w_diff, c) - torch.einsum("nkm,nm->nk", w_diff.abs(), r)
    if b is not None:
        lb = lb + (b[labels].unsqueeze(1) - b.unsqueeze(0))
    return drop_label_column(lb, labels)


def ibp_logit_difference_bounds(model: nn.Module, lower: Tensor, upper: Tensor, labels: Tensor,
                                point: Optional[Tensor] = None) -> Tuple[Tensor, IntervalBounds]:
    """IBP lower bounds on z_y − z_j for a :class:`~certkd.models.CertifiableNet`.

    Returns (lb (N, K−1), feature bounds). ``bounds.point_output`` holds h(point) if given.
    """
    feats = interval_bounds(model.features, lower, upper, point)
    return elided_lower_bounds(model.head, feats.lower, feats.upper, labels), feats
