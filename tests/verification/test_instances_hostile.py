"""`certkd verify --instances` against hostile benchmarks (issue #19): bad timeouts, failing instances,
colliding counterexample names, --timeout replacing the CSV's, torn results files."""
from __future__ import annotations

import csv
import hashlib
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import certkd.verification.onnx_verify as onnx_verify  # noqa: E402
from certkd.cli import main  # noqa: E402
from certkd.errors import CertkdError  # noqa: E402
from certkd.verification.instances import (cex_path, error_path, instance_name, read_instances,  # noqa: E402
                                           read_results, run_instances, summary_table)

QUIET = dict(log=lambda s: None)


def linear_onnx(path: Path, w) -> Path:
    """A bias-free linear network y = W x, input (1, 2), as an ONNX MatMul; W is (outputs, 2)."""
    weight = numpy_helper.from_array(np.array(w, dtype=np.float32).T.copy(), "W")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, len(w)])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path


def prop_file(path: Path, bound: float) -> Path:
    """x in [0, 1]^2 and the violation Y_0 >= bound."""
    lines = ["(declare-const X_0 Real)", "(declare-const X_1 Real)", "(declare-const Y_0 Real)",
             "(declare-const Y_1 Real)", "(assert (>= X_0 0.0))", "(assert (<= X_0 1.0))", "(assert (>= X_1 0.0))",
             "(assert (<= X_1 1.0))", f"(assert (>= Y_0 {bound}))"]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def bench(tmp_path):
    """A benchmark folder: a/net.onnx (identity), b/net.onnx (y = 2x), sat.vnnlib (Y_0 >= 0.5: both violate
    it), unsat.vnnlib (Y_0 >= 3: neither reaches it), broken.vnnlib (unreadable)."""
    root = tmp_path / "bench"
    linear_onnx(root / "a" / "net.onnx", [[1.0, 0.0], [0.0, 1.0]])
    linear_onnx(root / "b" / "net.onnx", [[2.0, 0.0], [0.0, 2.0]])
    prop_file(root / "sat.vnnlib", 0.5)
    prop_file(root / "unsat.vnnlib", 3.0)
    (root / "broken.vnnlib").write_text("(assert\n")
    return root


def write_csv(root: Path, rows) -> Path:
    path = root / "instances.csv"
    path.write_text("".join(f"{o},{v},{t}\n" for o, v, t in rows))
    return path


def statuses(out: Path):
    return [(r[1], r[2], r[4]) for r in csv.reader(out.open())]


# ------------------------------------------------------------------------------------------ timeouts

@pytest.mark.parametrize("bad", ["nan", "NaN", "inf", "-inf", "-1", "0", "abc", ""])
def test_csv_row_timeout_must_be_positive_finite(bench, tmp_path, bad):
    csv_path = write_csv(bench, [("a/net.onnx", "unsat.vnnlib", 5), ("a/net.onnx", "sat.vnnlib", bad)])
    out = tmp_path / "res" / "results.csv"
    with pytest.raises(CertkdError) as e:
        run_instances(csv_path, out=out, **QUIET)
    assert str(e.value) == (f"{csv_path}:2: timeout {bad!r} must be a positive finite number of seconds; "
                            "write the seconds, e.g. 60, or pass --timeout")
    assert not (tmp_path / "res").exists()  # refused before anything was written


@pytest.mark.parametrize("bad", [math.nan, math.inf, -1.0, 0.0])
def test_timeout_override_must_be_positive_finite(bench, tmp_path, bad):
    csv_path = write_csv(bench, [("a/net.onnx", "unsat.vnnlib", 5)])
    with pytest.raises(CertkdError, match="--timeout .* must be a positive finite number of seconds"):
        run_instances(csv_path, out=tmp_path / "r.csv", timeout=bad, **QUIET)
    with pytest.raises(CertkdError, match="timeout fraction .* must be a positive finite number"):
        run_instances(csv_path, out=tmp_path / "r.csv", timeout_fraction=bad, **QUIET)
    assert not (tmp_path / "r.csv").exists()


