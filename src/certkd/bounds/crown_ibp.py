"""CROWN-IBP bounds for training (Zhang et al., ICLR 2020; docs/method.md §5.8).

One IBP pass gives every pre-activation box and the IBP bound of the logit differences; one
CROWN backward pass from the specification C(y) (the final Linear merged into it) over those
IBP pre-activation bounds gives the CROWN-IBP bound. The backward pass is the verifier's own:
:func:`certkd.bounds.crown_backward._backward` with the layer rules of ``certkd/graph/layers``
and each activation rule's own ``relax`` (for ReLU the triangle with the adaptive lower slope), run under :func:`certkd.graph.layers.base.live_parameters` so that the weights
keep their gradient. Only BatchNorm is treated here: in train mode it is the affine map of
the batch statistics the IBP pass used (those of ``point``, docs/method.md §2.2), in eval mode
that of the running statistics, with the live scale and shift either way; it is not folded.

Shapes: N = batch, K = classes; bounds are (N, K−1) with columns ordered as
:func:`certkd.bounds.spec.other_classes`.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, Optional, Tuple

import torch
from torch import Tensor, nn

from certkd.bounds.crown_backward import _backward, _concretize, _Plan
from certkd.bounds.ibp import IntervalBounds, ibp_logit_difference_bounds
from certkd.bounds.spec import specification_matrix
from certkd.graph.convert import from_module
from certkd.graph.layers import BatchNorm, ElementwiseAffine, Linear, bn_scale_shift
from certkd.graph.layers.base import Shape, live_parameters
from certkd.graph.network import Network, Node


class _StatsAffine(ElementwiseAffine):
    """A BatchNorm as ``v·scale + shift`` with given (live) per-channel scale and shift."""

    def __init__(self, bn: nn.Module, scale: Tensor, shift: Tensor, name: str):
        super().__init__(bn, name)
        self._scale, self._shift = scale, shift

    def scale_shift(self, shape: Shape, like: Tensor) -> Tuple[Tensor, Tensor]:
        view = (-1,) + (1,) * (len(shape) - 1)
        return self._scale.reshape(view), self._shift.reshape(view)


@contextlib.contextmanager
def _recording_bn_stats(model: nn.Module) -> Iterator[Dict[int, Tuple[Tensor, Tensor]]]:
    """Record (mean, var) of every train-mode BatchNorm in one IBP pass, keyed by id(module).

    The IBP rule asks a BN for ``forward_with_stats`` (the protocol of
    :func:`certkd.graph.layers.batchnorm.batch_stats`); an instance attribute of that name wraps the
    module's own statistics (the sync BN's global ones) or computes a plain BN's as it does.
    """
    stats: Dict[int, Tuple[Tensor, Tensor]] = {}
    wrapped = []
    for m in model.modules():
        if not (isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training):
            continue
        own = getattr(m, "forward_with_stats", None)

        def record(p: Tensor, m=m, own=own):
            if own is not None:
                out, mean, var = own(p)
            else:
                var, mean = torch.var_mean(p, [0] + list(range(2, p.dim())), unbiased=False)
                out = m(p)
            stats[id(m)] = (mean, var)
            return out, mean, var

        m.forward_with_stats = record
        wrapped.append(m)
    try:
        yield stats
    finally:
        for m in wrapped:
            del m.forward_with_stats


def _live_network(net: Network, stats: Dict[int, Tuple[Tensor, Tensor]]) -> Network:
    """``net`` with every BatchNorm node replaced by its affine map (batch or running statistics)."""
    nodes = []
    for node in net.nodes:
        rule = node.rule
        if isinstance(rule, BatchNorm):
            m = rule.module
            if m.training:
                if id(m) not in stats:
                    raise ValueError("CROWN-IBP through train-mode BatchNorm needs the point whose batch "
                                     "statistics define the layer (pass point=...), or put the model in eval mode")
                mean, var = stats[id(m)]
            else:
                mean, var = m.running_mean, m.running_var
            scale, shift = bn_scale_shift(m, mean, var)
            rule = _StatsAffine(m, scale, shift, node.name)
        nodes.append(Node(node.name, rule, node.inputs))
    return Network(nodes)


def crown_ibp_bounds(model: nn.Module, lower: Tensor, upper: Tensor, labels: Tensor,
                     point: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, IntervalBounds]:
    """Differentiable CROWN-IBP and IBP lower bounds of z_y − z_j over the box [lower, upper].

    Args:
        model: a :class:`~certkd.models.CertifiableNet` (or any network whose last layer is a Linear),
            in train or eval mode.
        lower, upper: (N, C, H, W) pixel-space box.
        labels: (N,) true classes.
        point: (N, C, H, W) the point carried through the IBP pass (required with train-mode BN:
            its batch statistics define the layer in both bounds).
    Returns:
        (CROWN-IBP bounds (N, K−1), IBP bounds (N, K−1), the IBP feature bounds of
        :func:`certkd.bounds.ibp.ibp_logit_difference_bounds`). Both bounds are sound for the
        network as evaluated (with train-mode BN: normalised by the point's statistics).
    """
    with _recording_bn_stats(model) as stats:
        lb_ibp, fb = ibp_logit_difference_bounds(model, lower, upper, labels, point=point)
    net = _live_network(from_module(model), stats)
    last = net.nodes[net.output]
    if type(last.rule) is not Linear:
        raise TypeError("crown_ibp_bounds needs a network whose last layer is a Linear")
    plan = _Plan(net, lower.shape[1:])  # no BatchNorm node is left, so nothing is folded or refused
    if len(fb.preactivations) != len(plan.acts):
        raise ValueError(f"the IBP pass saw {len(fb.preactivations)} activations, the graph has {len(plan.acts)}")
    # each activation's own rule relaxes it (docs/adding_a_layer.md), as in verification
    relax = [plan.nodes[i].rule.relax(c - r, c + r) for i, (c, r) in zip(plan.acts, fb.preactivations)]
    head = last.rule.module
    C = specification_matrix(labels, head.out_features).to(lower.dtype)  # (N, K−1, K)
    A0 = C @ head.weight
    bias0 = C @ head.bias if head.bias is not None else A0.new_zeros(A0.shape[:2])
    with live_parameters():
        A, bias = _backward(plan, last.inputs[0], A0, bias0, relax)
    lb_crown = _concretize(A, bias, (upper + lower) / 2, (upper - lower) / 2)
    return lb_crown, lb_ibp, fb


__all__ = ["crown_ibp_bounds"]
