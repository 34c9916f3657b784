"""Interval bound propagation (IBP) in center/radius form, one rule per layer type.

Design notes
------------
* One pass, batched: each rule maps (center, radius) of a box to those of the next layer;
  affine layers cost one op on the center and one with |W| on the radius.
* Train-mode BatchNorm uses the statistics of the batch the model *actually saw* (docs/method.md §2.2).
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
from certkd.graph.convert import CUSTOM_INTERVAL, from_module
from certkd.graph.layers import Activation, BatchNorm, Conv2d, Linear
from certkd.graph.network import Network


@dataclass
class IntervalBounds:
    """Result of an IBP pass through a sequence of layers.

    lower, upper: (N, *) bounds of the output (the features h for ``model.features``).
    preactivations: (center, radius) of the input box of every activation, in order; used by the
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


def interval_rule(*types: Type[nn.Module]):
    """Register an interval-only rule for a custom layer type (other engines refuse the layer).

    Built-in layers carry their rules in their rule class (``certkd/graph/layers/``,
    ``docs/adding_a_layer.md``); this hook is for a quick IBP-only experiment.
    """

    def wrap(fn: Rule) -> Rule:
        for t in types:
            CUSTOM_INTERVAL[t] = fn
        return fn

    return wrap


def _last_uses(net: Network, stop: int) -> List[int]:
    last = list(range(len(net.nodes)))
    for i, node in enumerate(net.nodes[:stop + 1]):
        for j in node.inputs:
            last[j] = max(last[j], i)
    return last


def walk_intervals(net: Network, c: Tensor, r: Tensor, p: Optional[Tensor] = None, stop: Optional[int] = None,
                   pre: Optional[List[Tuple[Tensor, Tensor]]] = None):
    """Propagate (centre, radius, point) through nodes 1..stop of ``net`` (default: the output).

    Each node applies its rule class's ``interval``; a Conv2d whose only consumer is a
    BatchNorm2d is propagated as one fused affine map (the speed note above). Activation inputs are
    appended to ``pre``. Returns the (c, r, p) of node ``stop``.
    """
    stop = net.output if stop is None else stop
    nodes, consumers, last = net.nodes, net.consumers(), _last_uses(net, stop)
    vals: Dict[int, Tuple] = {0: (c, r, p)}
    fused: Dict[int, int] = {}  # BatchNorm node -> the Conv2d node folded into it
    for i in range(1, stop + 1):
        node = nodes[i]
        rule = node.rule
        reads = node.inputs
        if i in fused:
            conv = nodes[fused[i]]
            reads = conv.inputs
            c, r, p = rule.interval_after_conv(conv.rule, *vals[conv.inputs[0]])
        elif len(node.inputs) == 1:
            nxt = consumers[i]
            if (type(rule) is Conv2d and len(nxt) == 1 and nxt[0] <= stop and isinstance(nodes[nxt[0]].rule, BatchNorm)
                    and nodes[nxt[0]].rule.fusable_after(rule)):
                fused[nxt[0]] = i
                last[node.inputs[0]] = max(last[node.inputs[0]], nxt[0])
                continue
            c, r, p = vals[node.inputs[0]]
            if isinstance(rule, Activation) and pre is not None:
                pre.append((c, r))
            c, r, p = rule.interval(c, r, p)
        else:
            ins = [vals[j] for j in node.inputs]
            c, r, p = rule.interval(tuple(v[0] for v in ins), tuple(v[1] for v in ins),
                                    None if ins[0][2] is None else tuple(v[2] for v in ins))
        vals[i] = (c, r, p)
        for j in set(reads):  # free what no later node reads (peak memory)
            if last[j] <= i and j != stop:
                vals.pop(j, None)
    return vals[stop]