def _record_timeouts(monkeypatch):
    seen = []
    real = onnx_verify.verify_network

    def spy(net, prop, shape, *, timeout, **kw):
        seen.append(timeout)
        return real(net, prop, shape, timeout=timeout, **kw)

    monkeypatch.setattr(onnx_verify, "verify_network", spy)
    return seen


def test_timeout_replaces_every_row_and_the_fraction_still_scales(bench, tmp_path, monkeypatch):
    csv_path = write_csv(bench, [("a/net.onnx", "unsat.vnnlib", 50), ("b/net.onnx", "unsat.vnnlib", 70)])
    seen = _record_timeouts(monkeypatch)
    rows = run_instances(csv_path, out=tmp_path / "r1.csv", timeout=3, timeout_fraction=0.5, **QUIET)
    assert [r[4] for r in rows] == ["unsat", "unsat"]
    # each verify gets what is left of 3 × 0.5 s after reading its two files (well under a second)
    assert len(seen) == 2 and all(0.5 < t <= 1.5 for t in seen), seen
    seen.clear()
    run_instances(csv_path, out=tmp_path / "r2.csv", timeout_fraction=0.1, **QUIET)
    assert 4.0 < seen[0] <= 5.0 and 6.0 < seen[1] <= 7.0, seen  # without it, the CSV's


def test_cli_timeout_with_instances_is_used(bench, tmp_path, monkeypatch, capsys):
    """verify --help says --timeout replaces the CSV's with --instances; the command used to refuse it."""
    csv_path = write_csv(bench, [("a/net.onnx", "unsat.vnnlib", 50)])
    seen = _record_timeouts(monkeypatch)
    main(["verify", "--instances", str(csv_path), "--timeout", "2", "--out", str(tmp_path / "r.csv")])
    assert len(seen) == 1 and 1.0 < seen[0] <= 2.0
    assert statuses(tmp_path / "r.csv") == [("a/net.onnx", "unsat.vnnlib", "unsat")]
    main(["verify", "--help"])
    helptext = " ".join(capsys.readouterr().out.split())
    assert "with --instances the budget of every instance, reading its files included, replacing each CSV row's " \
           "timeout" in helptext


def test_a_file_read_past_the_deadline_is_a_timeout_row(bench, tmp_path, monkeypatch):
    """The timeout covers reading the files: reading that uses up the budget gives `timeout` without verifying
    (not a verification with no time left, nor a negative budget)."""
    import time

    import certkd.verification.vnnlib as vnnlib

    real = vnnlib.read_property

    def slow(path, **kw):
        time.sleep(0.3)
        return real(path)

    monkeypatch.setattr(vnnlib, "read_property", slow)
    called = []
    monkeypatch.setattr(onnx_verify, "verify_network", lambda *a, **k: called.append(1))
    csv_path = write_csv(bench, [("a/net.onnx", "unsat.vnnlib", 0.2)])
    rows = run_instances(csv_path, out=tmp_path / "r.csv", **QUIET)
    assert [r[4] for r in rows] == ["timeout"] and not called and float(rows[0][3]) >= 0.3


def test_the_property_reader_gets_the_deadline_and_the_network_sizes(bench, tmp_path, monkeypatch):
    import time

    import certkd.verification.vnnlib as vnnlib

    real, seen = vnnlib.read_property, []

    def spy(path, **kw):
        seen.append(kw)
        return real(path, **kw)

    monkeypatch.setattr(vnnlib, "read_property", spy)
    csv_path = write_csv(bench, [("a/net.onnx", "unsat.vnnlib", 7)])
    before = time.perf_counter()
    run_instances(csv_path, out=tmp_path / "r.csv", **QUIET)
    (kw,) = seen
    assert (kw["num_inputs"], kw["num_outputs"]) == (2, 2)
    assert before + 7 <= kw["deadline"] <= time.perf_counter() + 7


