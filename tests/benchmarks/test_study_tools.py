"""The pure parts of benchmarks/distillation_study.py and benchmarks/compare_trees.py.

The scripts are not a package: they are loaded from their files under private module names
(registered in sys.modules, which the frozen ``Setting`` dataclass needs). Nothing is trained or
verified: the statistics, the seed discovery, the report and the figure extraction are fed
hand-made inputs whose expected outputs are worked out in the tests.
"""
from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
from scipy import stats

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


study = _load("distillation_study")
compare = _load("compare_trees")

# t(0.975) with 2 degrees of freedom in closed form: for df = 2, t_p = (2p - 1) * sqrt(2 / (4p(1 - p)))
T975_2 = 0.95 * math.sqrt(2 / (4 * 0.975 * 0.025))  # 4.3026527...


# ----------------------------------------------------------------------------- paired differences

def _table(a_vals, b_vals, key="verified_accuracy"):
    return {"a": {s: {key: v} for s, v in a_vals.items()},
            "b": {s: {key: v} for s, v in b_vals.items()}}


def test_t_critical_value_matches_the_closed_form():
    assert T975_2 == pytest.approx(4.3026527, abs=1e-7)
    assert stats.t.ppf(0.975, 2) == pytest.approx(T975_2, rel=1e-10)


def test_t_interval_mean_and_half_width():
    m, lo, hi = study.t_interval([1.0, 2.0, 3.0])
    half = T975_2 * 1.0 / math.sqrt(3)  # sd of [1, 2, 3] is 1
    assert half == pytest.approx(2.4841377, abs=1e-6)
    assert m == 2.0
    assert lo == pytest.approx(2.0 - half, rel=1e-12)
    assert hi == pytest.approx(2.0 + half, rel=1e-12)
    # against scipy's own interval (n = 5, unequal differences)
    d = [0.5, -1.0, 2.0, 3.5, 1.0]
    lo_ref, hi_ref = stats.t.interval(0.95, len(d) - 1, loc=sum(d) / len(d), scale=stats.sem(d))
    m, lo, hi = study.t_interval(d)
    assert m == pytest.approx(1.2, rel=1e-12)
    assert (lo, hi) == (pytest.approx(lo_ref, rel=1e-10), pytest.approx(hi_ref, rel=1e-10))


def test_t_interval_of_one_difference_has_no_width():
    m, lo, hi = study.t_interval([4.0])
    assert m == 4.0 and math.isnan(lo) and math.isnan(hi)


def test_paired_difference_in_points_with_interval_and_count():
    # differences 100 * (a - b) = [1, 2, 3] points on seeds 0, 1, 2
    table = _table({0: 0.50, 1: 0.60, 2: 0.70}, {0: 0.49, 1: 0.58, 2: 0.67})
    assert study._paired(table, "a", "b", "verified_accuracy") == "+2.00 [-0.48, +4.48] (3/3 > 0)"
    # the reverse direction flips the sign and the count
    assert study._paired(table, "b", "a", "verified_accuracy") == "-2.00 [-4.48, +0.48] (0/3 > 0)"


def test_paired_uses_common_seeds_only():
    # seed 7 only in a, seed 9 only in b, with values that would move the mean a lot if used
    table = _table({0: 0.50, 1: 0.60, 2: 0.70, 7: 0.99}, {0: 0.49, 1: 0.58, 2: 0.67, 9: 0.01})
    assert study._paired(table, "a", "b", "verified_accuracy") == "+2.00 [-0.48, +4.48] (3/3 > 0)"


