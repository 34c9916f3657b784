"""Export for external verifiers: ONNX model, VNN-LIB properties, instances.csv (certkd.export)."""
from __future__ import annotations

import csv
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

onnx = pytest.importorskip("onnx")
from onnx.reference import ReferenceEvaluator  # noqa: E402

from certkd.attacks.pgd import linf_box  # noqa: E402
from certkd.errors import CertkdError  # noqa: E402
from certkd.export import (export_onnx, export_run, fold_batchnorm, read_vnnlib, vnnlib_box,  # noqa: E402
                           write_vnnlib)
from certkd.models import create_model  # noqa: E402


def _randomise_batchnorm(model: nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.3)
                m.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.3)


def _onnx_run(path: Path, x: torch.Tensor) -> np.ndarray:
    return ReferenceEvaluator(str(path)).run(None, {"input": x.numpy()})[0]


MODELS = [
    ("cnn-small-8", "cnn-small", 1, 8, {}),
    ("cnn-small-28", "cnn-small", 1, 28, {"width": 4, "linear": 32}),
    ("mlp", "mlp", 1, 8, {"hidden": (32, 16)}),
    ("cnn7-small", "cnn7", 3, 16, {"width": 4, "linear": 16}),
]


@pytest.mark.parametrize("name,arch,channels,size,kwargs", MODELS, ids=[m[0] for m in MODELS])
def test_onnx_logits_match_pytorch(tmp_path, name, arch, channels, size, kwargs):
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    mean, std = (0.3,) * channels, (0.2,) * channels  # a non-trivial Normalize must be inside the graph
    model = create_model(arch, channels, size, 10, mean=mean, std=std, **kwargs)
    _randomise_batchnorm(model, gen)
    model.train()  # export must use running statistics whatever mode the model is in
    before = {k: v.clone() for k, v in model.state_dict().items()}

    path = export_onnx(model, tmp_path / "sub" / "model.onnx")
    assert path.exists() and not any(p.name.endswith(".tmp") for p in path.parent.iterdir())
    assert model.training, "export must not change the model's mode"
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"export modified {k}"

    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert [i.name for i in proto.graph.input] == ["input"]
    assert [o.name for o in proto.graph.output] == ["logits"]
    dims = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, channels, size, size]
    ops = {n.op_type for n in proto.graph.node}
    assert "BatchNormalization" not in ops, "BatchNorm should be folded into Conv/Gemm"
    assert {"Sub", "Div"} <= ops, "normalisation must be part of the graph"

    model.eval()
    x = torch.rand(4, channels, size, size, generator=gen)
    x[0] = 0.0  # corners of the pixel box
    x[1] = 1.0
    with torch.no_grad():
        want = model(x).numpy()
    got = np.concatenate([_onnx_run(path, x[i:i + 1]) for i in range(len(x))])
    assert got.shape == (4, 10)
    assert np.abs(got - want).max() <= 1e-5, np.abs(got - want).max()
    assert np.abs(want).max() > 1e-3  # the comparison is not between two near-zero outputs

    try:  # a second runtime when it is installed (optional dependency)
        import onnxruntime as ort
    except ImportError:
        return
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got_ort = np.concatenate([sess.run(None, {"input": x[i:i + 1].numpy()})[0] for i in range(len(x))])
    assert np.abs(got_ort - want).max() <= 1e-5


def test_dynamic_batch_and_default_shape(tmp_path):
    torch.manual_seed(1)
    model = create_model("cnn-small", 1, 8, 10).eval()
    path = export_onnx(model, tmp_path / "m.onnx", dynamic_batch=True)  # shape taken from model.spec
    proto = onnx.load(str(path))
    dim0 = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param and not dim0.dim_value
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        want = model(x).numpy()
    assert np.abs(_onnx_run(path, x) - want).max() <= 1e-5