def test_a_parse_timeout_is_a_timeout_row_not_an_error(bench, tmp_path, monkeypatch):
    import certkd.verification.vnnlib as vnnlib

    def too_slow(path, **kw):
        raise vnnlib.ParseTimeout(f"{path}: reading the VNN-LIB property ran past the time limit")

    monkeypatch.setattr(vnnlib, "read_property", too_slow)
    csv_path = write_csv(bench, [("a/net.onnx", "unsat.vnnlib", 5)])
    rows = run_instances(csv_path, out=tmp_path / "r.csv", **QUIET)
    assert [r[4] for r in rows] == ["timeout"]
    assert not error_path(tmp_path / "r.csv", "a/net.onnx", "unsat.vnnlib").exists()


def test_a_property_for_another_network_size_is_an_error_row(bench, tmp_path):
    (bench / "three.vnnlib").write_text("".join(f"(declare-const X_{i} Real)\n" for i in range(3)) +
                                        "(declare-const Y_0 Real)\n(assert (>= Y_0 0.0))\n")
    csv_path = write_csv(bench, [("a/net.onnx", "three.vnnlib", 5), ("a/net.onnx", "unsat.vnnlib", 5)])
    rows = run_instances(csv_path, out=tmp_path / "r.csv", **QUIET)
    assert [r[4] for r in rows] == ["error", "unsat"]
    reason = error_path(tmp_path / "r.csv", "a/net.onnx", "three.vnnlib").read_text()
    assert "three.vnnlib" in reason and "X_2" in reason and reason.count("\n") == 1


# ------------------------------------------------------------------------------------------ error rows

def test_bad_instances_become_error_rows_and_the_benchmark_goes_on(bench, tmp_path, monkeypatch):
    real = onnx_verify.verify_network

    def flaky(net, prop, shape, **kw):
        if net.input_shape and kw["onnx_source"].endswith(str(Path("b") / "net.onnx")):
            raise RuntimeError("boom inside the verifier\nsecond line")
        return real(net, prop, shape, **kw)

    monkeypatch.setattr(onnx_verify, "verify_network", flaky)
    csv_path = write_csv(bench, [("missing.onnx", "sat.vnnlib", 5), ("a/net.onnx", "broken.vnnlib", 5),
                                 ("b/net.onnx", "unsat.vnnlib", 5), ("a/net.onnx", "unsat.vnnlib", 5)])
    out = tmp_path / "out" / "results.csv"
    log = []
    rows = run_instances(csv_path, out=out, log=log.append)
    assert [r[4] for r in rows] == ["error", "error", "error", "unsat"]
    assert [float(r[5]) for r in rows[:3]] == [0.0, 0.0, 0.0]
    reasons = [error_path(out, o, v).read_text() for o, v, _ in read_instances(csv_path)[:3]]
    assert reasons[0] == f"ONNX file not found: {bench / 'missing.onnx'}\n"
    assert f"{bench / 'broken.vnnlib'}:1: " in reasons[1] and reasons[1].count("\n") == 1  # the reader's line
    assert reasons[2] == "RuntimeError: boom inside the verifier\n"  # any exception type, its first line
    assert "b/net.onnx unsat.vnnlib: error: RuntimeError: boom inside the verifier" in log
    assert "| error | 3 | 0.00 | 0.0 |" in log[-2] and "| unsat | 1 |" in log[-2] and "| all | 4 |" in log[-2]
    assert log[-1].startswith("3 instance(s) ended in error; reasons in ") and "--retry-errors" in log[-1]
    assert not error_path(out, "a/net.onnx", "unsat.vnnlib").exists()


@pytest.mark.parametrize("exc", [ZeroDivisionError("float division by zero"), RecursionError("too deep"),
                                 MemoryError(), KeyError("W"), IndexError("list index out of range")])
def test_any_exception_type_is_an_error_row(bench, tmp_path, monkeypatch, exc):
    def fail(*a, **k):
        raise exc

    monkeypatch.setattr(onnx_verify, "verify_network", fail)
    csv_path = write_csv(bench, [("a/net.onnx", "unsat.vnnlib", 5)])
    rows = run_instances(csv_path, out=tmp_path / "r.csv", **QUIET)
    assert rows[0][4] == "error"
    text = error_path(tmp_path / "r.csv", "a/net.onnx", "unsat.vnnlib").read_text().strip()
    assert text == (f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)


