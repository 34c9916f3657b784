"""Build a :class:`~certkd.graph.network.Network` from an ONNX file (``docs/adding_a_layer.md``).

The network computes what the ONNX model computes at batch size 1 (symbolic dimensions read as
1), in the model's own precision: a float32 model gives a float32 network, a float64 (DOUBLE)
model a float64 one (``net.onnx_dtype`` records which); float16/bfloat16 and integer models are
refused. When the ONNX input's first dimension is 1 or symbolic, it is the batch and the
per-sample shape (``net.input_shape``) drops it; otherwise (a 1-D input, or a fixed first
dimension > 1) the whole tensor is one sample. Per-operator builders are in
:mod:`certkd.graph.onnx_ops` (supported operators and attributes: :data:`SUPPORTED_OPS` and that
module's docstring). ``Constant`` nodes and operations whose inputs are all constant (``Shape``
of a computed tensor included) are evaluated at import.

Anything else raises :class:`~certkd.graph.layers.UnsupportedLayerError` (a ``CertkdError``):
one line naming the operator, the node and the attribute or reason.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

import certkd.graph.layers  # noqa: F401  (registers the rule classes)
from certkd.errors import CertkdError
from certkd.graph.convert import make_rule
from certkd.graph.layers.base import Shape
from certkd.graph.layers.reshape import Reshape
from certkd.graph.network import InputLayer, Network, Node
from certkd.graph.onnx_ops import OPS, SUPPORTED_OPS, unsupported

#: evaluated at import when all their inputs are constant
_CONST_OPS = ("Shape", "Gather", "Unsqueeze", "Squeeze", "Concat", "Cast")
_DTYPES = {1: torch.float32, 11: torch.float64}  # ONNX TensorProto FLOAT, DOUBLE


def _elem_type_name(t: int) -> str:
    from onnx import TensorProto

    try:
        return TensorProto.DataType.Name(t)
    except ValueError:
        return f"type {t}"


class _Importer:
    """Walks the ONNX nodes (topologically sorted, as ONNX requires) and appends graph nodes.

    Every computed tensor is one graph node with a per-sample shape and a ``lead`` (0 or 1): its
    ONNX shape at batch size 1 is ``(1,) * lead + per-sample shape``.
    """

    def __init__(self, model, input_shape: Optional[Sequence[int]]):
        from onnx import numpy_helper

        self.nh = numpy_helper
        self.opset = max([o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] or [1])
        g = model.graph
        self.consts: Dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in g.initializer}
        inputs = [i for i in g.input if i.name not in self.consts]
        if len(inputs) != 1:
            raise CertkdError(f"the ONNX graph has {len(inputs)} inputs; certkd verifies networks with exactly one")
        if len(g.output) != 1:
            raise CertkdError(f"the ONNX graph has {len(g.output)} outputs; certkd verifies networks with exactly one")
        inp = inputs[0]
        etype = inp.type.tensor_type.elem_type
        if etype not in _DTYPES:
            fix = ("convert it to float32 with onnxconverter-common (float16.convert_float16_to_float32)"
                   if etype in (10, 16) else "certkd verifies float32 and float64 networks")
            raise CertkdError(f"ONNX input '{inp.name}' has element type {_elem_type_name(etype)}: {fix}")
        self.dtype: torch.dtype = _DTYPES[etype]
        dims = [d.dim_value if d.dim_value > 0 else 1 for d in inp.type.tensor_type.shape.dim]
        if input_shape is None:
            if not dims:
                raise CertkdError(f"ONNX input '{inp.name}' has no shape; pass input_shape")
            lead = 1 if len(dims) >= 2 and dims[0] == 1 else 0
            input_shape = dims[lead:]
        else:
            input_shape = [int(s) for s in input_shape]
            if dims and len(input_shape) not in (len(dims), len(dims) - 1):
                raise CertkdError(f"input_shape {tuple(input_shape)} does not fit the ONNX input '{inp.name}' of "
                                  f"shape {tuple(dims)}: give it without the batch dimension")
            lead = 0 if dims and len(input_shape) == len(dims) else 1
        self.input_shape: Shape = tuple(int(s) for s in input_shape)
        if not self.input_shape or min(self.input_shape) <= 0:
            raise CertkdError(f"ONNX input '{inp.name}' has per-sample shape {self.input_shape}: certkd needs at "
                              "least one dimension and no empty ones")
        self.nodes: List[Node] = [Node("input", InputLayer(None, "input"), ())]
        self.shapes: List[Shape] = [self.input_shape]
        self.leads: List[int] = [lead]
        self.where: Dict[str, int] = {inp.name: 0}
        self.uses: Dict[str, int] = {}
        for node in g.node:
            for name in node.input:
                self.uses[name] = self.uses.get(name, 0) + 1
        self.output_name = g.output[0].name

    # helpers for the builders (onnx_ops) -------------------------------------------------------
    def add(self, name: str, module: nn.Module, inputs: Tuple[int, ...], lead: Optional[int] = None) -> int:
        """Append ``module`` applied to nodes ``inputs``; ``lead`` defaults to the first input's."""
        rule = make_rule(module, name)
        self.nodes.append(Node(name, rule, inputs))
        self.shapes.append(tuple(rule.out_shape(*[self.shapes[j] for j in inputs])))
        self.leads.append(self.leads[inputs[0]] if lead is None else lead)
        return len(self.nodes) - 1

    def onnx_shape(self, i: int) -> Shape:
        """The ONNX shape of node ``i`` at batch size 1."""
        return (1,) * self.leads[i] + self.shapes[i]

    def reshaped(self, i: int, onnx_shape: Sequence[int], name: str, op: str) -> int:
        """Node ``i`` read as the ONNX shape ``onnx_shape`` (same C-order data); a Reshape if needed."""
        onnx_shape = tuple(int(s) for s in onnx_shape)
        if int(np.prod(onnx_shape)) != int(np.prod(self.shapes[i])):
            raise unsupported(op, name, f"output shape {onnx_shape} for an input of shape {self.onnx_shape(i)}")
        if not onnx_shape:
            raise unsupported(op, name, "a scalar (rank-0) result")
        if onnx_shape == self.onnx_shape(i):
            return i
        lead = 1 if len(onnx_shape) >= 2 and onnx_shape[0] == 1 else 0
        return self.add(name if self.nodes[i].name != name else f"{name}.reshape", Reshape(onnx_shape[lead:]),
                        (i,), lead)

    def batched(self, i: int, op: str, name: str) -> int:
        """Node ``i`` with the ONNX batch axis (size 1) kept out of the per-sample shape."""
        if self.leads[i] == 1:
            return i
        full = self.onnx_shape(i)
        if len(full) < 2 or full[0] != 1:
            raise unsupported(op, name, f"an input of shape {full}: its first (batch) dimension must be 1")
        return self.add(f"{name}.batch", Reshape(full[1:]), (i,), 1)

    def full(self, i: int, name: str) -> int:
        """Node ``i`` with the whole ONNX tensor as the per-sample shape (lead 0)."""
        if self.leads[i] == 0:
            return i
        return self.add(f"{name}.unbatch", Reshape(self.onnx_shape(i)), (i,), 0)

    def tensor(self, a) -> torch.Tensor:
        return torch.tensor(np.array(a), dtype=self.dtype)

    def attrs(self, node) -> dict:
        from onnx import helper

        out = {}
        for a in node.attribute:
            v = helper.get_attribute_value(a)
            out[a.name] = v.decode() if isinstance(v, bytes) else v
        return out

    def const(self, name: str) -> Optional[np.ndarray]:
        return self.consts.get(name) if name else None

    def src(self, name: str, op: str, node_name: str) -> int:
        if name not in self.where:
            raise unsupported(op, node_name, f"input '{name}' is neither the network input nor computed")
        return self.where[name]

    # the walk ----------------------------------------------------------------------------------
    def run(self, graph) -> None:
        for node in graph.node:
            name = node.name or (node.output[0] if node.output else node.op_type)
            op = node.op_type
            ins = list(node.input)
            if node.domain not in ("", "ai.onnx"):
                raise unsupported(f"{node.domain}.{op}", name)
            if op == "Constant":
                self.consts[node.output[0]] = self._constant(node, name)
                continue
            if op not in SUPPORTED_OPS and op not in _CONST_OPS:
                raise unsupported(op, name)
            if ins and all(i == "" or i in self.consts for i in ins):
                self.consts[node.output[0]] = self._fold(node, name)
                continue
            if op in _CONST_OPS:
                if op == "Shape" and ins[0] in self.where and not self.attrs(node):
                    self.consts[node.output[0]] = np.array(self.onnx_shape(self.where[ins[0]]), dtype=np.int64)
                    continue
                raise unsupported(op, name, "only supported on constant inputs")
            used = [o for o in node.output[1:] if o and (self.uses.get(o) or o == self.output_name)]
            if used:
                raise unsupported(op, name, f"its extra output '{used[0]}' is used")
            self.where[node.output[0]] = OPS[op](self, node, name, ins)

    def _constant(self, node, name: str) -> np.ndarray:
        a = self.attrs(node)
        if "value" in a:
            return self.nh.to_array(a["value"])
        for key in ("value_float", "value_int"):
            if key in a:
                return np.array(a[key])
        for key in ("value_floats", "value_ints"):
            if key in a:
                return np.array(list(a[key]))
        raise unsupported("Constant", name, f"attributes {sorted(a)}")

    def _fold(self, node, name: str) -> np.ndarray:
        """Evaluate a node whose inputs are all constant (numpy)."""
        op, a = node.op_type, self.attrs(node)
        xs = [self.consts[i] if i else None for i in node.input]
        if op in ("Add", "Sub", "Mul", "Div"):
            if op == "Div" and not np.issubdtype(np.result_type(xs[0], xs[1]), np.floating) and np.any(xs[1] == 0):
                raise unsupported(op, name, "integer division by a constant 0")
            with np.errstate(divide="ignore", invalid="ignore"):  # IEEE results, as onnxruntime gives
                out = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide}[op](xs[0], xs[1])
            return out.astype(np.result_type(xs[0], xs[1]))
        if op in ("Identity", "Dropout", "Cast"):
            if op == "Cast":
                from onnx import helper
                return xs[0].astype(helper.tensor_dtype_to_np_dtype(a["to"]))
            return xs[0]
        if op == "Gather":
            return np.take(xs[0], xs[1], axis=a.get("axis", 0))
        if op in ("Unsqueeze", "Squeeze"):
            axes = a.get("axes", None) if len(xs) < 2 or xs[1] is None else xs[1].tolist()
            if op == "Unsqueeze":
                return np.expand_dims(xs[0], tuple(axes))
            return np.squeeze(xs[0], axis=None if axes is None else tuple(axes))
        if op == "Concat":
            return np.concatenate(xs, axis=a.get("axis", 0))
        if op == "Reshape" and len(xs) > 1:
            return xs[0].reshape(xs[1])
        if op == "Flatten":
            ax = a.get("axis", 1)
            return xs[0].reshape(int(np.prod(xs[0].shape[:ax])), -1)
        if op == "Transpose":
            return np.transpose(xs[0], a.get("perm", None))
        raise unsupported(op, name, "on constant inputs")

    # result ------------------------------------------------------------------------------------
    def network(self) -> Network:
        if self.output_name not in self.where or self.where[self.output_name] == 0:
            raise CertkdError(f"the ONNX output '{self.output_name}' is not computed from the input")
        out = self.where[self.output_name]
        keep = {out}
        for i in range(out, 0, -1):  # what the output depends on
            if i in keep:
                keep.update(self.nodes[i].inputs)
        keep.add(0)
        mapping: Dict[int, int] = {}
        nodes: List[Node] = []
        for i in sorted(keep):
            n = self.nodes[i]
            nodes.append(Node(n.name, n.rule, tuple(mapping[j] for j in n.inputs)))
            mapping[i] = len(nodes) - 1
        net = Network(nodes).eval()
        net.input_shape = self.input_shape
        net.onnx_dtype = self.dtype
        net.onnx_output_shape = self.onnx_shape(out)
        return net


