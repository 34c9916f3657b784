"""The pure parts of benchmarks/compare_trees.py and benchmarks/vnncomp.py.

The scripts are not a package: they are loaded from their files under private module names
(registered in sys.modules). The distillation study (benchmarks/study/) has its own tests:
test_study_stats.py, test_study_plan.py and test_study_report.py.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[2]


def _load(name: str):
    modname = f"_certkd_bench_{name}"
    if modname in sys.modules:
        return sys.modules[modname]
    spec = importlib.util.spec_from_file_location(modname, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[modname] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        del sys.modules[modname]
        raise
    return mod


compare = _load("compare_trees")


# ----------------------------------------------------------------------------- compare_trees.figures

def test_figures_collects_numeric_leaves_of_the_keys_by_dotted_path():
    data = {
        "ratio_of_medians": 7,
        "bounds": {
            "ratio_of_medians": 1.5,
            "median_wall_s": 2,
            "mean_wall_s": 3.0,                                   # not a requested key
            "crown": {"median_wall_s": 0.25, "ratio_of_medians": True,    # a bool is not a figure
                      "label": "median_wall_s"},
            "ibp": {"median_wall_s": "0.5", "ratio_of_medians": None,     # a string, None: ignored
                    "samples": [1.0, 2.0]},
        },
        "median_wall_s": {"inner": 4.0},                          # a dict under a key: only its leaves count
    }
    got = compare.figures(data, ["ratio_of_medians", "median_wall_s"])
    assert got == {"ratio_of_medians": 7.0, "bounds.ratio_of_medians": 1.5, "bounds.median_wall_s": 2.0,
                   "bounds.crown.median_wall_s": 0.25}
    assert all(type(v) is float for v in got.values())


def test_figures_only_for_the_given_keys():
    data = {"a": {"x": 1.0, "y": 2.0}, "x": 3, "z": False}
    assert compare.figures(data, ["x"]) == {"a.x": 1.0, "x": 3.0}
    assert compare.figures(data, ["y"]) == {"a.y": 2.0}
    assert compare.figures(data, ["z"]) == {}
    assert compare.figures(data, []) == {}
    assert compare.figures({}, ["x"]) == {}
    assert compare.figures(data, ["x"], prefix="run.") == {"run.a.x": 1.0, "run.x": 3.0}


def test_vnncomp_published_reads_verdicts_and_run_times(tmp_path):
    vnncomp = _load("vnncomp")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "toolA.csv").write_text(
        "mnistfc,./benchmarks/mnistfc/net.onnx,./benchmarks/mnistfc/p0.vnnlib,.01,holds,3.5\n"
        "mnistfc,./benchmarks/mnistfc/net.onnx,./benchmarks/mnistfc/p1.vnnlib,.01,violated,0.25\n"
        "mnistfc,./benchmarks/mnistfc/net.onnx,./benchmarks/mnistfc/p2.vnnlib,.01,timeout,120.0\n"
        "oval21,nets/a.onnx,vnnlib/q.vnnlib,.01,unsat,\n"
        "short,row\n")
    pub = vnncomp.published(tmp_path)
    assert pub == {"toolA": {("mnistfc", "net.onnx", "p0.vnnlib"): ("unsat", 3.5),
                             ("mnistfc", "net.onnx", "p1.vnnlib"): ("sat", 0.25),
                             ("mnistfc", "net.onnx", "p2.vnnlib"): (None, 120.0),
                             ("oval21", "a.onnx", "q.vnnlib"): ("unsat", None)}}