def test_fold_batchnorm_matches_eval_mode():
    gen = torch.Generator().manual_seed(2)
    model = create_model("cnn7", 1, 8, 10, width=2, linear=8)
    _randomise_batchnorm(model, gen)
    folded = fold_batchnorm(model.features)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded)
    assert len(folded) == len(model.features) - 6  # 5 BatchNorm2d + 1 BatchNorm1d removed
    x = torch.rand(5, 1, 8, 8, generator=gen)
    with torch.no_grad():
        assert torch.allclose(folded(x), model.eval().features(x), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# VNN-LIB
# ---------------------------------------------------------------------------------------------

def _exact_box_contained(lo, hi, x, eps):
    """lo/hi (float values) contain [max(x−ε, 0), min(x+ε, 1)] computed exactly in rationals."""
    fe = Fraction(eps)
    for lo_i, hi_i, x_i in zip(lo.tolist(), hi.tolist(), x.tolist()):
        fx = Fraction(x_i)
        if not (Fraction(lo_i) <= max(fx - fe, Fraction(0)) and Fraction(hi_i) >= min(fx + fe, Fraction(1))):
            return False
    return True


@pytest.mark.parametrize("shape,label,eps", [((1, 8, 8), 3, 0.1), ((3, 4, 4), 0, 0.3), ((1, 5, 5), 9, 1 / 255),
                                            ((2, 3, 3), 4, 1.0)])
def test_vnnlib_round_trip(tmp_path, shape, label, eps):
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(shape, generator=gen)
    x.view(-1)[0], x.view(-1)[1] = 0.0, 1.0  # clipping at both ends
    path = write_vnnlib(tmp_path / "p.vnnlib", x, label, eps, 10)
    lo, hi, disjuncts = read_vnnlib(path)
    d = x.numel()
    assert lo.shape == hi.shape == (d,)

    # every bound is a float32 value written exactly (float64 parse == float32 value)
    assert np.array_equal(lo.astype(np.float32).astype(np.float64), lo)
    assert np.array_equal(hi.astype(np.float32).astype(np.float64), hi)
    # it contains certkd's own float32 box ...
    t_lo, t_hi = linf_box(x.reshape(-1), eps)
    t_lo, t_hi = t_lo.double().numpy(), t_hi.double().numpy()
    assert np.all(lo <= t_lo) and np.all(hi >= t_hi)
    # ... and the exact one, and is no more than one float32 step wider than certkd's box
    assert _exact_box_contained(lo, hi, x.reshape(-1).double().numpy(), eps)
    assert np.all(lo >= np.nextafter(t_lo.astype(np.float32), np.float32(-1))) and np.all(lo >= 0)
    assert np.all(hi <= np.nextafter(t_hi.astype(np.float32), np.float32(2))) and np.all(hi <= 1)
    assert lo[0] == 0.0 and hi[1] == 1.0
    # flattening order is (C, H, W), matching the ONNX input
    i = d - 1
    assert lo[i] <= float(x[-1, -1, -1]) <= hi[i]

    assert len(disjuncts) == 9
    assert disjuncts == [[(j, label)] for j in range(10) if j != label]


def test_vnnlib_box_is_tight_when_exact():
    x = np.array([0.5, 0.25, 0.0, 1.0], dtype=np.float32)
    lo, hi = vnnlib_box(x, 0.25)
    assert lo.tolist() == [0.25, 0.0, 0.0, 0.75]
    assert hi.tolist() == [0.75, 0.5, 0.25, 1.0]


def test_vnnlib_box_rounds_outward_when_float64_rounds_inward():
    # 1 − 2⁻⁶⁰ and 0.5 + 2⁻⁶⁰ both round to the centre in float64 (and in float32), yet the
    # exact box is wider: the written bounds must step one float32 ulp outward.
    eps = 2.0 ** -60
    x = np.array([1.0, 0.5], dtype=np.float32)
    lo, hi = vnnlib_box(x, eps)
    assert lo[0] < 1.0 and hi[1] > 0.5
    assert _exact_box_contained(lo.astype(np.float64), hi.astype(np.float64), x.astype(np.float64), eps)
    assert lo[0] == np.nextafter(np.float32(1), np.float32(0)) and hi[0] == 1.0


def test_vnnlib_matches_third_party_parser(tmp_path):
    """Cross-check with the `vnnlib` package's VNN-COMP reader (vnnlib<1.0 API), when installed."""
    compat = pytest.importorskip("vnnlib.compat")
    if not hasattr(compat, "read_vnnlib_simple"):
        pytest.skip("installed vnnlib parses VNN-LIB 2.0 only (no read_vnnlib_simple)")
    x = torch.rand(1, 4, 4, generator=torch.Generator().manual_seed(4))
    path = write_vnnlib(tmp_path / "p.vnnlib", x, 2, 0.1, 5)
    lo, hi, _ = read_vnnlib(path)
    (box, specs), = compat.read_vnnlib_simple(str(path), 16, 5)
    box = np.asarray(box, dtype=np.float64)
    assert np.array_equal(box[:, 0], lo) and np.array_equal(box[:, 1], hi)
    assert len(specs) == 4
    rows = sorted(tuple(np.asarray(mat, dtype=np.int64).reshape(-1).tolist()) for mat, _ in specs)
    want = []
    for j in (0, 1, 3, 4):  # Y_j >= Y_2  <=>  Y_2 - Y_j <= 0
        r = [0] * 5
        r[2], r[j] = 1, -1
        want.append(tuple(r))
    assert rows == sorted(want)
    assert all(np.all(np.asarray(rhs) == 0) for _, rhs in specs)


VALID = """; a comment
(declare-const X_0 Real)
(declare-const X_1 Real)
(declare-const Y_0 Real)
(declare-const Y_1 Real)
(declare-const Y_2 Real)
(assert (<= X_0 0.5))
(assert (>= X_0 0.25))
(assert (<= X_1 1.0))
(assert (>= X_1 0.0))
(assert (or (and (>= Y_1 Y_0)) (and (>= Y_2 Y_0))))
"""

MALFORMED = [
    ("unclosed paren", VALID.replace("(declare-const X_0 Real)", "(declare-const X_0 Real"), "never closed"),
    ("extra paren", VALID + ")\n", "unmatched"),
    ("atom outside", VALID + "assert\n", "outside of parentheses"),
    ("undeclared input", VALID.replace("(assert (<= X_1 1.0))", "(assert (<= X_2 1.0))"), "before it is declared"),
    ("undeclared output", VALID.replace("(>= Y_2 Y_0)", "(>= Y_3 Y_0)"), "before it is declared"),
    ("missing lower bound", VALID.replace("(assert (>= X_1 0.0))\n", ""), "X_1 has no lower bound"),
    ("missing upper bound", VALID.replace("(assert (<= X_0 0.5))\n", ""), "X_0 has no upper bound"),
    ("duplicate bound", VALID.replace("(assert (>= X_1 0.0))", "(assert (>= X_1 0.0))\n(assert (>= X_1 0.1))"),
     "two lower bounds"),
    ("unknown op (input)", VALID.replace("(<= X_0 0.5)", "(< X_0 0.5)"), "unknown or unsupported operator"),
    ("unknown op (output)", VALID.replace("(>= Y_1 Y_0)", "(> Y_1 Y_0)"), "unknown or unsupported operator"),
    ("nested or", VALID.replace("(and (>= Y_2 Y_0))", "(or (>= Y_2 Y_0))"), "unknown or unsupported operator"),
    ("unknown command", VALID.replace("(declare-const X_0 Real)", "(declare-fun X_0 () Real)"), "unknown command"),
    ("wrong sort", VALID.replace("(declare-const X_0 Real)", "(declare-const X_0 Int)"), "must be declared Real"),
    ("bad name", VALID + "(declare-const Z_0 Real)\n", "unsupported variable name"),
    ("declared twice", VALID + "(declare-const Y_1 Real)\n", "declared twice"),
    ("index gap", VALID.replace("Y_2", "Y_3"), "without gaps"),
    ("not a number", VALID.replace("(<= X_0 0.5)", "(<= X_0 half)"), "expected an input bound"),
    ("two numbers", VALID.replace("(<= X_0 0.5)", "(<= X_0 0.5 0.7)"), "exactly 2 arguments"),
    ("no output", VALID.replace("(assert (or (and (>= Y_1 Y_0)) (and (>= Y_2 Y_0))))\n", ""), "no output assertion"),
    ("output vs constant", VALID.replace("(>= Y_1 Y_0)", "(>= Y_1 0.5)"), "comparison of two outputs"),
    ("mixed X and Y", VALID.replace("(>= Y_1 Y_0)", "(>= Y_1 X_0)"), "mixes inputs X and outputs Y"),
    ("empty box", VALID.replace("(>= X_0 0.25)", "(>= X_0 0.75)"), "empty input box"),
    ("empty and", VALID.replace("(and (>= Y_2 Y_0))", "(and)"), "empty (and)"),
    ("no variables", VALID + "(assert (<= 1.0 2.0))\n", "mentions no variable"),
    ("no inputs", "(declare-const Y_0 Real)\n(declare-const Y_1 Real)\n(assert (>= Y_1 Y_0))\n", "no X_"),
]


def test_valid_example_parses(tmp_path):
    p = tmp_path / "ok.vnnlib"
    p.write_text(VALID)
    lo, hi, dis = read_vnnlib(p)
    assert lo.tolist() == [0.25, 0.0] and hi.tolist() == [0.5, 1.0]
    assert dis == [[(1, 0)], [(2, 0)]]


@pytest.mark.parametrize("text,fragment", [(t, f) for _, t, f in MALFORMED], ids=[n for n, _, _ in MALFORMED])
def test_reader_rejects_malformed(tmp_path, text, fragment):
    p = tmp_path / "bad.vnnlib"
    p.write_text(text)
    with pytest.raises(ValueError) as e:
        read_vnnlib(p)
    assert fragment in str(e.value)


def test_reader_accepts_common_variants(tmp_path):
    text = """(declare-const X_0 Real) ; trailing comment
(declare-const X_1 Real)
(declare-const Y_0 Real)
(declare-const Y_1 Real)
(declare-const Y_2 Real)
(assert (and (>= X_0 -1.5e-1) (<= X_0 .5)))
(assert (>= 2 X_1))
(assert (<= 1E0 X_1))
(assert (or (and (<= Y_0 Y_1) (>= Y_1 Y_2)) (>= Y_2 Y_0)))
(assert (>= Y_1 Y_2))
"""
    p = tmp_path / "v.vnnlib"
    p.write_text(text)
    lo, hi, dis = read_vnnlib(p)
    assert lo.tolist() == [-0.15, 1.0] and hi.tolist() == [0.5, 2.0]
    # a second output assertion is conjoined with every disjunct
    assert dis == [[(1, 0), (1, 2), (1, 2)], [(2, 0), (1, 2)]]


# ---------------------------------------------------------------------------------------------
# A whole run
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    import certkd

    cfg = certkd.resolve_config("digits-small", {"method": "standard", "epochs": 1, "eval_limit": 10})
    return certkd.train(cfg, tmp_path_factory.mktemp("export") / "run", progress=False, log=lambda s: None)


def test_export_run_end_to_end(tmp_path, digits_run):
    import certkd
    from certkd.data import load_dataset
    from certkd.data.subsets import stratified_indices

    out = tmp_path / "bench"
    summary = export_run(digits_run, out / "onnx" / "model.onnx", out / "vnnlib", eps=0.1, limit=5, timeout=30)
    assert summary["n"] == 5 and summary["eps"] == 0.1 and summary["num_classes"] == 10
    assert 0 <= summary["correct"] <= 5

    model = certkd.load_model(digits_run)
    _, test_set, _ = load_dataset("digits")
    index = stratified_indices(test_set.labels, 5).tolist()
    assert summary["indices"] == index
    onnx_path = out / "onnx" / "model.onnx"
    onnx.checker.check_model(onnx.load(str(onnx_path)))

    csv_path = out / "vnnlib" / "instances.csv"
    rows = list(csv.reader(csv_path.open()))
    assert len(rows) == 5 and all(len(r) == 3 for r in rows)
    correct = 0
    for i, (o, v, t) in zip(index, rows):
        assert float(t) == 30
        assert (csv_path.parent / o).resolve() == onnx_path.resolve()
        assert v == f"prop_{i}.vnnlib"
        assert f"; test index {i};" in (csv_path.parent / v).read_text()
        x, y = test_set.get(torch.tensor([i]))
        lo, hi, dis = read_vnnlib(csv_path.parent / v)
        t_lo, t_hi = linf_box(x.reshape(-1), 0.1)
        assert lo.shape == (64,)
        assert np.all(lo <= t_lo.double().numpy()) and np.all(hi >= t_hi.double().numpy())
        assert np.all(lo >= 0) and np.all(hi <= 1)
        assert dis == [[(j, int(y))] for j in range(10) if j != int(y)]
        with torch.no_grad():
            want = model(x).numpy()
        got = _onnx_run(onnx_path, x)
        assert np.abs(got - want).max() <= 1e-5
        correct += int(got.argmax() == int(y))
    assert correct == summary["correct"]
    assert sorted(p.name for p in (out / "vnnlib").glob("prop_*")) == sorted(f"prop_{i}.vnnlib" for i in index)


def test_export_run_default_eps_is_training_eps(tmp_path, digits_run):
    summary = export_run(digits_run, tmp_path / "m.onnx", tmp_path / "props", limit=1, check=False)
    assert summary["eps"] == pytest.approx(0.05)  # digits-small's ε
    (i,) = summary["indices"]
    assert [p.name for p in sorted((tmp_path / "props").iterdir())] == ["instances.csv", f"prop_{i}.vnnlib"]


def _exported(csv_path: Path):
    """(test index, label) of each property of an instances.csv, in its order."""
    out = []
    for _, v, _ in csv.reader(csv_path.open()):
        i = int(v[len("prop_"):-len(".vnnlib")])
        _, _, dis = read_vnnlib(csv_path.parent / v)
        labels = {y for conj in dis for _, y in conj}
        assert len(labels) == 1
        out.append((i, labels.pop()))
    return out


def test_export_run_takes_the_class_stratified_points(tmp_path, digits_run):
    """--limit N exports the fixed-seed, class-stratified subset of certkd.data.subsets, not the first N."""
    from certkd.data import load_dataset
    from certkd.data.subsets import describe_points, stratified_indices

    _, test_set, _ = load_dataset("digits")
    n = 20
    want = stratified_indices(test_set.labels, n)
    assert want.tolist() != list(range(n))  # the test tells the two selections apart
    summary = export_run(digits_run, tmp_path / "m.onnx", tmp_path / "props", eps=0.1, limit=n, check=False)
    assert summary["n"] == n and summary["indices"] == want.tolist()
    assert summary["points"] == describe_points(test_set.labels, want)
    assert summary["points"]["points"] == f"{n} of {len(test_set)} test points, class-stratified (seed 0)"
    got = _exported(tmp_path / "props" / "instances.csv")
    assert [i for i, _ in got] == want.tolist()                               # same points, ascending
    assert [y for _, y in got] == test_set.labels[want].tolist()              # each with its own label
    assert sorted(y for _, y in got) == sorted(list(range(10)) * 2)            # 2 of each of the 10 classes
    # a limit of at least the test-set size exports every point, in order
    every = export_run(digits_run, tmp_path / "m2.onnx", tmp_path / "all", eps=0.1, limit=10 ** 6, check=False)
    assert every["indices"] == list(range(len(test_set))) and every["points"]["points"].startswith("all ")


def test_export_and_verify_with_the_same_limit_use_the_same_points(tmp_path, digits_run, capsys):
    """`certkd export --limit N` writes the properties of the points `certkd verify --limit N` checks, in its order."""
    import json

    from certkd.cli import main

    n = 7
    main(["export", str(digits_run), "--onnx", str(tmp_path / "m.onnx"), "--vnnlib-dir", str(tmp_path / "props"),
          "--eps", "0.1", "--limit", str(n)])
    out = capsys.readouterr().out
    main(["verify", str(digits_run), "--eps", "0.1", "--limit", str(n), "--engine", "none", "--timeout", "5",
          "--quiet", "--out", str(tmp_path / "v")])
    rows = [json.loads(line) for line in (tmp_path / "v" / "verification.jsonl").read_text().splitlines()]
    verified = [(r["index"], r["label"]) for r in rows]
    assert len(verified) == n and _exported(tmp_path / "props" / "instances.csv") == verified
    certifies = json.loads((tmp_path / "v" / "verification.json").read_text())["certifies"]
    summary = export_run(digits_run, tmp_path / "m2.onnx", tmp_path / "p2", eps=0.1, limit=n, check=False)
    assert summary["indices"] == [i for i, _ in verified]
    assert {k: summary["points"][k] for k in ("points", "n", "indices_sha256")} == \
        {k: certifies[k] for k in ("points", "n", "indices_sha256")}
    assert f"points: {certifies['points']}" in out


@pytest.mark.parametrize("kwargs,fragment", [
    ({"eps": 0.0}, "eps must be in (0, 1]"),
    ({"eps": -0.1}, "eps must be in (0, 1]"),
    ({"eps": 1.5}, "eps must be in (0, 1]"),
    ({"eps": float("nan")}, "eps must be in (0, 1]"),
    ({"limit": 0}, "--limit must be an integer >= 1"),
    ({"limit": 2.5}, "--limit must be an integer >= 1"),
    ({"timeout": 0}, "--timeout must be a positive number"),
    ({"vnnlib_dir": "{file}/props"}, "cannot create --vnnlib-dir"),
    ({"onnx_path": "{file}/m.onnx"}, "cannot create ONNX output folder"),
    ({"onnx_path": "{tmp}"}, "is a directory"),
    ({"run_path": "{tmp}/nothing"}, "no such run or checkpoint"),
], ids=["eps0", "eps<0", "eps>1", "eps-nan", "limit0", "limit-float", "timeout0", "vnnlib-dir-under-file",
        "onnx-under-file", "onnx-is-dir", "no-run"])
def test_export_run_bad_input(tmp_path, digits_run, kwargs, fragment):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    args = {"run_path": digits_run, "onnx_path": tmp_path / "out" / "m.onnx", "vnnlib_dir": tmp_path / "out" / "p",
            "eps": 0.1, "limit": 2}
    for k, v in kwargs.items():
        args[k] = v.format(file=blocker, tmp=tmp_path) if isinstance(v, str) else v
    with pytest.raises(CertkdError) as e:
        export_run(**args)
    msg = str(e.value)
    assert fragment in msg and "\n" not in msg


def test_cli_export(tmp_path, digits_run, capsys):
    """`certkd export` once it is wired into the CLI (skipped until then)."""
    from certkd.cli import cli, main

    if "export" not in cli.commands:
        pytest.skip("certkd export is not registered in cli.py yet")
    main(["export", str(digits_run), "--onnx", str(tmp_path / "model.onnx"), "--vnnlib-dir", str(tmp_path / "props"),
          "--eps", "0.1", "--limit", "3", "--timeout", "20"])
    assert (tmp_path / "model.onnx").exists()
    assert len(list(csv.reader((tmp_path / "props" / "instances.csv").open()))) == 3
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["export", str(digits_run), "--onnx", str(tmp_path / "m2.onnx"), "--vnnlib-dir", str(tmp_path / "p2"),
              "--eps", "1.5"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "eps must be in (0, 1]" in err


@pytest.mark.parametrize("kwargs", [{"label": 10}, {"label": -1}, {"num_classes": 1, "label": 0}, {"eps": -0.1},
                                    {"eps": float("inf")}, {"x": np.full(4, np.nan)}, {"x": np.full(4, 1.5)}])
def test_write_vnnlib_rejects_bad_arguments(tmp_path, kwargs):
    args = dict(x=np.full(4, 0.5), label=0, eps=0.1, num_classes=10)
    args.update(kwargs)
    with pytest.raises(ValueError):
        write_vnnlib(tmp_path / "p.vnnlib", **args)
    assert not (tmp_path / "p.vnnlib").exists()