def test_paired_counts_only_strictly_positive_differences():
    # differences [0, 2, 4]: mean 2, sd 2, half-width 4.3027 * 2 / sqrt(3) = 4.9683; the 0 is not > 0
    table = _table({0: 0.50, 1: 0.52, 2: 0.54}, {0: 0.50, 1: 0.50, 2: 0.50})
    half = T975_2 * 2.0 / math.sqrt(3)
    expected = f"+2.00 [{2 - half:+.2f}, {2 + half:+.2f}] (2/3 > 0)"
    assert expected == "+2.00 [-2.97, +6.97] (2/3 > 0)"
    assert study._paired(table, "a", "b", "verified_accuracy") == expected
    # mixed signs: [-1, 2, 5] -> mean 2, sd 3, half-width 7.4524
    table = _table({0: 0.49, 1: 0.52, 2: 0.55}, {0: 0.50, 1: 0.50, 2: 0.50})
    assert study._paired(table, "a", "b", "verified_accuracy") == "+2.00 [-5.45, +9.45] (2/3 > 0)"


def test_paired_reads_the_requested_metric():
    table = {"a": {0: {"clean_accuracy": 0.9, "verified_accuracy": 0.2},
                   1: {"clean_accuracy": 0.8, "verified_accuracy": 0.4}},
             "b": {0: {"clean_accuracy": 0.9, "verified_accuracy": 0.1},
                   1: {"clean_accuracy": 0.8, "verified_accuracy": 0.1}}}
    # verified: [10, 30] -> mean 20, sd 14.142, half = t(0.975, 1) * 10 = 127.06
    half = stats.t.ppf(0.975, 1) * 10.0
    assert study._paired(table, "a", "b", "verified_accuracy") == \
        f"+20.00 [{20 - half:+.2f}, {20 + half:+.2f}] (2/2 > 0)"
    assert study._paired(table, "a", "b", "clean_accuracy") == "+0.00 [+0.00, +0.00] (0/2 > 0)"


def test_paired_is_none_without_both_arms_or_common_seeds():
    table = _table({0: 0.5}, {1: 0.4})
    assert study._paired(table, "a", "b", "verified_accuracy") is None  # no common seed
    assert study._paired(table, "a", "missing", "verified_accuracy") is None
    assert study._paired(table, "missing", "b", "verified_accuracy") is None
    assert study._paired({"a": {}, "b": {}}, "a", "b", "verified_accuracy") is None


# ----------------------------------------------------------------------------- seeds on disk

def _setting(seeds=3):
    return study.Setting("toy", "digits-cnn7w16-ccibp", seeds=seeds, short_epochs=1)


def test_seeds_on_disk_extends_to_the_highest_seed_folder(tmp_path):
    st = _setting(seeds=3)
    (tmp_path / "toy" / "short" / "cc-ibp-s0").mkdir(parents=True)
    (tmp_path / "toy" / "short" / "cc-dist-b1-s5").mkdir(parents=True)
    (tmp_path / "toy" / "full" / "plots-sfoo").mkdir(parents=True)      # matches the glob, not a seed
    (tmp_path / "toy" / "full" / "notes").mkdir(parents=True)           # not a run folder
    (tmp_path / "toy" / "teacher-pgd-at").mkdir(parents=True)           # teachers have no seed suffix
    (tmp_path / "other" / "short" / "cc-ibp-s9").mkdir(parents=True)    # another setting
    assert study.seeds_on_disk(tmp_path, st) == range(6)


def test_seeds_on_disk_reads_beta_folders_with_exponents(tmp_path):
    (tmp_path / "toy" / "full" / f"cc-dist-b{1e-05:g}-s4").mkdir(parents=True)  # cc-dist-b1e-05-s4
    assert study.seeds_on_disk(tmp_path, _setting(seeds=2)) == range(5)


def test_seeds_on_disk_never_below_the_settings_count(tmp_path):
    st = _setting(seeds=8)
    assert study.seeds_on_disk(tmp_path, st) == range(8)               # nothing there at all
    (tmp_path / "toy" / "short").mkdir(parents=True)
    assert study.seeds_on_disk(tmp_path, st) == range(8)               # empty budget folder
    (tmp_path / "toy" / "short" / "cc-ibp-s5").mkdir()
    assert study.seeds_on_disk(tmp_path, st) == range(8)               # seed 5 < 8


# ----------------------------------------------------------------------------- report

