"""Build a :class:`~certkd.graph.network.Network` from an ONNX file (``docs/adding_a_layer.md``).

Every ONNX node becomes one node of the graph with the rule class of the matching torch module
(weights from the initializers and ``Constant`` nodes, cast to float32):

* ``Gemm`` (``transA=0``) and ``MatMul`` by a constant -> :class:`torch.nn.Linear`; an ``Add`` of a
  constant right after a bias-free MatMul becomes that Linear's bias;
* ``Conv`` (2-D, symmetric pads, ``auto_pad`` NOTSET/VALID, SAME_UPPER at stride 1) -> ``nn.Conv2d``;
* ``Relu``; ``Flatten`` (``axis=1``); ``Reshape`` by a constant shape whose first entry is the
  batch (``-1``, ``0`` or ``1``);
* ``Sub`` / ``Div`` / ``Mul`` / ``Add`` with one constant operand -> an elementwise affine map
  (input normalisation); ``Add`` of two computed tensors of the same shape -> a residual Add;
* ``AveragePool`` (2-D) -> ``nn.AvgPool2d``; ``BatchNormalization`` -> eval-mode BatchNorm1d/2d;
* ``Identity`` and ``Dropout`` (inference) -> the identity; ``Constant`` and operations whose
  inputs are all constant (``Shape`` of a computed tensor included, with batch size 1) are
  evaluated at import.

Anything else raises :class:`~certkd.graph.layers.UnsupportedLayerError` (a ``CertkdError``):
one line naming the operator and the node. Shapes are per sample: the ONNX input's first
dimension is the batch.
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
from certkd.graph.layers import AddModule, ScaleShiftModule, UnsupportedLayerError
from certkd.graph.layers.base import Shape
from certkd.graph.layers.reshape import Reshape
from certkd.graph.network import InputLayer, Network, Node

SUPPORTED_OPS = ("Add", "AveragePool", "BatchNormalization", "Constant", "Conv", "Div", "Dropout", "Flatten",
                 "Gemm", "Identity", "MatMul", "Mul", "Relu", "Reshape", "Sub")
#: evaluated at import when all their inputs are constant
_CONST_OPS = ("Shape", "Gather", "Unsqueeze", "Squeeze", "Concat", "Cast")


def _unsupported(op: str, name: str, why: str = "") -> UnsupportedLayerError:
    extra = f": {why}" if why else ""
    return UnsupportedLayerError(f"unsupported ONNX operator {op} at node '{name}'{extra} "
                                 f"(supported: {', '.join(SUPPORTED_OPS)})")


class _Importer:
    """Walks the ONNX nodes (topologically sorted, as ONNX requires) and appends graph nodes."""

    def __init__(self, model, input_shape: Optional[Sequence[int]]):
        from onnx import numpy_helper

        self.nh = numpy_helper
        g = model.graph
        self.consts: Dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in g.initializer}
        inputs = [i for i in g.input if i.name not in self.consts]
        if len(inputs) != 1:
            raise CertkdError(f"the ONNX graph has {len(inputs)} inputs; certkd verifies networks with exactly one")
        if len(g.output) != 1:
            raise CertkdError(f"the ONNX graph has {len(g.output)} outputs; certkd verifies networks with exactly one")
        dims = [d.dim_value if d.dim_value > 0 else 1 for d in inputs[0].type.tensor_type.shape.dim]
        if input_shape is None:
            if len(dims) < 2:
                raise CertkdError(f"ONNX input '{inputs[0].name}' has shape {dims}: expected (batch, ...); "
                                  "pass input_shape")
            input_shape = dims[1:]
        self.input_shape: Shape = tuple(int(s) for s in input_shape)
        self.nodes: List[Node] = [Node("input", InputLayer(None, "input"), ())]
        self.shapes: List[Shape] = [self.input_shape]
        self.where: Dict[str, int] = {inputs[0].name: 0}
        self.uses: Dict[str, int] = {}
        for node in g.node:
            for name in node.input:
                self.uses[name] = self.uses.get(name, 0) + 1
        self.output_name = g.output[0].name

    # helpers -----------------------------------------------------------------------------------
    def add(self, name: str, module: nn.Module, inputs: Tuple[int, ...]) -> int:
        rule = make_rule(module, name)
        self.nodes.append(Node(name, rule, inputs))
        self.shapes.append(tuple(rule.out_shape(*[self.shapes[j] for j in inputs])))
        return len(self.nodes) - 1

    def attrs(self, node) -> dict:
        from onnx import helper

        return {a.name: helper.get_attribute_value(a) for a in node.attribute}

    def const(self, name: str) -> Optional[np.ndarray]:
        return self.consts.get(name)

    # operators ---------------------------------------------------------------------------------
    def run(self, graph) -> None:
        for node in graph.node:
            name = node.name or (node.output[0] if node.output else node.op_type)
            op = node.op_type
            ins = [i for i in node.input]
            if op == "Constant":
                self.consts[node.output[0]] = self._constant(node, name)
                continue
            if op not in SUPPORTED_OPS and op not in _CONST_OPS:
                raise _unsupported(op, name)
            if all(i == "" or i in self.consts for i in ins) and ins:
                self.consts[node.output[0]] = self._fold(node, name)
                continue
            if op in _CONST_OPS:
                if op == "Shape" and ins[0] in self.where:
                    self.consts[node.output[0]] = np.array((1,) + self.shapes[self.where[ins[0]]], dtype=np.int64)
                    continue
                raise _unsupported(op, name, "only supported on constant inputs")
            self.where[node.output[0]] = getattr(self, "_" + op.lower())(node, name, ins)

    def _src(self, name: str, op: str, node_name: str) -> int:
        if name not in self.where:
            raise _unsupported(op, node_name, f"input '{name}' is neither the network input nor computed")
        return self.where[name]

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
        raise _unsupported("Constant", name, f"attributes {sorted(a)}")

    def _fold(self, node, name: str) -> np.ndarray:
        """Evaluate a node whose inputs are all constant (numpy)."""
        op, a = node.op_type, self.attrs(node)
        xs = [self.consts[i] if i else None for i in node.input]
        if op in ("Add", "Sub", "Mul", "Div"):
            return {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide}[op](xs[0], xs[1])
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
        if op == "Reshape":
            return xs[0].reshape(xs[1])
        if op == "Flatten":
            ax = a.get("axis", 1)
            return xs[0].reshape(int(np.prod(xs[0].shape[:ax])), -1)
        raise _unsupported(op, name, "on constant inputs")

    def _gemm(self, node, name, ins):
        a = self.attrs(node)
        if a.get("transA", 0):
            raise _unsupported("Gemm", name, "transA=1")
        src = self._src(ins[0], "Gemm", name)
        w = self.const(ins[1])
        if w is None:
            raise _unsupported("Gemm", name, "B must be a constant (an initializer)")
        w = (w if a.get("transB", 0) else w.T) * a.get("alpha", 1.0)
        b = self.const(ins[2]) if len(ins) > 2 and ins[2] else None
        if len(ins) > 2 and ins[2] and b is None:
            raise _unsupported("Gemm", name, "C must be a constant")
        return self._linear(name, w, None if b is None else np.broadcast_to(b * a.get("beta", 1.0), (w.shape[0],)),
                            src)

    def _matmul(self, node, name, ins):
        w = self.const(ins[1])
        if w is None or w.ndim != 2:
            raise _unsupported("MatMul", name, "the second operand must be a constant matrix")
        return self._linear(name, w.T, None, self._src(ins[0], "MatMul", name))

    def _linear(self, name: str, w: np.ndarray, b: Optional[np.ndarray], src: int) -> int:
        if self.shapes[src][-1] != w.shape[1]:
            raise _unsupported("Gemm/MatMul", name, f"input of size {self.shapes[src][-1]}, weight {w.shape}")
        lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
        with torch.no_grad():
            lin.weight.copy_(torch.tensor(np.array(w), dtype=torch.float32))
            if b is not None:
                lin.bias.copy_(torch.tensor(np.array(b), dtype=torch.float32))
        return self.add(name, lin, (src,))

    def _conv(self, node, name, ins):
        a = self.attrs(node)
        w = self.const(ins[1])
        if w is None or w.ndim != 4:
            raise _unsupported("Conv", name, "only 2-D convolutions with constant weights")
        b = self.const(ins[2]) if len(ins) > 2 and ins[2] else None
        k = tuple(w.shape[2:])
        stride = tuple(a.get("strides", (1, 1)))
        dil = tuple(a.get("dilations", (1, 1)))
        auto = a.get("auto_pad", b"NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else auto
        pads = tuple(a.get("pads", (0, 0, 0, 0)))
        if auto == "VALID":
            padding: Union[str, Tuple[int, int]] = (0, 0)
        elif auto in ("SAME_UPPER",) and stride == (1, 1):
            padding = "same"
        elif auto == "NOTSET" and pads[0] == pads[2] and pads[1] == pads[3]:
            padding = (pads[0], pads[1])
        else:
            raise _unsupported("Conv", name, f"padding auto_pad={auto} pads={pads} strides={stride}")
        groups = int(a.get("group", 1))
        cin = w.shape[1] * groups
        conv = nn.Conv2d(cin, w.shape[0], k, stride=stride, padding=padding, dilation=dil, groups=groups,
                         bias=b is not None)
        with torch.no_grad():
            conv.weight.copy_(torch.tensor(np.array(w), dtype=torch.float32))
            if b is not None:
                conv.bias.copy_(torch.tensor(np.array(b), dtype=torch.float32))
        return self.add(name, conv, (self._src(ins[0], "Conv", name),))

    def _relu(self, node, name, ins):
        return self.add(name, nn.ReLU(), (self._src(ins[0], "Relu", name),))

    def _identity(self, node, name, ins):
        return self.add(name, nn.Identity(), (self._src(ins[0], node.op_type, name),))

    _dropout = _identity

    def _flatten(self, node, name, ins):
        if self.attrs(node).get("axis", 1) != 1:
            raise _unsupported("Flatten", name, "only axis=1 (the batch dimension is kept)")
        return self.add(name, nn.Flatten(1, -1), (self._src(ins[0], "Flatten", name),))

    def _reshape(self, node, name, ins):
        src = self._src(ins[0], "Reshape", name)
        shape = self.const(ins[1])
        if shape is None:
            raise _unsupported("Reshape", name, "the target shape must be a constant")
        shape = [int(s) for s in shape.reshape(-1)]
        if not shape or shape[0] not in (-1, 0, 1):
            raise _unsupported("Reshape", name, f"target shape {shape} does not keep the batch dimension first")
        rest = [self.shapes[src][i - 1] if s == 0 else s for i, s in enumerate(shape) if i > 0]
        n = int(np.prod(self.shapes[src]))
        if rest.count(-1) == 1:
            known = int(np.prod([s for s in rest if s != -1])) or 1
            rest[rest.index(-1)] = n // known
        if int(np.prod(rest)) != n:
            raise _unsupported("Reshape", name, f"target shape {shape} for an input of shape {self.shapes[src]}")
        return self.add(name, Reshape(rest), (src,))

    def _elementwise(self, node, name, ins):
        op = node.op_type
        c0, c1 = self.const(ins[0]), self.const(ins[1])
        if c0 is None and c1 is None:
            if op != "Add":
                raise _unsupported(op, name, "of two computed tensors (only Add, a residual merge, is supported)")
            a, b = self._src(ins[0], op, name), self._src(ins[1], op, name)
            if self.shapes[a] != self.shapes[b]:
                raise _unsupported(op, name, f"of shapes {self.shapes[a]} and {self.shapes[b]} (no broadcasting)")
            return self.add(name, AddModule(), (a, b))
        x_first = c0 is None
        src = self._src(ins[0] if x_first else ins[1], op, name)
        c = (c1 if x_first else c0).astype(np.float64)
        shape = self.shapes[src]
        if c.ndim > len(shape) + 1 or np.broadcast_shapes(c.shape, (1,) + shape) != (1,) + shape:
            raise _unsupported(op, name, f"constant of shape {c.shape} does not broadcast to {(1,) + shape}")
        if op == "Add" and x_first and self._merge_bias(src, c):
            return src
        one, zero = np.ones_like(c), np.zeros_like(c)
        scale, shift = {"Add": (one, c), "Mul": (c, zero), "Sub": (one, -c) if x_first else (-one, c),
                        "Div": (1.0 / c, zero) if x_first else (None, None)}[op]
        if scale is None:
            raise _unsupported(op, name, "a constant divided by a computed tensor")
        mod = ScaleShiftModule(torch.tensor(np.array(scale)), torch.tensor(np.array(shift)), op=op.lower())
        return self.add(name, mod, (src,))

    _add = _sub = _mul = _div = _elementwise

    def _merge_bias(self, src: int, c: np.ndarray) -> bool:
        """MatMul + Add(constant vector): the constant becomes the Linear's bias (if nothing else reads it)."""
        node = self.nodes[src]
        mod = node.rule.module
        if not isinstance(mod, nn.Linear) or mod.bias is not None or c.size != mod.out_features:
            return False
        if c.ndim > 1 and c.shape[-1] != mod.out_features:
            return False
        out_name = [k for k, v in self.where.items() if v == src]
        if any(self.uses.get(k, 0) != 1 for k in out_name) or self.output_name in out_name:
            return False
        mod.bias = nn.Parameter(torch.tensor(np.array(c.reshape(-1)), dtype=torch.float32))
        self.nodes[src] = Node(node.name, make_rule(mod, node.name), node.inputs)
        return True

    def _averagepool(self, node, name, ins):
        a = self.attrs(node)
        k = tuple(a["kernel_shape"])
        pads = tuple(a.get("pads", (0, 0, 0, 0)))
        auto = a.get("auto_pad", b"NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else auto
        if len(k) != 2 or auto not in ("NOTSET", "VALID") or pads[0] != pads[2] or pads[1] != pads[3]:
            raise _unsupported("AveragePool", name, f"kernel {k}, auto_pad={auto}, pads={pads}")
        pool = nn.AvgPool2d(k, stride=tuple(a.get("strides", k)), padding=(pads[0], pads[1]),
                            ceil_mode=bool(a.get("ceil_mode", 0)),
                            count_include_pad=bool(a.get("count_include_pad", 0)) or pads == (0, 0, 0, 0))
        return self.add(name, pool, (self._src(ins[0], "AveragePool", name),))

    def _batchnormalization(self, node, name, ins):
        a = self.attrs(node)
        src = self._src(ins[0], "BatchNormalization", name)
        params = [self.const(i) for i in ins[1:5]]
        if any(p is None for p in params) or a.get("training_mode", 0):
            raise _unsupported("BatchNormalization", name, "needs constant scale, bias, mean and variance "
                                                            "(inference mode)")
        c = params[0].size
        shape = self.shapes[src]
        bn = (nn.BatchNorm2d if len(shape) == 3 else nn.BatchNorm1d)(c, eps=float(a.get("epsilon", 1e-5)))
        with torch.no_grad():
            for t, p in zip((bn.weight, bn.bias, bn.running_mean, bn.running_var), params):
                t.copy_(torch.tensor(np.array(p), dtype=torch.float32))
        return self.add(name, bn.eval(), (src,))

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
        return net


def from_onnx(path: Union[str, os.PathLike], input_shape: Optional[Sequence[int]] = None) -> Network:
    """Build a :class:`Network` from the ONNX file at ``path``.

    Args:
        path: the .onnx file.
        input_shape: per-sample input shape (without the batch dimension); default: the ONNX
            input's shape without its first (batch) dimension (symbolic dimensions read as 1).
    Returns:
        the network in eval mode, float32; ``net.input_shape`` holds the per-sample input shape.
        Forward: (N, *input_shape) -> (N, *output_shape).
    Raises:
        CertkdError: missing/unreadable file or onnx package; UnsupportedLayerError (a CertkdError)
            for an unsupported operator or configuration, naming it and its node.
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
