"""Per-operator builders of the ONNX importer (:mod:`certkd.graph.onnx_import`, ``docs/adding_a_layer.md``).

Each builder turns one ONNX node into graph nodes with rule classes and returns the node that
holds its output. Supported (at batch size 1, every other configuration is refused in one line):

* ``Gemm`` (any ``alpha``, ``beta``, ``transA``, ``transB``; bias C that broadcasts to the
  output) and ``MatMul`` by a constant matrix or vector -> ``nn.Linear`` (an ``Add`` of a
  constant right after a bias-free MatMul becomes its bias; a bias that varies by row, a
  ``ScaleShift``; ``transA`` a ``Permute``);
* ``Conv`` (2-D, any pads / ``auto_pad``; asymmetric pads as a constant ``Pad``) -> ``nn.Conv2d``;
* ``AveragePool`` (2-D: ``strides`` default 1, ``pads``, ``auto_pad``, ``ceil_mode``,
  ``count_include_pad``, ``dilations``) -> zero ``Pad`` (when needed) + ``nn.AvgPool2d`` (or a
  depthwise ``nn.Conv2d`` when dilated) + a per-position divisor correction (``ScaleShift``);
  ``GlobalAveragePool`` -> ``nn.AvgPool2d`` over the whole image;
* ``BatchNormalization`` (inference) -> eval-mode BatchNorm1d/2d, or an elementwise ``ScaleShift``;
* ``Relu``, ``LeakyRelu`` (``alpha`` in [0, 1]), ``Sigmoid``, ``Tanh``; ``Identity`` and ``Dropout``
  (inference) -> the identity;
* ``Flatten`` (any axis), ``Reshape`` (constant shape; the ``shape`` attribute before opset 5)
  -> ``Reshape``; ``Transpose`` -> ``Permute``; ``Pad`` in ``constant`` mode -> ``ConstantPad``;
* ``Add``/``Sub``/``Mul``/``Div`` with one constant operand (no division by 0) -> ``ScaleShift``;
  ``Add``/``Sub`` of two computed tensors of one shape -> a residual Add.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from certkd.graph.layers import AddModule, ScaleShiftModule, UnsupportedLayerError
from certkd.graph.layers.pad import ConstantPad
from certkd.graph.layers.transpose import Permute

OPS: Dict[str, Callable] = {}


def _op(*names: str):
    def deco(fn):
        for n in names:
            OPS[n] = fn
        return fn
    return deco


def unsupported(op: str, name: str, why: str = "") -> UnsupportedLayerError:
    """One line naming the operator, its node and the reason."""
    extra = f": {why}" if why else ""
    return UnsupportedLayerError(f"unsupported ONNX operator {op} at node '{name}'{extra} "
                                 f"(supported: {', '.join(SUPPORTED_OPS)})")


def _scale_shift(imp, name: str, scale: np.ndarray, shift: np.ndarray, src: int, op: str) -> int:
    mod = ScaleShiftModule(torch.zeros(()), torch.zeros(()), op=op)
    mod.scale, mod.shift = imp.tensor(scale), imp.tensor(shift)  # in the model's dtype, rounded once
    return imp.add(name, mod, (src,))


def _linear(imp, name: str, w: np.ndarray, b: Optional[np.ndarray], src: int) -> int:
    """y = x wᵀ + b on the last per-sample axis; w (out, in)."""
    if imp.shapes[src][-1] != w.shape[1]:
        raise unsupported("Gemm/MatMul", name, f"input of shape {imp.onnx_shape(src)}, weight {w.shape[::-1]}")
    lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, dtype=imp.dtype)
    with torch.no_grad():
        lin.weight.copy_(imp.tensor(w))
        if b is not None:
            lin.bias.copy_(imp.tensor(b))
    return imp.add(name, lin, (src,))


def _constant_operand(imp, op: str, name: str, ins: Sequence[str], k: int, what: str) -> np.ndarray:
    c = imp.const(ins[k]) if len(ins) > k else None
    if c is None:
        raise unsupported(op, name, f"{what} must be a constant (an initializer)")
    if not np.issubdtype(c.dtype, np.floating):
        raise unsupported(op, name, f"{what} has element type {c.dtype} (expected floating point)")
    return c


@_op("Gemm")
def gemm(imp, node, name, ins):
    a = imp.attrs(node)
    alpha, beta = float(a.get("alpha", 1.0)), float(a.get("beta", 1.0))
    ta, tb = int(a.get("transA", 0)), int(a.get("transB", 0))
    src = imp.src(ins[0], "Gemm", name)
    w = _constant_operand(imp, "Gemm", name, ins, 1, "B")
    full = imp.onnx_shape(src)
    if len(full) != 2 or w.ndim != 2:
        raise unsupported("Gemm", name, f"A of shape {full} and B of shape {w.shape} (both must be matrices)")
    m, k = full[::-1] if ta else full
    bm = w.T if tb else w  # (K, N)
    if bm.shape[0] != k:
        raise unsupported("Gemm", name, f"A of shape {full} and B of shape {w.shape} (transA={ta}, transB={tb})")
    n = bm.shape[1]
    c = _constant_operand(imp, "Gemm", name, ins, 2, "C") if len(ins) > 2 and ins[2] else None
    if c is not None:
        try:
            ok = np.broadcast_shapes(c.shape, (m, n)) == (m, n)
        except ValueError:
            ok = False
        if not ok:
            raise unsupported("Gemm", name, f"bias C of shape {c.shape} does not broadcast to the output ({m}, {n}) "
                                            "at batch size 1")
    if ta:
        src = imp.add(f"{name}.transA", Permute((1, 0)), (imp.full(src, name),), 0)
    weight = bm.astype(np.float64).T * alpha
    row = c is None or c.ndim < 2 or c.shape[0] == 1  # the same bias for every row
    bias = None if c is None or not row else np.broadcast_to(c.reshape(c.shape[-1:]), (n,)) * beta
    out = _linear(imp, name if row else f"{name}.matmul", weight, bias, src)
    if not row:  # C of shape (M, N) or (M, 1), M > 1: the rows are per-sample rows (lead 0)
        shift = c.astype(np.float64) * beta
        out = _scale_shift(imp, name, np.ones_like(shift), shift, out, "add")
    return out


@_op("MatMul")
def matmul(imp, node, name, ins):
    src = imp.src(ins[0], "MatMul", name)
    w = _constant_operand(imp, "MatMul", name, ins, 1, "the second operand")
    full = imp.onnx_shape(src)
    if w.ndim == 2:
        return _linear(imp, name, w.T, None, src)
    if w.ndim == 1:
        out = _linear(imp, f"{name}.vector", w.reshape(1, -1), None, src)
        return imp.reshaped(out, full[:-1], name, "MatMul")
    raise unsupported("MatMul", name, f"second operand of shape {w.shape} (a batched MatMul; only a constant "
                                      "matrix or vector)")


def _pads_2d(op: str, name: str, a: dict, size: Sequence[int], k, s, d) -> Tuple[List[Tuple[int, int]], str]:
    """Per-axis (begin, end) padding of a 2-D conv/pool and the auto_pad mode."""
    auto = a.get("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads = []
        for i in range(2):
            total = max(0, (math.ceil(size[i] / s[i]) - 1) * s[i] + (k[i] - 1) * d[i] + 1 - size[i])
            small = total // 2
            pads.append((small, total - small) if auto == "SAME_UPPER" else (total - small, small))
        return pads, auto
    if auto == "VALID":
        return [(0, 0), (0, 0)], auto
    if auto != "NOTSET":
        raise unsupported(op, name, f"auto_pad={auto}")
    p = [int(v) for v in a.get("pads", (0, 0, 0, 0))]
    if len(p) != 4 or min(p) < 0:
        raise unsupported(op, name, f"pads={p} (2-D, non-negative)")
    return [(p[0], p[2]), (p[1], p[3])], auto


def _hyper(op: str, name: str, a: dict, k) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    s = tuple(int(v) for v in a.get("strides", (1, 1)))
    d = tuple(int(v) for v in a.get("dilations", (1, 1)))
    if len(k) != 2 or len(s) != 2 or len(d) != 2:
        raise unsupported(op, name, f"kernel_shape={tuple(k)} (only 2-D)")
    return s, d


def _padded(imp, name: str, src: int, pads: Sequence[Tuple[int, int]], limit) -> Tuple[int, Tuple[int, int]]:
    """(source, symmetric padding for the torch layer): a zero Pad node unless the layer can pad
    itself (symmetric, at most ``limit`` per axis)."""
    if all(b == e and 0 <= b <= limit[i] for i, (b, e) in enumerate(pads)):
        return src, (pads[0][0], pads[1][0])
    return imp.add(f"{name}.pad", ConstantPad([(0, 0)] + list(pads), 0.0), (src,)), (0, 0)


@_op("Conv")
def conv(imp, node, name, ins):
    a = imp.attrs(node)
    w = _constant_operand(imp, "Conv", name, ins, 1, "the weight")
    if w.ndim != 4:
        raise unsupported("Conv", name, f"weight of shape {w.shape} (only 2-D convolutions)")
    b = _constant_operand(imp, "Conv", name, ins, 2, "the bias") if len(ins) > 2 and ins[2] else None
    src = imp.batched(imp.src(ins[0], "Conv", name), "Conv", name)
    shape, k = imp.shapes[src], tuple(w.shape[2:])
    s, d = _hyper("Conv", name, a, k)
    groups = int(a.get("group", 1))
    if len(shape) != 3 or w.shape[1] * groups != shape[0]:
        raise unsupported("Conv", name, f"input of shape {imp.onnx_shape(src)}, weight {w.shape}, group={groups}")
    pads, _ = _pads_2d("Conv", name, a, shape[1:], k, s, d)
    src, padding = _padded(imp, name, src, pads, (math.inf, math.inf))
    layer = nn.Conv2d(shape[0], w.shape[0], k, stride=s, padding=padding, dilation=d, groups=groups,
                      bias=b is not None, dtype=imp.dtype)
    with torch.no_grad():
        layer.weight.copy_(imp.tensor(w))
        if b is not None:
            layer.bias.copy_(imp.tensor(b))
    return imp.add(name, layer, (src,))


def _pool_axis(n: int, k: int, s: int, d: int, pb: int, pe: int, auto: str, ceil: bool, include: bool):
    """One axis of an AveragePool: (output size, end padding to add, window counts)."""
    ext = (k - 1) * d + 1
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        out = math.ceil(n / s)
    else:
        span = n + pb + pe - ext
        out = (math.ceil(span / s) if ceil else span // s) + 1
        if ceil and (out - 1) * s >= n + pb:  # the last window must start inside the input or the begin pad
            out -= 1
    lo, hi = (-pb, n + pe) if include else (0, n)
    taps = np.arange(out)[:, None] * s - pb + np.arange(k)[None, :] * d
    counts = ((taps >= lo) & (taps < hi)).sum(1)
    return out, (out - 1) * s + ext - (n + pb), counts


@_op("AveragePool")
def averagepool(imp, node, name, ins):
    a = imp.attrs(node)
    k = tuple(int(v) for v in a.get("kernel_shape", ()))
    src = imp.batched(imp.src(ins[0], "AveragePool", name), "AveragePool", name)
    shape = imp.shapes[src]
    if len(k) == 1 and len(shape) == 2:  # 1-D: the 2-D pool of a (C, 1, L) image
        from certkd.graph.layers.reshape import Reshape
        a = dict(a, kernel_shape=(1, k[0]), strides=(1,) + tuple(a.get("strides", (1,))),
                 dilations=(1,) + tuple(a.get("dilations", (1,))))
        if "pads" in a:
            a["pads"] = (0, a["pads"][0], 0, a["pads"][1])
        src = imp.add(f"{name}.2d", Reshape((shape[0], 1, shape[1])), (src,))
        out = _averagepool_2d(imp, a, f"{name}.pool", src)
        return imp.reshaped(out, (1, shape[0], imp.shapes[out][-1]), name, "AveragePool")
    return _averagepool_2d(imp, a, name, src)


def _averagepool_2d(imp, a: dict, name: str, src: int) -> int:
    k = tuple(int(v) for v in a.get("kernel_shape", ()))
    s, d = _hyper("AveragePool", name, a, k)
    shape = imp.shapes[src]
    if len(shape) != 3:
        raise unsupported("AveragePool", name, f"input of shape {imp.onnx_shape(src)} (only 2-D)")
    pads, auto = _pads_2d("AveragePool", name, a, shape[1:], k, s, d)
    ceil, include = bool(a.get("ceil_mode", 0)), bool(a.get("count_include_pad", 0))
    axes = [_pool_axis(shape[1 + i], k[i], s[i], d[i], *pads[i], auto, ceil, include) for i in range(2)]
    if min(ax[0] for ax in axes) <= 0 or min(int(ax[2].min()) for ax in axes) == 0:
        raise unsupported("AveragePool", name, f"kernel {k}, pads {pads} on an input of shape {shape}: a window "
                                               "covers no counted position")
    limit = (k[0] // 2, k[1] // 2) if d == (1, 1) else (math.inf, math.inf)  # nn.AvgPool2d pads at most k/2
    src, padding = _padded(imp, name, src, [(pads[i][0], axes[i][1]) for i in range(2)], limit)
    if d == (1, 1):
        pool: nn.Module = nn.AvgPool2d(k, stride=s, padding=padding, count_include_pad=True)
    else:
        c = shape[0]
        pool = nn.Conv2d(c, c, k, stride=s, padding=padding, dilation=d, groups=c, bias=False, dtype=imp.dtype)
        with torch.no_grad():
            pool.weight.fill_(1.0 / (k[0] * k[1]))
    count = axes[0][2][:, None] * axes[1][2][None, :]
    if (count == k[0] * k[1]).all():
        return imp.add(name, pool, (src,))
    out = imp.add(f"{name}.sum", pool, (src,))
    scale = (k[0] * k[1] / count.astype(np.float64))[None]  # divide by the counted taps, not the kernel size
    return _scale_shift(imp, name, scale, np.zeros_like(scale), out, "mul")


@_op("GlobalAveragePool")
def globalaveragepool(imp, node, name, ins):
    src = imp.batched(imp.src(ins[0], "GlobalAveragePool", name), "GlobalAveragePool", name)
    shape = imp.shapes[src]
    if len(shape) < 2:
        raise unsupported("GlobalAveragePool", name, f"input of shape {imp.onnx_shape(src)} (no spatial axes)")
    if len(shape) == 3:
        return imp.add(name, nn.AvgPool2d(tuple(shape[1:])), (src,))
    from certkd.graph.layers.reshape import Reshape
    size = int(np.prod(shape[1:]))
    flat = imp.add(f"{name}.flat", Reshape((shape[0], 1, size)), (src,))
    pooled = imp.add(f"{name}.pool", nn.AvgPool2d((1, size)), (flat,))
    return imp.reshaped(pooled, (1, shape[0]) + (1,) * (len(shape) - 1), name, "GlobalAveragePool")


@_op("BatchNormalization")
def batchnormalization(imp, node, name, ins):
    a = imp.attrs(node)
    src = imp.src(ins[0], "BatchNormalization", name)
    params = [imp.const(i) for i in ins[1:5]]
    if len(params) != 4 or any(p is None for p in params) or a.get("training_mode", 0) \
            or (imp.opset < 7 and not a.get("is_test", 0)):
        raise unsupported("BatchNormalization", name, "needs constant scale, bias, mean and variance "
                                                      "(inference mode)")
    full, shape, lead = imp.onnx_shape(src), imp.shapes[src], imp.leads[src]
    c = full[1] if len(full) >= 2 else -1
    if any(p.size != c for p in params):
        raise unsupported("BatchNormalization", name, f"input of shape {full}, parameters of sizes "
                                                      f"{[p.size for p in params]}")
    eps = float(a.get("epsilon", 1e-5))
    if lead == 1 and len(shape) in (1, 2, 3):
        bn = (nn.BatchNorm2d if len(shape) == 3 else nn.BatchNorm1d)(c, eps=eps, dtype=imp.dtype)
        with torch.no_grad():
            for t, p in zip((bn.weight, bn.bias, bn.running_mean, bn.running_var), params):
                t.copy_(imp.tensor(p))
        return imp.add(name, bn.eval(), (src,))
    sc, b, mean, var = (p.astype(np.float64).reshape(-1) for p in params)
    scale = sc / np.sqrt(var + eps)
    view = [1] * len(full)
    view[1] = c
    view = tuple(view)[lead:]  # the channel axis, per sample
    return _scale_shift(imp, name, scale.reshape(view), (b - mean * scale).reshape(view), src, "batchnorm")


_ACTIVATIONS = {"Relu": nn.ReLU, "Sigmoid": nn.Sigmoid, "Tanh": nn.Tanh}


@_op(*_ACTIVATIONS)
def activation(imp, node, name, ins):
    op = node.op_type
    return imp.add(name, _ACTIVATIONS[op](), (imp.src(ins[0], op, name),))


@_op("LeakyRelu")
def leaky_relu(imp, node, name, ins):
    slope = float(imp.attrs(node).get("alpha", 0.01))
    if not 0.0 <= slope <= 1.0:
        raise unsupported("LeakyRelu", name, f"alpha={slope} (only slopes in [0, 1])")
    return imp.add(name, nn.LeakyReLU(slope), (imp.src(ins[0], "LeakyRelu", name),))


@_op("Identity", "Dropout")
def identity(imp, node, name, ins):
    op = node.op_type
    if op == "Dropout":
        ratio = imp.const(ins[1]) if len(ins) > 1 and ins[1] else np.array(imp.attrs(node).get("ratio", 0.5))
        train = len(ins) > 2 and ins[2] and (imp.const(ins[2]) is None or bool(imp.const(ins[2])))
        if train and (ratio is None or float(ratio) != 0):
            raise unsupported(op, name, "training_mode=True (random); export the model in inference mode")
    return imp.add(name, nn.Identity(), (imp.src(ins[0], op, name),))


@_op("Flatten")
def flatten(imp, node, name, ins):
    src = imp.src(ins[0], "Flatten", name)
    full = imp.onnx_shape(src)
    axis = int(imp.attrs(node).get("axis", 1))
    axis = axis + len(full) if axis < 0 else axis
    if not 0 <= axis <= len(full):
        raise unsupported("Flatten", name, f"axis={axis} for an input of rank {len(full)}")
    return imp.reshaped(src, (int(np.prod(full[:axis])), int(np.prod(full[axis:]))), name, "Flatten")


@_op("Reshape")
def reshape(imp, node, name, ins):
    src = imp.src(ins[0], "Reshape", name)
    a = imp.attrs(node)
    shape = imp.const(ins[1]) if len(ins) > 1 else (np.array(a["shape"]) if "shape" in a else None)
    if shape is None:
        raise unsupported("Reshape", name, "the target shape must be a constant")
    full = imp.onnx_shape(src)
    shape = [int(v) for v in np.asarray(shape).reshape(-1)]
    if a.get("allowzero", 0) and 0 in shape:
        raise unsupported("Reshape", name, f"allowzero=1 with target shape {shape} (an empty tensor)")
    out = [full[i] if v == 0 and i < len(full) else v for i, v in enumerate(shape)]
    n = int(np.prod(full))
    if out.count(-1) == 1:
        known = int(np.prod([v for v in out if v != -1]))
        out[out.index(-1)] = n // known if known > 0 and n % known == 0 else -1
    if min(out, default=0) <= 0 or int(np.prod(out)) != n:
        raise unsupported("Reshape", name, f"target shape {shape} for an input of shape {full}")
    return imp.reshaped(src, out, name, "Reshape")


@_op("Transpose")
def transpose(imp, node, name, ins):
    src = imp.src(ins[0], "Transpose", name)
    full = imp.onnx_shape(src)
    perm = [int(p) for p in imp.attrs(node).get("perm", range(len(full) - 1, -1, -1))]
    if sorted(perm) != list(range(len(full))):
        raise unsupported("Transpose", name, f"perm={perm} for an input of rank {len(full)}")
    if imp.leads[src] == 1 and perm[0] == 0:  # the batch axis stays first
        return imp.add(name, Permute([p - 1 for p in perm[1:]]), (src,))
    return imp.add(name, Permute(perm), (imp.full(src, name),), 0)


@_op("Pad")
def pad(imp, node, name, ins):
    a = imp.attrs(node)
    mode = a.get("mode", "constant")
    if mode != "constant":
        raise unsupported("Pad", name, f"mode={mode} (only constant padding)")
    src = imp.src(ins[0], "Pad", name)
    full = imp.onnx_shape(src)
    if imp.opset < 11:
        pads, value, axes = a.get("pads", a.get("paddings")), a.get("value", 0.0), None
    else:
        pads = imp.const(ins[1]) if len(ins) > 1 else None
        value = imp.const(ins[2]) if len(ins) > 2 and ins[2] else 0.0
        axes = imp.const(ins[3]) if len(ins) > 3 and ins[3] else None
        if (len(ins) > 2 and ins[2] and value is None) or (len(ins) > 3 and ins[3] and axes is None):
            raise unsupported("Pad", name, "constant_value and axes must be constants")
    if pads is None:
        raise unsupported("Pad", name, "pads must be a constant")
    pads = [int(p) for p in np.asarray(pads).reshape(-1)]
    axes = list(range(len(full))) if axes is None else [int(x) + len(full) if x < 0 else int(x)
                                                         for x in np.asarray(axes).reshape(-1)]
    if len(pads) != 2 * len(axes) or sorted(set(axes)) != sorted(axes) or not all(0 <= x < len(full) for x in axes):
        raise unsupported("Pad", name, f"pads={pads}, axes={axes} for an input of rank {len(full)}")
    pairs = [(0, 0)] * len(full)
    for i, x in enumerate(axes):
        pairs[x] = (pads[i], pads[i + len(axes)])
    value = float(np.asarray(value).reshape(-1)[0]) if np.asarray(value).size else 0.0
    if imp.leads[src] == 1 and pairs[0] == (0, 0):
        return imp.add(name, ConstantPad(pairs[1:], value), (src,))
    return imp.add(name, ConstantPad(pairs, value), (imp.full(src, name),), 0)


@_op("Add", "Sub", "Mul", "Div")
def elementwise(imp, node, name, ins):
    op = node.op_type
    c0, c1 = imp.const(ins[0]), imp.const(ins[1])
    if c0 is None and c1 is None:
        if op not in ("Add", "Sub"):
            raise unsupported(op, name, "of two computed tensors (not a linear map; only Add and Sub are)")
        a, b = imp.src(ins[0], op, name), imp.src(ins[1], op, name)
        if imp.onnx_shape(a) != imp.onnx_shape(b):
            raise unsupported(op, name, f"of shapes {imp.onnx_shape(a)} and {imp.onnx_shape(b)} (no broadcasting)")
        b = imp.batched(b, op, name) if imp.leads[a] else imp.full(b, name)
        if op == "Sub":
            b = _scale_shift(imp, f"{name}.neg", -np.ones(()), np.zeros(()), b, "neg")
        return imp.add(name, AddModule(), (a, b))
    x_first = c0 is None
    src = imp.src(ins[0] if x_first else ins[1], op, name)
    c = c1 if x_first else c0
    if not np.issubdtype(c.dtype, np.floating):
        raise unsupported(op, name, f"constant of element type {c.dtype} (expected floating point)")
    c = c.astype(np.float64)
    full, lead = imp.onnx_shape(src), imp.leads[src]
    try:
        ok = c.ndim <= len(full) and np.broadcast_shapes(c.shape, full) == full
    except ValueError:
        ok = False
    if not ok:
        raise unsupported(op, name, f"constant of shape {c.shape} does not broadcast to the input's shape {full}")
    c = c.reshape(((1,) * (len(full) - c.ndim) + c.shape)[lead:])  # per-sample, same rank
    if op == "Add" and _merge_bias(imp, src, c):
        return src
    if op == "Div":
        if not x_first:
            raise unsupported(op, name, "a constant divided by a computed tensor (not a linear map)")
        if (c == 0).any():
            raise unsupported(op, name, "division by a constant that contains 0")
    one, zero = np.ones_like(c), np.zeros_like(c)
    if op == "Add":
        scale, shift = one, c
    elif op == "Mul":
        scale, shift = c, zero
    elif op == "Sub":
        scale, shift = (one, -c) if x_first else (-one, c)
    else:
        scale, shift = 1.0 / c, zero
    return _scale_shift(imp, name, scale, shift, src, op.lower())


def _merge_bias(imp, src: int, c: np.ndarray) -> bool:
    """MatMul + Add(constant vector): the constant becomes the Linear's bias (if nothing else reads it)."""
    from certkd.graph.convert import make_rule
    from certkd.graph.network import Node

    node = imp.nodes[src]
    mod = node.rule.module
    if not isinstance(mod, nn.Linear) or mod.bias is not None or c.size != mod.out_features \
            or c.shape[-1] != mod.out_features:
        return False
    out_name = [k for k, v in imp.where.items() if v == src]
    if any(imp.uses.get(k, 0) != 1 for k in out_name) or imp.output_name in out_name \
            or any(src in n.inputs for n in imp.nodes[src + 1:]):
        return False
    mod.bias = nn.Parameter(imp.tensor(c.reshape(-1)))
    imp.nodes[src] = Node(node.name, make_rule(mod, node.name), node.inputs)
    return True


SUPPORTED_OPS = tuple(sorted(list(OPS) + ["Constant"]))

__all__ = ["OPS", "SUPPORTED_OPS", "unsupported"]