def test_ctrl_c_still_stops_the_benchmark_and_keeps_the_rows_so_far(bench, tmp_path, monkeypatch):
    real, calls = onnx_verify.verify_network, []

    def interrupt_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(onnx_verify, "verify_network", interrupt_second)
    csv_path = write_csv(bench, [("a/net.onnx", "unsat.vnnlib", 5), ("b/net.onnx", "unsat.vnnlib", 5),
                                 ("a/net.onnx", "sat.vnnlib", 5)])
    with pytest.raises(KeyboardInterrupt):
        run_instances(csv_path, out=tmp_path / "r.csv", **QUIET)
    assert statuses(tmp_path / "r.csv") == [("a/net.onnx", "unsat.vnnlib", "unsat")]


def test_rerun_keeps_error_rows_unless_retry_errors(bench, tmp_path, monkeypatch):
    csv_path = write_csv(bench, [("a/net.onnx", "unsat.vnnlib", 5), ("a/net.onnx", "broken.vnnlib", 5)])
    out = tmp_path / "r.csv"
    run_instances(csv_path, out=out, **QUIET)
    assert statuses(out) == [("a/net.onnx", "unsat.vnnlib", "unsat"), ("a/net.onnx", "broken.vnnlib", "error")]
    prop_file(bench / "broken.vnnlib", 0.5)  # the user fixes the file (now sat)
    seen = _record_timeouts(monkeypatch)
    log = []
    rows = run_instances(csv_path, out=out, log=log.append)
    assert not seen and [r[4] for r in rows] == ["unsat", "error"]  # not redone: nothing verified
    assert log[0] == f"resuming: 2 of 2 instances already in {out}"
    rows = run_instances(csv_path, out=out, retry_errors=True, **QUIET)
    assert len(seen) == 1 and [r[4] for r in rows] == ["unsat", "sat"]
    # one row per instance (the retried one replaced), in the CSV's order; the stale reason is gone
    assert statuses(out) == [("a/net.onnx", "unsat.vnnlib", "unsat"), ("a/net.onnx", "broken.vnnlib", "sat")]
    assert not error_path(out, "a/net.onnx", "broken.vnnlib").exists()
    assert cex_path(out, "a/net.onnx", "broken.vnnlib").read_text().startswith("sat\n")


def test_cli_retry_errors(bench, tmp_path, capsys):
    csv_path = write_csv(bench, [("a/net.onnx", "broken.vnnlib", 5)])
    args = ["verify", "--instances", str(csv_path), "--out", str(tmp_path / "r.csv")]
    main(args)
    assert "1 instance(s) ended in error" in capsys.readouterr().out
    prop_file(bench / "broken.vnnlib", 3.0)
    main(args + ["--retry-errors"])
    assert statuses(tmp_path / "r.csv") == [("a/net.onnx", "broken.vnnlib", "unsat")]


# ------------------------------------------------------------------------------------------ cex names

def test_counterexample_files_of_same_named_networks_do_not_collide(bench, tmp_path):
    csv_path = write_csv(bench, [("a/net.onnx", "sat.vnnlib", 5), ("b/net.onnx", "sat.vnnlib", 5)])
    out = tmp_path / "res" / "results.csv"
    rows = run_instances(csv_path, out=out, **QUIET)
    assert [r[4] for r in rows] == ["sat", "sat"]
    pa, pb = cex_path(out, "a/net.onnx", "sat.vnnlib"), cex_path(out, "b/net.onnx", "sat.vnnlib")
    assert pa != pb and pa.parent == pb.parent == tmp_path / "res" / "results_cex"
    assert sorted(p.name for p in pa.parent.iterdir()) == sorted([pa.name, pb.name])  # no temporary files left
    for path, scale in ((pa, 1.0), (pb, 2.0)):  # each file holds its own network's counterexample
        text = path.read_text()
        x0 = float(text.split("(X_0 ")[1].split(")")[0])
        y0 = float(text.split("(Y_0 ")[1].split(")")[0])
        assert 0.0 <= x0 <= 1.0 and y0 >= 0.5 and y0 == pytest.approx(scale * x0, abs=1e-6)