def interval_bounds(layers: nn.Module, lower: Tensor, upper: Tensor, point: Optional[Tensor] = None) -> IntervalBounds:
    """Propagate the box [lower, upper] (and optionally a point inside it) through ``layers``.

    Args:
        layers: a sequence of supported layers, e.g. ``model.features`` (any module or
            :class:`~certkd.graph.Network` that :func:`certkd.graph.from_module` accepts).
        lower, upper: (N, C, H, W) input box, lower <= upper elementwise.
        point: (N, C, H, W) optional input whose forward is computed in the same pass; required
            when the sequence contains train-mode BatchNorm (its batch statistics are used).
    Returns:
        :class:`IntervalBounds` of the output of ``layers``.
    """
    return _bounds(from_module(layers), lower, upper, point)


def _bounds(net: Network, lower: Tensor, upper: Tensor, point: Optional[Tensor], stop: Optional[int] = None):
    c, r = (upper + lower) / 2, (upper - lower) / 2
    pre: List[Tuple[Tensor, Tensor]] = []
    channels_last = c.dim() == 4 and c.device.type == "cpu"
    if channels_last:  # oneDNN convolutions on CPU run faster on NHWC than on NCHW activations
        c, r = c.contiguous(memory_format=torch.channels_last), r.contiguous(memory_format=torch.channels_last)
    c, r, p = walk_intervals(net, c, r, point, stop, pre)
    lower, upper = c - r, c + r
    if channels_last and lower.dim() == 4:  # hand back the default layout
        lower, upper = lower.contiguous(), upper.contiguous()
    return IntervalBounds(lower=lower, upper=upper, preactivations=pre, point_output=p)


def elided_lower_bounds(head: nn.Linear, lower: Tensor, upper: Tensor, labels: Tensor) -> Tensor:
    """Lower bounds of z_y − z_j over a feature box, with the last layer merged into C (docs/method.md §2.1).

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


def ibp_spec_lower_bounds(model: nn.Module, lower: Tensor, upper: Tensor, C: Tensor) -> Tensor:
    """IBP lower bounds of ``C z`` for a general specification C (m, K), one box (1, *in) -> (1, m).

    A final Linear layer is merged into C, as :func:`ibp_logit_difference_bounds` merges it into
    C(y), so m rows cost one (m, hidden) product (a VNN-LIB property's rows, ``docs/verify_onnx.md``).
    """
    net = from_module(model)
    last = net.nodes[net.output]
    if type(last.rule) is Linear and net.output > 1:
        feats = _bounds(net, lower, upper, None, stop=last.inputs[0])
        w = last.rule.module.weight.detach().to(C.dtype)
        A = C @ w
        bias = C @ last.rule.module.bias.detach().to(C.dtype) if last.rule.module.bias is not None else 0
    else:
        feats, A, bias = _bounds(net, lower, upper, None), C, 0
    c, r = feats.center.reshape(1, -1), feats.radius.reshape(1, -1)
    return c @ A.T - r @ A.abs().T + bias


def ibp_logit_difference_bounds(model: nn.Module, lower: Tensor, upper: Tensor, labels: Tensor,
                                point: Optional[Tensor] = None) -> Tuple[Tensor, IntervalBounds]:
    """IBP lower bounds on z_y − z_j for a :class:`~certkd.models.CertifiableNet` or any network
    :func:`certkd.graph.from_module` accepts whose last layer is a Linear (merged into C).

    Returns (lb (N, K−1), feature bounds: the input of the last Linear). ``bounds.point_output``
    holds h(point) if given.
    """
    if isinstance(getattr(model, "features", None), nn.Module) and isinstance(getattr(model, "head", None), nn.Linear):
        feats, head = interval_bounds(model.features, lower, upper, point), model.head
    else:
        net = from_module(model)
        last = net.nodes[net.output]
        if type(last.rule) is not Linear:
            raise TypeError("ibp_logit_difference_bounds needs a network whose last layer is a Linear")
        feats, head = _bounds(net, lower, upper, point, stop=last.inputs[0]), last.rule.module
    return elided_lower_bounds(head, feats.lower, feats.upper, labels), feats
