"""CROWN's backward pass (docs/method.md §10.1): the plan of a model, the backward propagation of
linear bounds to the input through each layer's rule (an activation's through its
:class:`~certkd.graph.layers.Relaxation`), and their concretisation over a box.

Used by :mod:`certkd.bounds.crown` (final bounds), :mod:`certkd.bounds.crown_intermediate`
(pre-activation bounds) and :mod:`certkd.bounds.alpha` (α/β optimisation). Shapes: N = batch,
S = rows of the specification, neuron_shape = per-sample shape of an activation's input.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from certkd.graph.convert import fold_batchnorm, from_module
from certkd.graph.layers import BatchNorm, Relaxation

Bounds = Tuple[Tensor, Tensor]


# --------------------------------------------------------------------------------------------
# The plan: the model's graph (certkd.graph) with eval BatchNorm folded; every node's rule class
# supplies its IBP, backward and window rules (an activation: its relaxation). A: (N, S, *out_shape),
# bias: (N, S).
# --------------------------------------------------------------------------------------------

class _Plan:
    """The graph, its node shapes, the activation nodes, and where the backward pass starts."""

    def __init__(self, model: nn.Module, sample_shape: Sequence[int]):
        net = from_module(model)
        for node in net.nodes:
            if isinstance(node.rule, BatchNorm) and node.rule.module.training:
                raise ValueError("CROWN bounds use eval-mode BatchNorm (running statistics); call model.eval()")
        self.net = fold_batchnorm(net)
        self.nodes = self.net.nodes
        self.shapes = self.net.shapes(tuple(sample_shape))
        self.acts = self.net.activation_nodes()
        self.act_index = {node: k for k, node in enumerate(self.acts)}

    def in_shapes(self, i: int) -> List[Tuple[int, ...]]:
        return [self.shapes[j] for j in self.nodes[i].inputs]

    # a sequence view for callers of the former flat plan: item i is node i + 1 (activations as markers)
    def __len__(self) -> int:
        return len(self.nodes) - 1

    def __getitem__(self, i: int):
        node = i + 1
        if node in self.act_index:
            return _ActivationMarker(self.act_index[node], self.shapes[node])
        return self.nodes[node].rule


class _ActivationMarker:
    """Activation marker of the sequence view of a :class:`_Plan` (index k, neuron shape)."""

    def __init__(self, index: int, shape: Sequence[int]):
        self.index, self.shape = index, tuple(shape)


def _build_plan(features: nn.Module, sample_shape, dtype=None, device=None) -> _Plan:
    """The plan of ``features`` (parameters are read detached, in the box's dtype, when used)."""
    return _Plan(features, sample_shape)


# --------------------------------------------------------------------------------------------
# Core passes
# --------------------------------------------------------------------------------------------

def _backward(plan: _Plan, start: int, A: Tensor, bias: Tensor, relax: Sequence[Relaxation],
              alpha: Optional[Sequence[Optional[Tensor]]] = None,
              beta: Optional[Sequence[Optional[Tensor]]] = None,
              split_signs: Optional[Sequence[Optional[Tensor]]] = None,
              capture: Optional[Dict[int, Tensor]] = None) -> Tuple[Tensor, Tensor]:
    """Propagate A (on the output of node ``start``) back to the network input (node 0).

    Nodes are visited in reverse topological order; a node read by several others (the fork of a
    residual block) sums the coefficients coming from each of them before its own rule runs.

    ``capture``: if given, receives for every activation index the coefficients A (N, S, *shape) on
    that activation's *output* (the dual variables a branching heuristic scores neurons with).

    β-CROWN split multipliers: a neuron split with sign s (+1 active: z ≥ 0, −1 inactive: z ≤ 0)
    satisfies s·z ≥ 0 on its sub-domain, so f ≥ f − β·s·z there for any β ≥ 0; the term −β·s
    is added to the coefficients of the pre-activation z (Wang et al. 2021, Lagrangian of the
    split constraints). ``beta[k]`` (N, S, *shape) must be ≥ 0; ``split_signs[k]`` (N, *shape)
    is 0 on neurons that are not split.
    """
    pending: Dict[int, Tensor] = {start: A}
    for i in range(start, 0, -1):
        A = pending.pop(i, None)
        if A is None:
            continue
        node = plan.nodes[i]
        k = plan.act_index.get(i)
        if k is not None:
            if capture is not None:
                capture[k] = A.detach()
            a = None if alpha is None else alpha[k]
            A, bias = relax[k].backward(A, bias, a)
            if beta is not None and beta[k] is not None:
                A = A - beta[k] * split_signs[k].unsqueeze(1)
            outs = [A]
        else:
            outs, bias = node.rule.backward(A, bias, plan.in_shapes(i), plan.shapes[i])
        for j, Aj in zip(node.inputs, outs):
            if Aj is not None:
                pending[j] = pending[j] + Aj if j in pending else Aj
    A = pending.get(0)
    if A is None:  # the output does not depend on the input
        A = bias.new_zeros(bias.shape + tuple(plan.shapes[0]))
    return A, bias


def _concretize(A: Tensor, bias: Tensor, c: Tensor, r: Tensor) -> Tensor:
    """min over the box of A·x + bias: A (N, S, *in), c/r (N, *in) -> (N, S)."""
    A = A.flatten(2)
    return bias + torch.einsum("nsd,nd->ns", A, c.flatten(1)) - torch.einsum("nsd,nd->ns", A.abs(), r.flatten(1))