def test_instance_names_are_readable_and_exact():
    digest = hashlib.sha256(b"a/net.onnx\nprops/p 1.vnnlib").hexdigest()[:10]
    assert instance_name("a/net.onnx", "props/p 1.vnnlib") == f"net__p_1__{digest}"
    assert instance_name("a/net.onnx", "p.vnnlib") != instance_name("b/net.onnx", "p.vnnlib")
    assert instance_name("x/a_b.onnx", "p.vnnlib") != instance_name("x_a/b.onnx", "p.vnnlib")
    assert cex_path("out/res.csv", "a/net.onnx", "p.vnnlib") == \
        Path("out/res_cex") / f"{instance_name('a/net.onnx', 'p.vnnlib')}.txt"
    assert len(instance_name("n" * 300 + ".onnx", "p" * 300 + ".vnnlib")) <= 60 + 2 + 60 + 2 + 10


# ------------------------------------------------------------------------------------------ results file

def test_torn_last_line_does_not_swallow_the_next_row(bench, tmp_path):
    csv_path = write_csv(bench, [("a/net.onnx", "unsat.vnnlib", 5)])
    out = tmp_path / "r.csv"
    out.write_text("bench,b/net.onnx,unsat.vnn")  # a crash in the middle of a row
    run_instances(csv_path, out=out, **QUIET)
    lines = out.read_text().splitlines()
    assert lines[0] == "bench,b/net.onnx,unsat.vnn" and lines[1].startswith("bench,a/net.onnx,unsat.vnnlib,")
    assert list(read_results(out)) == [("a/net.onnx", "unsat.vnnlib")]
    assert read_results(out)[("a/net.onnx", "unsat.vnnlib")][4] == "unsat"


def test_summary_table_counts_every_result():
    rows = [["b", "n", "p", "0", s, t] for s, t in (("sat", "1"), ("error", "0"), ("error", "0"), ("odd", "x"))]
    assert summary_table(rows) == "\n".join(["| result | count | median s | total s |", "|---|---:|---:|---:|",
                                             "| sat | 1 | 1.00 | 1.0 |", "| error | 2 | 0.00 | 0.0 |",
                                             "| odd | 1 | 0.00 | 0.0 |", "| all | 4 | | 1.0 |"])


@pytest.mark.parametrize("where", ["dir", "under-file", "cex-is-file"])
def test_unwritable_results_path_is_refused_before_any_work(bench, tmp_path, monkeypatch, where):
    csv_path = write_csv(bench, [("a/net.onnx", "unsat.vnnlib", 5)])
    (tmp_path / "afile").write_text("keep")
    out = {"dir": tmp_path, "under-file": tmp_path / "afile" / "r.csv", "cex-is-file": tmp_path / "afile.csv"}[where]
    if where == "cex-is-file":
        (tmp_path / "afile_cex").write_text("keep")
    seen = _record_timeouts(monkeypatch)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(CertkdError) as e:
        run_instances(csv_path, out=out, **QUIET)
    assert "\n" not in str(e.value) and not seen and sorted(p.name for p in tmp_path.iterdir()) == before
    assert {"dir": "is a directory; pass a file path, e.g. --out", "under-file": "afile is a file, not a folder",
            "cex-is-file": "afile_cex is a file, but the results of --out"}[where] in str(e.value)


def test_threads_100000_does_not_crash_verify(bench, tmp_path):
    """`--threads 100000` (and CERTKD_THREADS=100000) used to kill the process when OpenMP made the threads."""
    proc = subprocess.run([sys.executable, "-m", "certkd", "verify", "--onnx", str(bench / "a" / "net.onnx"),
                           "--vnnlib", str(bench / "unsat.vnnlib"), "--threads", "100000", "--timeout", "20"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "unsat\n"
    assert proc.stderr.splitlines()[0].startswith("warning: --threads 100000 capped at ")