def _m(clean, pgd, ibp, verified, n=100):
    return {"clean_accuracy": clean, "pgd_accuracy": pgd, "ibp_verified_accuracy": ibp,
            "verified_accuracy": verified, "empirical_robust_accuracy": pgd, "n": n}


def _results(timeout_s=5.0, control_beta=None, teachers=None):
    return {
        "toy/full": {
            "arms": {
                "cc-ibp": {0: _m(0.90, 0.80, 0.60, 0.70), 1: _m(0.94, 0.82, 0.62, 0.72)},
                "cc-dist-b1": {0: _m(0.92, 0.84, 0.64, 0.75), 1: _m(0.92, 0.84, 0.66, 0.78, n=200),
                               2: _m(0.92, 0.84, 0.68, 0.99)},  # seed 2 has no cc-ibp partner
                "zero-b1": {},
            },
            "best_beta": 1.0, "control_beta": control_beta, "teachers": teachers or {}, "timeout_s": timeout_s,
        },
        "toy/short": {"arms": {"cc-ibp": {}, "cc-dist-b1": {}}, "best_beta": None, "control_beta": None,
                      "teachers": {}, "timeout_s": timeout_s},
    }


@pytest.fixture
def no_plot(monkeypatch):
    calls = []
    monkeypatch.setattr(study, "_plot", lambda results, path: calls.append(path))
    return calls


def _lines(out: Path):
    return (out / "report.md").read_text(encoding="utf-8").splitlines()


def test_report_without_preface_shows_the_command(tmp_path, no_plot):
    out = tmp_path / "rep"
    study.report(_results(), out, "python benchmarks/distillation_study.py --settings toy")
    lines = _lines(out)
    assert lines[0] == "# CC-Dist controlled study"
    assert lines[2] == "Command: `python benchmarks/distillation_study.py --settings toy`"
    assert (out / "results.json").exists()
    assert no_plot == [out / "pareto.png"]


def test_report_with_preface_uses_it_instead_of_the_command(tmp_path, no_plot):
    out = tmp_path / "rep"
    out.mkdir()
    (out / "preface.md").write_text("\nRuns built by hand.\n\nSecond paragraph.\n\n", encoding="utf-8")
    study.report(_results(), out, "python benchmarks/distillation_study.py --settings toy")
    text = (out / "report.md").read_text(encoding="utf-8")
    assert "Command:" not in text
    assert text.startswith("# CC-Dist controlled study\n\nRuns built by hand.\n\nSecond paragraph.\n\n")
    assert (out / "preface.md").read_text(encoding="utf-8").startswith("\nRuns built by hand.")  # left as is


def test_report_section_titles(tmp_path, no_plot):
    study.report(_results(timeout_s=5.0), tmp_path / "a", "cmd")
    titles = [ln for ln in _lines(tmp_path / "a") if ln.startswith("## ")]
    # the short budget has no results and gets no section
    assert titles == ["## toy/full (5 s per point; best CC-Dist β by verified accuracy: 1; controls at that β)"]

    study.report(_results(timeout_s=2.5, control_beta=1.0), tmp_path / "b", "cmd")
    titles = [ln for ln in _lines(tmp_path / "b") if ln.startswith("## ")]
    assert titles == ["## toy/full (2.5 s per point; best CC-Dist β by verified accuracy: 1; "
                      "controls at β = 1, fixed in advance)"]

    study.report(_results(timeout_s=None), tmp_path / "c", "cmd")
    titles = [ln for ln in _lines(tmp_path / "c") if ln.startswith("## ")]
    assert titles == ["## toy/full (best CC-Dist β by verified accuracy: 1; controls at that β)"]


