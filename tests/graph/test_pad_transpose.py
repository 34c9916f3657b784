"""Soundness of the layers the ONNX importer adds (issue #19 §2): constant Pad, Transpose, a Gemm
with transA and a per-row bias, AveragePool with a per-position divisor, GlobalAveragePool, a
batch-free input. Sampled points of the box: every node's value lies in its IBP and CROWN bounds,
and the MILP and BaB decide the networks consistently with the samples."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

onnx = pytest.importorskip("onnx")
from onnx import helper  # noqa: E402

from certkd.bounds.crown import crown_bounds  # noqa: E402
from certkd.bounds.ibp import walk_intervals  # noqa: E402
from certkd.graph import Network, Node, from_onnx  # noqa: E402
from certkd.graph.convert import make_rule  # noqa: E402
from certkd.graph.layers import ConstantPad, Permute  # noqa: E402

D = torch.float64


def _image_net():
    rng = np.random.default_rng(0)
    n = lambda *s: rng.normal(size=s) * 0.5
    nodes = [helper.make_node("Pad", ["x", "p", "v"], ["a"]),                        # asymmetric, value 0.5
             helper.make_node("Conv", ["a", "w1"], ["b"]),
             helper.make_node("Relu", ["b"], ["c"]),
             helper.make_node("AveragePool", ["c"], ["d"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2],
                              ceil_mode=1),                                              # divisor varies
             helper.make_node("Transpose", ["d"], ["e"], perm=[0, 2, 3, 1]),         # NCHW -> NHWC
             helper.make_node("Pad", ["e", "p2", "v2"], ["e2"]),
             helper.make_node("Transpose", ["e2"], ["e3"], perm=[0, 3, 1, 2]),
             helper.make_node("Relu", ["e3"], ["f"]),
             helper.make_node("GlobalAveragePool", ["f"], ["g"]),
             helper.make_node("Flatten", ["g"], ["h"]),
             helper.make_node("Gemm", ["h", "w2", "b2"], ["y"], transB=1)]
    inits = {"p": np.array([0, 0, 1, 0, 0, 0, 0, 2], dtype=np.int64), "v": np.array(0.5),
             "w1": n(3, 2, 3, 3), "p2": np.array([0, 1, 0, 0, 0, 0, 1, 0], dtype=np.int64), "v2": np.array(-0.2),
             "w2": n(3, 3), "b2": n(3)}
    return nodes, [1, 2, 6, 5], inits


def _batch_free_net():
    rng = np.random.default_rng(1)
    nodes = [helper.make_node("Gemm", ["x", "b", "c"], ["a"], transA=1),             # (4, 3)ᵀ B + C (3, 5)
             helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("Transpose", ["r"], ["t"]),                              # (5, 3)
             helper.make_node("Flatten", ["t"], ["f"], axis=0),                        # (1, 15)
             helper.make_node("Gemm", ["f", "w", "d"], ["y"])]
    inits = {"b": rng.normal(size=(4, 5)), "c": rng.normal(size=(3, 5)), "w": rng.normal(size=(15, 3)) * 0.4,
             "d": rng.normal(size=(3,))}
    return nodes, [4, 3], inits


NETS = {"image": _image_net, "batch_free": _batch_free_net}


def _load(tmp_path, which) -> Network:
    from onnx import TensorProto as T, numpy_helper
    nodes, shape, inits = NETS[which]()
    tensors = [numpy_helper.from_array(np.asarray(v) if np.asarray(v).dtype.kind != "f" else
                                       np.asarray(v, dtype=np.float64), k) for k, v in inits.items()]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", T.DOUBLE, shape)],
                          [helper.make_tensor_value_info("y", T.DOUBLE, None)], tensors)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(m, str(tmp_path / "m.onnx"))
    net = from_onnx(tmp_path / "m.onnx")
    assert net.onnx_dtype == D
    return net


def _samples(lo, hi, k=200, seed=1):
    g = torch.Generator().manual_seed(seed)
    t = torch.rand((k,) + tuple(lo.shape[1:]), generator=g, dtype=D)
    t[:40] = t[:40].round()  # vertices
    return lo + t * (hi - lo)


def _values(net: Network, x):
    vals = [x]
    for node in net.nodes[1:]:
        vals.append(node.rule.forward(*[vals[j] for j in node.inputs]))
    return vals


def _prefix(net: Network, i: int) -> Network:
    """Nodes 0..i, then a Flatten: node i's value as the output."""
    nodes = list(net.nodes[:i + 1]) + [Node("out", make_rule(nn.Flatten(), "out"), (i,))]
    return Network(nodes).eval()


@pytest.mark.parametrize("which", sorted(NETS))
def test_every_node_inside_ibp_and_crown_bounds(tmp_path, which):
    net = _load(tmp_path, which)
    kinds = {type(n.rule.module) for n in net.nodes[1:]}
    assert Permute in kinds and (which != "image" or ConstantPad in kinds)
    x = torch.rand((1,) + net.input_shape, generator=torch.Generator().manual_seed(2), dtype=D)
    lo, hi = x - 0.15, x + 0.15
    pts = _samples(lo, hi)
    with torch.no_grad():
        vals = _values(net, pts)
        for i in range(1, len(net.nodes)):
            c, r, _ = walk_intervals(net, (lo + hi) / 2, (hi - lo) / 2, stop=i)
            v = vals[i]
            assert (v >= c - r - 1e-9).all() and (v <= c + r + 1e-9).all(), net.nodes[i].name
            k = int(np.prod(net.shapes(net.input_shape)[i]))
            sub = _prefix(net, i)
            eye = torch.eye(k, dtype=D)
            l_c, u_c = crown_bounds(sub, lo, hi, C=eye)[0], -crown_bounds(sub, lo, hi, C=-eye)[0]
            flat = v.reshape(v.shape[0], -1)
            assert (flat >= l_c - 1e-9).all() and (flat <= u_c + 1e-9).all(), net.nodes[i].name
        torch.testing.assert_close(net(pts), vals[-1])


@pytest.mark.parametrize("which", sorted(NETS))
def test_milp_and_bab_consistent_with_samples(tmp_path, which):
    pytest.importorskip("highspy")
    from certkd.verification.bab import bab_verify
    from certkd.verification.milp import milp_verify
    net = _load(tmp_path, which)
    x = torch.rand(net.input_shape, generator=torch.Generator().manual_seed(3), dtype=D)
    with torch.no_grad():
        y = int(net(x[None]).reshape(-1).argmax())
    for eps in (0.01, 0.3):
        lo, hi = x - eps, x + eps
        with torch.no_grad():
            z = net(_samples(lo[None], hi[None], k=300)).reshape(300, -1)
        others = torch.cat([z[:, :y], z[:, y + 1:]], 1)
        sampled = float((z[:, y] - others.max(1).values).min())
        res = milp_verify(net.float(), x.float(), y, lower=lo.float(), upper=hi.float(), early_stop=False,
                          timeout=60)
        net.double()
        assert res.status in ("verified", "falsified")
        assert res.margin <= sampled + 1e-4  # the exact optimum is at most any sampled margin
        if res.status == "verified":
            assert sampled > 0
        bab = bab_verify(net, x, y, lo, hi, timeout=30)
        assert bab.status in ("verified", "falsified", "timeout")
        if bab.status == "verified":
            assert sampled > 0 and res.status == "verified"
        if sampled <= 0:
            assert bab.status != "verified"