def from_onnx(path: Union[str, os.PathLike], input_shape: Optional[Sequence[int]] = None) -> Network:
    """Build a :class:`Network` from the ONNX file at ``path``.

    Args:
        path: the .onnx file.
        input_shape: per-sample input shape (without the batch dimension); default: the ONNX
            input's shape without its first dimension when that is 1 or symbolic (symbolic
            dimensions read as 1), else the whole shape.
    Returns:
        the network in eval mode, in the model's precision: ``net.onnx_dtype`` is
        ``torch.float32`` or ``torch.float64`` (the ONNX input's element type) and every
        parameter has that dtype; ``net.input_shape`` holds the per-sample input shape and
        ``net.onnx_output_shape`` the ONNX output's shape at batch size 1.
        Forward: (N, *input_shape) -> (N, *output_shape).
    Raises:
        CertkdError: missing/unreadable file or onnx package, float16/bfloat16/integer models;
            UnsupportedLayerError (a CertkdError) for an unsupported operator or configuration,
            naming it and its node.
    """
    try:
        import onnx
    except ImportError:
        raise CertkdError("reading ONNX needs the onnx package: pip install 'certkd[verify]' (or pip install onnx)") \
            from None
    if not os.path.isfile(path):
        raise CertkdError(f"ONNX file not found: {path}")
    try:
        model = onnx.load(str(path))
    except Exception as e:  # protobuf errors: one line
        raise CertkdError(f"cannot read ONNX file {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") \
            from None
    imp = _Importer(model, input_shape)
    imp.run(model.graph)
    return imp.network()


__all__ = ["SUPPORTED_OPS", "from_onnx"]
