"""Issue #19 §1: a network is verified in its own precision, and unsat is stated against rounding
(docs/verify_onnx.md §5)."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import certkd  # noqa: E402
from certkd.bounds.rounding import rounding_error_bound  # noqa: E402
from certkd.graph import from_module, from_onnx  # noqa: E402

F32_EPS = 2.0 ** -23


def _save(path: Path, nodes, inits, n_in: int, n_out: int, elem=TensorProto.FLOAT) -> Path:
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", elem, [1, n_in])],
                          [helper.make_tensor_value_info("y", elem, [1, n_out])], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return path


def _point_property(path: Path, x, condition: str) -> Path:
    lines = [f"(declare-const X_{i} Real)" for i in range(len(x))] + ["(declare-const Y_0 Real)"]
    for i, v in enumerate(x):
        lines += [f"(assert (>= X_{i} {v!r}))", f"(assert (<= X_{i} {v!r}))"]
    path.write_text("\n".join(lines + [f"(assert {condition})", ""]))
    return path


def _ort(path: Path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_float64_model_is_verified_in_float64(tmp_path):
    """The issue's model: onnxruntime computes y = -1.5e-5 at x = (1, 3), so Y_0 <= 0 is violated;
    the importer used to cast the weights to float32 and answer unsat."""
    w = np.array([[1024.0000611], [-341.3333587]])
    model = _save(tmp_path / "m.onnx", [helper.make_node("MatMul", ["x", "W"], ["y"])],
                  [numpy_helper.from_array(w, "W")], 2, 1, TensorProto.DOUBLE)
    y = _ort(model, np.array([[1.0, 3.0]]))
    assert y.dtype == np.float64 and -2e-5 < float(y[0, 0]) < -1e-5
    net = from_onnx(model)
    assert all(p.dtype == torch.float64 for p in net.parameters())
    res = certkd.verify_model(str(model), spec=str(_point_property(tmp_path / "p.vnnlib", [1.0, 3.0], "(<= Y_0 0.0)")),
                              timeout=30)
    assert res.status == "sat"
    np.testing.assert_array_equal(res.x, [1.0, 3.0])
    assert res.y.dtype == np.float64 and float(res.y[0]) == float(y[0, 0])
    # the opposite property holds: unsat, and the float64 rounding bound is far below the margin
    res = certkd.verify_model(str(model), spec=str(_point_property(tmp_path / "q.vnnlib", [1.0, 3.0], "(>= Y_0 0.0)")),
                              timeout=30)
    assert res.status == "unsat" and res.float_proof and res.rounding_bound < 1e-10


def test_holds_in_exact_arithmetic_but_fails_in_float32(tmp_path):
    """y = x·c − d at x = c = 1 + 2⁻²³, d = 1 + 2⁻²²: exactly 2⁻⁴⁶ > 0, but the float32 product rounds to d,
    so onnxruntime computes 0 and Y_0 <= 0 is violated: the answer is sat, never unsat."""
    x = c = np.float32(1 + F32_EPS)
    d = np.float32(1 + 2 * F32_EPS)
    nodes = [helper.make_node("Mul", ["x", "c"], ["p"]), helper.make_node("Sub", ["p", "d"], ["y"])]
    inits = [numpy_helper.from_array(np.array([c], np.float32), "c"), numpy_helper.from_array(np.array([d], np.float32), "d")]
    model = _save(tmp_path / "m.onnx", nodes, inits, 1, 1)
    assert float(_ort(model, np.array([[x]], np.float32))[0, 0]) == 0.0  # the premise, checked
    assert float(x) * float(c) - float(d) == 2.0 ** -46                   # exact in float64
    prop = _point_property(tmp_path / "p.vnnlib", [float(x)], "(<= Y_0 0.0)")
    res = certkd.verify_model(str(model), spec=str(prop), timeout=30, margin_tol=0.0)
    assert res.status == "sat" and float(res.y[0]) == 0.0


def test_fails_in_exact_arithmetic_but_holds_in_float32(tmp_path):
    """y = ((x + 3·2⁻²⁵) − 1) − 7·2⁻²⁶ at x = 1: exactly −2⁻²⁶ (violated), but x + 3·2⁻²⁵ rounds up to
    1 + 2⁻²³, so float32 gives +2⁻²⁶: no float32 counterexample exists, and the answer is not sat."""
    a, b = np.float32(3 * 2.0 ** -25), np.float32(7 * 2.0 ** -26)
    nodes = [helper.make_node("Add", ["x", "a"], ["s"]), helper.make_node("Sub", ["s", "one"], ["t"]),
             helper.make_node("Sub", ["t", "b"], ["y"])]
    inits = [numpy_helper.from_array(np.array([v], np.float32), n) for n, v in (("a", a), ("one", 1.0), ("b", b))]
    model = _save(tmp_path / "m.onnx", nodes, inits, 1, 1)
    assert float(_ort(model, np.array([[1.0]], np.float32))[0, 0]) == 2.0 ** -26
    assert (1.0 + float(a)) - 1.0 - float(b) == -(2.0 ** -26)
    res = certkd.verify_model(str(model), spec=str(_point_property(tmp_path / "p.vnnlib", [1.0], "(<= Y_0 0.0)")),
                              timeout=30)
    assert res.status in ("unknown", "timeout"), res


def _offset_net(dtype=torch.float32) -> nn.Module:
    lin = nn.Linear(1, 1).to(dtype)
    with torch.no_grad():
        lin.weight.fill_(1.0)
        lin.bias.fill_(-0.5)
    return nn.Sequential(lin)


def test_strict_rounding_answers_unknown_within_the_rounding_bound():
    """y = x − 0.5 on [0.5 + 2⁻²², 1]: every margin is ≥ 2⁻²² > margin_tol, so unsat, but 2⁻²² is below
    twice the rounding bound: float_proof is false, and strict mode answers unknown."""
    lo, hi = torch.tensor([0.5 + 2.0 ** -22]), torch.tensor([1.0])
    C = np.array([[1.0]])
    res = certkd.verify_model(_offset_net(), lo, hi, C, timeout=30, margin_tol=1e-9)
    assert res.status == "unsat" and res.float_proof is False
    assert 2.0 ** -22 < 2 * res.rounding_bound + 1e-9
    strict = certkd.verify_model(_offset_net(), lo, hi, C, timeout=30, margin_tol=1e-9, strict_rounding=True)
    assert strict.status in ("unknown", "timeout")
    # a margin clear of the bound is a float proof, strict or not
    far = certkd.verify_model(_offset_net(), torch.tensor([0.75]), hi, C, timeout=30, strict_rounding=True)
    assert far.status == "unsat" and far.float_proof is True


def test_rounding_bound_covers_the_float32_forward():
    """Soundness of the bound itself: the float32 forward of random networks (conv, BatchNorm, ReLU,
    average pooling, linear layers, weights ×10 so that rounding shows) stays within it of the float64
    forward of the same weights at sampled points of the box; the float64 bound is 2⁻²⁹ times smaller."""
    gen = torch.Generator().manual_seed(0)
    for seed in range(4):
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AvgPool2d(2),
                            nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
        with torch.no_grad():
            net[1].running_mean.uniform_(-1, 1)
            net[1].running_var.uniform_(0.5, 2)
            for layer in (net[0], net[5], net[7]):
                layer.weight.mul_(10.0)
        lo = torch.rand(2, 4, 4, generator=gen) * 10 - 5
        hi = lo + 1
        err = rounding_error_bound(from_module(net), lo, hi, torch.float32)
        assert np.isfinite(err).all() and (err > 0).all()
        x = lo + (hi - lo) * torch.rand(512, 2, 4, 4, generator=gen)
        with torch.no_grad():
            y32 = net(x).double()
            y64 = net.double()(x.double())
        gap = (y32 - y64).abs().numpy()
        assert (gap <= err).all(), (gap.max(0), err)
        assert gap.max() > 0  # the test can fail: float32 does round here
        err64 = rounding_error_bound(from_module(net), lo.double(), hi.double(), torch.float64)
        np.testing.assert_allclose(err64 / err, 2.0 ** -29, rtol=0.01)


def test_box_beyond_float32_range_gives_the_corner_counterexample():
    """±1e39 is beyond float32: the attack used to produce NaNs and answer timeout with RuntimeWarnings."""
    lin = nn.Linear(1, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0], [-1.0]]))
    net = nn.Sequential(lin)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = certkd.verify_model(net, torch.tensor([-1e39], dtype=torch.float64), torch.tensor([1e39],
                                  dtype=torch.float64), np.array([[1.0, -1.0]]), timeout=20)
    assert res.status == "sat"
    assert float(res.y[0]) <= float(res.y[1])


def test_cli_strict_rounding(tmp_path, capsys):
    """`certkd verify --onnx` says whether an unsat holds under onnxruntime's rounding; --strict-rounding
    turns a margin inside twice the rounding bound into unknown (y = x − 0.5, margin 10·2⁻²³ ≈ 1.19e-6)."""
    from certkd.cli import main

    model = _save(tmp_path / "m.onnx", [helper.make_node("Sub", ["x", "h"], ["y"])],
                  [numpy_helper.from_array(np.array([0.5], np.float32), "h")], 1, 1)
    prop = tmp_path / "p.vnnlib"
    prop.write_text("(declare-const X_0 Real)\n(declare-const Y_0 Real)\n"
                    f"(assert (>= X_0 {0.5 + 10 * F32_EPS!r}))\n(assert (<= X_0 1.0))\n(assert (<= Y_0 0.0))\n")
    args = ["verify", "--onnx", str(model), "--vnnlib", str(prop), "--timeout", "20"]
    main(args)
    out = capsys.readouterr()
    assert out.out == "unsat\n" and "see --strict-rounding" in out.err
    main(args + ["--strict-rounding"])
    assert capsys.readouterr().out in ("unknown\n", "timeout\n")
