"""ONNX's own operator conformance cases (``onnx.backend.test.case.node``) through ``from_onnx``.

For every case whose nodes are all operators certkd imports, each input other than the first is
turned into an initializer. A case certkd accepts must compute ONNX's expected outputs (in the
model's dtype, tight tolerance); a case it refuses must raise a one-line ``CertkdError`` naming the
operator (or the input's element type). Counts with onnx 1.23.2 (:data:`COUNTS`): of 144 cases,
91 accepted (7 LeakyRelu, Sigmoid and Tanh cases since issue #22), all matching (ONNX's expected
outputs at the case's tolerance, ONNX's reference evaluator at rtol 1e-5 / 1e-12 in float32 /
float64), and 53 refused in one line: 31 integer or
non-tensor inputs, 8 graphs with 2-3 outputs (masks, training statistics) or no input, 6 3-D
AveragePools, 4 batched MatMuls (a constant operand of rank 3-4) and one with a scalar result,
2 training-mode Dropouts, 1 Reshape with allowzero to an empty tensor. Before issue #19: 23
matched, 2 wrong values (AveragePool), 7 crashes (Gemm).
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")

from certkd.errors import CertkdError  # noqa: E402
from certkd.graph import from_onnx  # noqa: E402

COUNTS = {"1.23.2": (91, 53)}  # onnx version: (accepted, refused)
OPS = {"Add", "AveragePool", "BatchNormalization", "Constant", "Conv", "Div", "Dropout", "Flatten", "Gemm",
       "Identity", "LeakyRelu", "MatMul", "Mul", "Relu", "Reshape", "Sigmoid", "Sub", "Tanh", "GlobalAveragePool", "Pad",
       "Transpose"}


def _cases():
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():  # the case generators warn about their own overflow cases
        warnings.simplefilter("ignore")
        cases = collect_testcases()
    out = []
    for case in cases:
        if case.model is None or not case.data_sets:
            continue
        ops = {n.op_type for n in case.model.graph.node}
        if ops and ops <= OPS:
            out.append(case)
    return out


CASES = _cases()


def _frozen(case):
    """The case's model with every input but the first as an initializer, and (x, expected)."""
    from onnx import numpy_helper

    inputs, outputs = case.data_sets[0]
    model = onnx.ModelProto()
    model.CopyFrom(case.model)
    g = model.graph
    keep = g.input[:1]
    for vi, value in zip(g.input[1:], inputs[1:]):
        g.initializer.append(numpy_helper.from_array(np.asarray(value), vi.name))
    del g.input[1:]
    assert len(g.input) == len(keep)
    return model, (inputs[0] if inputs else None), outputs


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_conformance_case(case, tmp_path):
    model, x, expected = _frozen(case)
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    try:
        net = from_onnx(path)
    except CertkdError as e:
        msg = str(e)
        assert "\n" not in msg and msg
        named = {n.op_type for n in model.graph.node} | {"element type", "inputs", "outputs", "no shape"}
        assert any(k in msg for k in named), msg
        return
    assert isinstance(x, np.ndarray) and len(expected) == 1
    want = np.asarray(expected[0])
    dtype = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}[x.dtype]
    assert net.onnx_dtype == dtype and all(p.dtype == dtype for p in net.parameters())
    xt = torch.from_numpy(np.ascontiguousarray(x)).reshape(1, *net.input_shape)
    with torch.no_grad():
        got = net(xt)
    assert got.dtype == dtype and tuple(net.onnx_output_shape) == want.shape
    assert got.numel() == want.size
    got = got.numpy().reshape(want.shape)
    np.testing.assert_allclose(got, want, rtol=case.rtol, atol=case.atol)  # some expected values are rounded
    from onnx.reference import ReferenceEvaluator  # ONNX's reference implementation, unrounded

    ref = ReferenceEvaluator(model).run(None, {model.graph.input[0].name: x})[0]
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(got, ref, **tol)


def _accepted(case, tmp_path) -> bool:
    model, _, _ = _frozen(case)
    onnx.save(model, str(tmp_path / f"{case.name}.onnx"))
    try:
        from_onnx(tmp_path / f"{case.name}.onnx")
    except CertkdError:
        return False
    return True


def test_counts(tmp_path):
    """How many cases certkd accepts: a drop means an operator form stopped importing."""
    if onnx.__version__ not in COUNTS:
        pytest.skip(f"counts recorded for onnx {sorted(COUNTS)}, not {onnx.__version__}")
    accepted = sum(_accepted(c, tmp_path) for c in CASES)
    assert (accepted, len(CASES) - accepted) == COUNTS[onnx.__version__]
