"""from_onnx against onnxruntime (issue #19 §1.2, §2, §3): AveragePool with ONNX's defaults, Gemm in
every attribute form, the new linear layers (GlobalAveragePool, Flatten on any axis, constant Pad,
Transpose, old-opset Reshape, batch-free inputs, outputs that are not 1-D), the model's precision,
and one-line refusals. The engines' soundness on these layers: tests/graph/test_pad_transpose.py."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto as T, helper, numpy_helper  # noqa: E402

from certkd.errors import CertkdError  # noqa: E402
from certkd.graph import from_onnx  # noqa: E402


def model(nodes, in_shape, inits=(), elem=T.FLOAT, opset=13, in_name="x", out="y"):
    """A one-input ONNX model; inits: {name: array} (cast to the element type when floating)."""
    np_t = helper.tensor_dtype_to_np_dtype(elem)
    tensors = [numpy_helper.from_array(np.asarray(v, dtype=np_t) if np.asarray(v).dtype.kind == "f" else
                                       np.asarray(v), k) for k, v in dict(inits).items()]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(in_name, elem, in_shape)],
                          [helper.make_tensor_value_info(out, elem, None)], tensors)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def load(tmp_path, m):
    p = tmp_path / "m.onnx"
    onnx.save(m, str(p))
    return p, from_onnx(p)


def check_ort(tmp_path, m, n=3, tol=1e-5):
    """Import ``m`` and compare the certkd forward with onnxruntime at a few random inputs."""
    p, net = load(tmp_path, m)
    s = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
    shape = [d if isinstance(d, int) else 1 for d in s.get_inputs()[0].shape]
    np_t = torch.empty(0, dtype=net.onnx_dtype).numpy().dtype
    for seed in range(n):
        x = np.random.default_rng(seed).uniform(-1, 1, shape).astype(np_t)
        want = s.run(None, {s.get_inputs()[0].name: x})[0]
        with torch.no_grad():
            got = net(torch.from_numpy(x).reshape(1, *net.input_shape)).numpy()
        assert tuple(net.onnx_output_shape) == want.shape
        np.testing.assert_allclose(got.reshape(want.shape), want, rtol=tol, atol=tol)
    return net


def refused(tmp_path, m, *words):
    p = tmp_path / "m.onnx"
    onnx.save(m, str(p))
    with pytest.raises(CertkdError) as e:
        from_onnx(p)
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg
    return msg


# --------------------------------------------------------------------------- AveragePool (§1.2)

def test_averagepool_default_stride_is_one(tmp_path):
    """4×4 input, kernel 2, no strides: 3×3 = 9 outputs per channel (certkd built 4 before)."""
    m = model([helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[2, 2])], [1, 2, 4, 4])
    net = check_ort(tmp_path, m)
    assert net.shapes(net.input_shape)[-1] == (2, 3, 3)
    x = torch.arange(16.0).reshape(1, 1, 4, 4).expand(1, 2, 4, 4)
    np.testing.assert_array_equal(net(x)[0, 0].numpy(), [[2.5, 3.5, 4.5], [6.5, 7.5, 8.5], [10.5, 11.5, 12.5]])


@pytest.mark.parametrize("attrs", [
    dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1]),                               # count_include_pad=0
    dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=1),
    dict(kernel_shape=[3, 2], pads=[0, 1, 2, 0], strides=[2, 1]),             # asymmetric pads
    dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1),
    dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1, count_include_pad=1),
    dict(kernel_shape=[2, 3], auto_pad="SAME_UPPER", strides=[2, 2]),
    dict(kernel_shape=[3, 2], auto_pad="SAME_LOWER"),
    dict(kernel_shape=[2, 2], auto_pad="VALID", strides=[3, 2]),
], ids=["pads", "count_include_pad", "asymmetric", "ceil", "ceil_pads_include", "same_upper", "same_lower", "valid"])
def test_averagepool_attributes_match_onnxruntime(tmp_path, attrs):
    m = model([helper.make_node("AveragePool", ["x"], ["y"], **attrs)], [1, 2, 7, 6])
    check_ort(tmp_path, m)


# --------------------------------------------------------------------------- Gemm (§2)

@pytest.mark.parametrize("attrs,c_shape,in_shape", [
    ({}, (4,), ["N", 3]),
    ({}, (1, 4), [1, 3]),
    ({}, (), [1, 3]),
    (dict(alpha=0.5, beta=-2.0, transB=1), (1, 4), [1, 3]),
    (dict(transA=1), (4,), [3, 1]),                       # A (1, 3) stored as (3, 1)
    (dict(transA=1, transB=1, alpha=1.5), (5, 4), [3, 5]),  # batch-free: A (5, 3), bias per row
    ({}, (5, 1), [5, 3]),
    ({}, None, [1, 3]),
], ids=["vector", "row", "scalar", "alpha_beta_transB", "transA", "all_batch_free", "column", "no_bias"])
def test_gemm_attribute_forms(tmp_path, attrs, c_shape, in_shape):
    rng = np.random.default_rng(1)
    b = rng.normal(size=(4, 3) if attrs.get("transB") else (3, 4))
    inits = {"b": b} if c_shape is None else {"b": b, "c": rng.normal(size=c_shape)}
    m = model([helper.make_node("Gemm", ["x", "b"] + ([] if c_shape is None else ["c"]), ["y"], **attrs)],
              in_shape, inits)
    check_ort(tmp_path, m)


def test_gemm_bias_per_batch_row_refused(tmp_path):
    """A (M, N) bias whose M is the batch (symbolic) cannot be a per-sample map."""
    rng = np.random.default_rng(2)
    m = model([helper.make_node("Gemm", ["x", "b", "c"], ["y"])], ["N", 3],
              {"b": rng.normal(size=(3, 4)), "c": rng.normal(size=(2, 4))})
    refused(tmp_path, m, "Gemm", "bias C of shape (2, 4)")


# --------------------------------------------------------------------------- new linear layers (§2, §3)

def test_global_average_pool_flatten_axis_and_transpose(tmp_path):
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[0, 3, 1, 2]),   # NHWC -> NCHW
             helper.make_node("Conv", ["t", "w"], ["c"], pads=[1, 0, 0, 1]),    # asymmetric pads
             helper.make_node("GlobalAveragePool", ["c"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"], axis=2),                 # (1, 4, 1, 1) -> (4, 1)
             helper.make_node("Transpose", ["f"], ["y"])]                       # -> (1, 4)
    net = check_ort(tmp_path, model(nodes, [1, 5, 6, 2], {"w": rng.normal(size=(4, 2, 2, 2))}))
    assert net.onnx_output_shape == (1, 4)


@pytest.mark.parametrize("pads,value,axes", [([0, 0, 1, 0, 0, 0, 0, 2], 0.0, None),
                                             ([0, 1, 2, 0, 1, 0, 0, 1], -0.75, None),
                                             ([1, 2, 0, 1], 2.5, [2, -1]),
                                             ([0, 0, -1, 0, 0, 0, 1, -1], 1.0, None)],
                         ids=["zeros", "value", "axes", "crop"])
def test_constant_pad(tmp_path, pads, value, axes):
    inits = {"p": np.array(pads, dtype=np.int64), "v": np.array(value)}
    ins = ["x", "p", "v"]
    if axes is not None:
        inits["a"] = np.array(axes, dtype=np.int64)
        ins.append("a")
    m = model([helper.make_node("Pad", ins, ["y"], mode="constant")], [1, 2, 4, 5], inits, opset=18)
    check_ort(tmp_path, m)


def test_pad_old_opset_attributes(tmp_path):
    m = model([helper.make_node("Pad", ["x"], ["y"], pads=[0, 0, 1, 1, 0, 0, 2, 0], value=3.0)], [1, 1, 3, 3],
              opset=9)
    check_ort(tmp_path, m)


@pytest.mark.parametrize("mode", ["reflect", "edge"])
def test_pad_modes_other_than_constant_refused(tmp_path, mode):
    m = model([helper.make_node("Pad", ["x", "p"], ["y"], mode=mode)], [1, 1, 3, 3],
              {"p": np.array([0, 0, 1, 1, 0, 0, 1, 1], dtype=np.int64)})
    refused(tmp_path, m, "Pad", f"mode={mode}")


def test_old_opset_reshape_shape_attribute(tmp_path):
    m = model([helper.make_node("Reshape", ["x"], ["y"], shape=[1, 6, 2])], [1, 3, 4], opset=4)
    onnx.save(m, str(tmp_path / "m.onnx"))
    net = from_onnx(tmp_path / "m.onnx")
    x = torch.arange(12.0).reshape(1, 3, 4)
    assert net.shapes(net.input_shape)[-1] == (6, 2)
    np.testing.assert_array_equal(net(x).numpy().reshape(-1), np.arange(12.0))


@pytest.mark.parametrize("in_shape", [[5], [3, 5]])
def test_batch_free_inputs(tmp_path, in_shape):
    """An input without a batch dimension is one sample (the whole tensor)."""
    rng = np.random.default_rng(4)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Sub", ["r", "s"], ["y"])]
    net = check_ort(tmp_path, model(nodes, in_shape, {"w": rng.normal(size=(5, 2)), "s": rng.normal(size=(2,))}))
    assert net.input_shape == tuple(in_shape)


def test_output_not_1d_imports_and_verifies(tmp_path):
    """An output of shape (1, 2, 1) imports; the verifier reads it flattened."""
    from certkd.verification.api import verify_model
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Reshape", ["h", "s"], ["y"])]
    m = model(nodes, [1, 3], {"w": np.array([[1.0, -1.0], [0.0, 1.0], [0.0, 0.0]]),
                              "s": np.array([1, 2, 1], dtype=np.int64)})
    net = check_ort(tmp_path, m)
    assert net.onnx_output_shape == (1, 2, 1)
    res = verify_model(str(tmp_path / "m.onnx"), torch.tensor([1.0, 0.0, 0.0]), torch.tensor([1.0, 0.5, 0.0]), 0,
                       timeout=20)
    assert res.status == "unsat"  # y0 = x0 = 1 > y1 = x1 - x0 <= -0.5 on the whole box


# --------------------------------------------------------------------------- precision (§1.1)

def test_float64_model_keeps_its_precision(tmp_path):
    """The issue's model: float32 weights would give the wrong sign at x = (1, 3)."""
    w = np.array([[1024.0000611], [-341.3333587]])
    m = model([helper.make_node("MatMul", ["x", "w"], ["y"])], [1, 2], {"w": w}, elem=T.DOUBLE)
    net = check_ort(tmp_path, m, tol=1e-12)
    assert net.onnx_dtype == torch.float64
    assert all(p.dtype == torch.float64 for p in net.parameters())
    y = float(net(torch.tensor([[1.0, 3.0]], dtype=torch.float64)))
    assert y == 1024.0000611 - 3 * 341.3333587 and y < 0


