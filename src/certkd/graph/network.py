"""The one network representation every engine walks: a small DAG of :class:`Node` s.

Node 0 is the input; every other node applies one rule class (``certkd/graph/layers/``) to
earlier nodes, so the list is in topological order and the last node is the output. A
:class:`Network` is an ``nn.Module`` (its forward walks the nodes), holding the original
layer modules, so weights stay shared with the model it was built from. See
``docs/adding_a_layer.md``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch
from torch import Tensor, nn

from certkd.graph.layers.activation import Activation
from certkd.graph.layers.base import Layer, Shape


class InputLayer(Layer):
    """Node 0: the network input."""

    def forward(self, x: Tensor) -> Tensor:  # pragma: no cover - never called
        return x


@dataclass
class Node:
    """One layer application. inputs: indices of earlier nodes (0 = the network input)."""

    name: str
    rule: Layer
    inputs: Tuple[int, ...]


class Network(nn.Module):
    """A DAG of layer rules; forward (N, *input_shape) -> (N, *output_shape)."""

    def __init__(self, nodes: Sequence[Node]):
        super().__init__()
        self.nodes: List[Node] = list(nodes)
        if not self.nodes or not isinstance(self.nodes[0].rule, InputLayer):
            raise ValueError("node 0 must be the input")
        for i, node in enumerate(self.nodes[1:], 1):
            if not node.inputs or any(not 0 <= j < i for j in node.inputs):
                raise ValueError(f"node {i} ('{node.name}') has inputs {node.inputs}: not earlier nodes")
        mods = {}
        for node in self.nodes:
            if node.rule.module is not None and id(node.rule.module) not in mods:
                mods[id(node.rule.module)] = node.rule.module
        self.layers = nn.ModuleList(mods.values())
        self._shapes: Dict[Shape, List[Shape]] = {}

    @property
    def output(self) -> int:
        return len(self.nodes) - 1

    def activation_nodes(self) -> List[int]:
        """Indices of the activation nodes, in order (the "activation index" k of the engines)."""
        return [i for i, n in enumerate(self.nodes) if isinstance(n.rule, Activation)]

    def consumers(self) -> List[List[int]]:
        out: List[List[int]] = [[] for _ in self.nodes]
        for i, node in enumerate(self.nodes):
            for j in node.inputs:
                out[j].append(i)
        return out

    def shapes(self, input_shape: Sequence[int]) -> List[Shape]:
        """Per-sample output shape of every node for a per-sample input shape (cached)."""
        key = tuple(int(s) for s in input_shape)
        if key not in self._shapes:
            shapes: List[Shape] = [key]
            for node in self.nodes[1:]:
                shapes.append(tuple(node.rule.out_shape(*[shapes[j] for j in node.inputs])))
            self._shapes[key] = shapes
        return self._shapes[key]

    def forward(self, x: Tensor) -> Tensor:
        vals: List[Tensor] = [x]
        for node in self.nodes[1:]:
            vals.append(node.rule.forward(*[vals[j] for j in node.inputs]))
        return vals[-1]

    def extra_repr(self) -> str:
        return "\n".join(f"{i}: {n.name} = {type(n.rule).__name__}{list(n.inputs)}" for i, n in enumerate(self.nodes))


__all__ = ["InputLayer", "Network", "Node", "torch"]