def test_report_arm_rows_mean_and_sd(tmp_path, no_plot):
    study.report(_results(), tmp_path, "cmd")
    lines = _lines(tmp_path)
    header = "| arm | seeds | n points | clean | PGD (5 restarts) | IBP | verified (complete) |"
    assert header in lines
    # cc-ibp: clean [90, 94] -> 92.0 ± 2.8 (sd = 4 / sqrt 2 = 2.83); PGD [80, 82] -> 81.0 ± 1.4;
    # IBP [60, 62] -> 61.0 ± 1.4; verified [70, 72] -> 71.0 ± 1.4
    assert "| cc-ibp | 2 | 100 | 92.0 ± 2.8 | 81.0 ± 1.4 | 61.0 ± 1.4 | 71.0 ± 1.4 |" in lines
    # cc-dist-b1: three seeds, n 100 and 200; clean constant -> sd 0; IBP [64, 66, 68] -> 66.0 ± 2.0;
    # verified [75, 78, 99] -> mean 84.0, sd sqrt(171) = 13.08
    assert "| cc-dist-b1 | 3 | 100/200 | 92.0 ± 0.0 | 84.0 ± 0.0 | 66.0 ± 2.0 | 84.0 ± 13.1 |" in lines
    assert not any(ln.startswith("| zero-b1 |") for ln in lines)  # no seeds, no row


def test_report_paired_rows(tmp_path, no_plot):
    study.report(_results(), tmp_path, "cmd")
    lines = _lines(tmp_path)
    assert "| paired difference | verified | IBP | clean |" in lines
    # cc-dist-b1 − cc-ibp on seeds 0, 1 only: verified [5, 6], IBP [4, 4], clean [2, -2]
    t1 = stats.t.ppf(0.975, 1)
    half_v = t1 * (math.sqrt(0.5) / math.sqrt(2))  # sd of [5, 6] is sqrt(0.5)
    verified = f"+5.50 [{5.5 - half_v:+.2f}, {5.5 + half_v:+.2f}] (2/2 > 0)"
    assert verified == "+5.50 [-0.85, +11.85] (2/2 > 0)"
    ibp = "+4.00 [+4.00, +4.00] (2/2 > 0)"
    half_c = t1 * (math.sqrt(8) / math.sqrt(2))   # sd of [2, -2] is sqrt(8)
    clean = f"+0.00 [{-half_c:+.2f}, {half_c:+.2f}] (1/2 > 0)"
    rows = {ln.split(" | ")[0][2:]: ln for ln in lines if ln.startswith("| ") and "−" in ln}
    assert rows["cc-dist-b1 − cc-ibp"] == f"| cc-dist-b1 − cc-ibp | {verified} | {ibp} | {clean} |"
    # the controls at the best β: no std-teacher arm and an empty zero arm give dashes
    assert rows["robust − standard teacher (β=1)"] == "| robust − standard teacher (β=1) | – | – | – |"
    assert rows["teacher − target 0 (β=1)"] == "| teacher − target 0 (β=1) | – | – | – |"
    assert rows["target 0 − cc-ibp (β=1)"] == "| target 0 − cc-ibp (β=1) | – | – | – |"


def test_report_teachers_line(tmp_path, no_plot):
    teachers = {"teacher-pgd-at": {"clean_accuracy": 0.98, "pgd_accuracy": 0.91, "n": 100},
                "teacher-standard": {"clean_accuracy": 0.99, "pgd_accuracy": 0.02, "n": 100}}
    study.report(_results(teachers=teachers), tmp_path, "cmd")
    assert ("Teachers (end of training, PGD-40 on their evaluation points): "
            "teacher-pgd-at: clean 98%, PGD 91% (n = 100); teacher-standard: clean 99%, PGD 2% (n = 100)"
            ) in _lines(tmp_path)


def test_report_writes_the_plot(tmp_path):
    pytest.importorskip("matplotlib")
    study.report(_results(), tmp_path, "cmd")
    png = tmp_path / "pareto.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


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


def test_paired_with_one_common_seed_says_there_is_no_interval():
    table = _table({0: 0.50, 5: 0.60}, {0: 0.47})
    assert study._paired(table, "a", "b", "verified_accuracy") == "+3.00 [no interval: 1 seed] (1/1 > 0)"


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
