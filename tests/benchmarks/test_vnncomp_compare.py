"""benchmarks/vnncomp.py --compare: certkd's results against an external verifier's CSV (#22)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load():
    name = "_certkd_bench_vnncomp"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "vnncomp.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        sys.modules[name] = mod
    return sys.modules[name]


def _files(tmp_path: Path):
    data = tmp_path / "data"
    (data / "mnistfc").mkdir(parents=True)
    (data / "mnistfc" / "mnistfc_instances.csv").write_text(
        "".join(f"net.onnx,p{i}.vnnlib,120\n" for i in range(1, 7)))
    # certkd: benchmark,onnx,vnnlib,prepare,result,run (its time is prepare + run)
    ours = tmp_path / "certkd.csv"
    ours.write_text("mnistfc,net.onnx,p1.vnnlib,0.5,unsat,1.0\n"
                    "mnistfc,net.onnx,p2.vnnlib,0.1,sat,4.9\n"
                    "mnistfc,net.onnx,p3.vnnlib,0.1,timeout,12.2\n"
                    "mnistfc,net.onnx,p4.vnnlib,0.2,unsat,2.8\n"
                    "mnistfc,net.onnx,p5.vnnlib,0.1,unsat,1.0\n"
                    "mnistfc,net.onnx,p6.vnnlib,0.1,unknown,1.0\n")
    # the external tool, with the competition's paths and words; no row for p5
    theirs = tmp_path / "tool.csv"
    where = "mnistfc,./benchmarks/mnistfc/net.onnx,./benchmarks/mnistfc/"
    theirs.write_text(f"{where}p1.vnnlib,.01,holds,3.0\n"
                      f"{where}p2.vnnlib,.01,violated,13.0\n"
                      f"{where}p3.vnnlib,.01,unsat,2.0\n"
                      f"{where}p4.vnnlib,.01,sat,1.0\n"
                      f"{where}p6.vnnlib,.01,run_instance_timeout,12.5\n")
    return data, ours, theirs


def test_compare_counts_decided_overruns_medians_and_contradictions(tmp_path):
    vnn = _load()
    data, ours, theirs = _files(tmp_path)
    limits = {("mnistfc", "net.onnx", f"p{i}.vnnlib"): 12.0 for i in range(1, 7)}
    out = vnn.compare(vnn._results(ours, certkd=True), vnn._results(theirs, certkd=False), limits)
    b = out["mnistfc"]
    assert b["instances"] == 5  # p5 has no external row
    assert b["decided"] == (3, 3)  # certkd p1 p2 p4; the tool p1 p3 p4 (p2 came after the limit)
    assert b["overruns"] == (1, 2)  # certkd p3 at 12.3 s; the tool p2 and p6
    assert b["max_overrun"] == pytest.approx((0.3, 1.0))
    assert b["both"] == 2 and b["median"] == (2.25, 2.0)  # p1 (1.5, 3.0) and p4 (3.0, 1.0)
    assert b["contradictions"] == [("mnistfc", "net.onnx", "p4.vnnlib")]


def test_compare_command_prints_the_table(tmp_path, capsys):
    vnn = _load()
    data, ours, theirs = _files(tmp_path)
    assert vnn.main(["--data", str(data), "--benchmarks", "mnistfc", "--compare", str(theirs),
                     "--certkd-results", str(ours), "--timeout-fraction", "0.1"]) == 0
    text = capsys.readouterr().out
    assert "| mnistfc | 5 | 3 | 3 | 1 (+0.30) | 2 (+1.00) | 2.25 s / 2.00 s (2) | 1 |" in text
    assert "- mnistfc net.onnx p4.vnnlib" in text
    # a larger limit: nothing overruns, and p2 counts for the tool and joins the medians (5.0 s, 13.0 s)
    vnn.main(["--data", str(data), "--benchmarks", "mnistfc", "--compare", str(theirs),
              "--certkd-results", str(ours), "--timeout-fraction", "1"])
    assert "| mnistfc | 5 | 3 | 4 | 0 | 0 | 3.00 s / 3.00 s (3) | 1 |" in capsys.readouterr().out


def test_compare_refuses_a_missing_file(tmp_path):
    from certkd.errors import CertkdError

    vnn = _load()
    data, ours, _ = _files(tmp_path)
    with pytest.raises(CertkdError, match="no such file"):
        vnn.main(["--data", str(data), "--benchmarks", "mnistfc", "--compare", str(tmp_path / "nope.csv"),
                  "--certkd-results", str(ours)])
    with pytest.raises(CertkdError, match="not found"):
        vnn.main(["--data", str(data), "--benchmarks", "mnistfc", "--compare", str(ours),
                  "--certkd-results", str(tmp_path / "missing.csv")])