def test_float32_model_stays_float32(tmp_path):
    m = model([helper.make_node("Gemm", ["x", "b", "c"], ["y"], transB=1)], ["N", 3],
              {"b": np.ones((2, 3)), "c": np.array([0.1, 0.2])})
    net = check_ort(tmp_path, m, tol=1e-6)
    assert net.onnx_dtype == torch.float32 and all(p.dtype == torch.float32 for p in net.parameters())


@pytest.mark.parametrize("elem,name", [(T.FLOAT16, "FLOAT16"), (T.BFLOAT16, "BFLOAT16")])
def test_half_precision_refused_with_the_fix(tmp_path, elem, name):
    m = model([helper.make_node("Relu", ["x"], ["y"])], [1, 3], elem=elem)
    refused(tmp_path, m, name, "convert it to float32", "onnxconverter-common")


# --------------------------------------------------------------------------- constants (§3)

def test_sub_of_zero_mean_does_not_warn(tmp_path):
    """A normalisation with mean 0: the Sub must not compute 1/0 (a spurious divide-by-zero warning)."""
    nodes = [helper.make_node("Sub", ["x", "m"], ["s"]), helper.make_node("Div", ["s", "d"], ["y"])]
    m = model(nodes, [1, 3], {"m": np.zeros(3), "d": np.array([0.5, 1.0, 2.0])})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_ort(tmp_path, m)


def test_div_by_constant_zero_refused(tmp_path):
    m = model([helper.make_node("Div", ["x", "d"], ["y"])], [1, 3], {"d": np.array([1.0, 0.0, 2.0])})
    refused(tmp_path, m, "Div", "division by a constant that contains 0")


def test_shape_gather_concat_reshape_chain(tmp_path):
    """Reshape(x, Concat(Gather(Shape(x), 0), [-1])): the exported-flatten idiom."""
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Gather", ["s", "i"], ["b"], axis=0),
             helper.make_node("Unsqueeze", ["b", "ax"], ["bu"]),
             helper.make_node("Concat", ["bu", "m1"], ["shape"], axis=0),
             helper.make_node("Reshape", ["x", "shape"], ["y"])]
    net = check_ort(tmp_path, model(nodes, ["N", 2, 3], {"i": np.array(0, dtype=np.int64),
                                                         "ax": np.array([0], dtype=np.int64),
                                                         "m1": np.array([-1], dtype=np.int64)}))
    assert net.shapes(net.input_shape)[-1] == (6,)
