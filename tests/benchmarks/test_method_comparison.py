"""The method comparison of issue #23 (benchmarks/method_comparison.py, benchmarks/comparison/): the plan
and its cost, the configs, the statistics on hand-made numbers, and the smoke mode end to end."""
from __future__ import annotations

import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))
import method_comparison  # noqa: E402
from comparison import design, plan, report  # noqa: E402
from study.planner import StudyError  # noqa: E402

T975_2 = 0.95 * math.sqrt(2 / (4 * 0.975 * 0.025))  # t(0.975, df=2) = 4.3026527...
ISSUE_METHODS = {"ibp", "crown-ibp", "sabr", "taps", "staps", "cc-ibp", "mtl-ibp", "cc-dist"}


def test_the_plan_tunes_every_method_on_the_same_budget_then_three_report_seeds():
    assert {m.name for m in design.METHODS} == ISSUE_METHODS
    assert {len(m.grid) for m in design.METHODS} == {design.GRID_SIZE}
    runs = plan.plan(design.DIGITS, design.METHODS)
    P = plan.Planned
    # PGD-AT teachers for the tuning seed and the 3 report seeds, independent seeds
    assert runs[:4] == [P("teacher", "pgd-at", None, s) for s in (0, 1, 2, 100)]
    tune = [r for r in runs if r.phase == "tune"]
    assert len(tune) == 21 and {r.seed for r in tune} == {100}
    assert [r for r in tune if r.method == "sabr"] == [P("tune", "sabr", v, 100) for v in (0.1, 0.3, 0.6)]
    # CC-Dist's β grid runs after every other method's tuning (it trains at CC-IBP's selected α)
    after = runs[4 + 21:4 + 24]
    assert after == [P("tune-after", "cc-dist", v, 100) for v in (0.1, 1.0, 10.0)]
    finals = runs[28:]
    assert len(finals) == 24 and {r.seed for r in finals} == {0, 1, 2} and {r.value for r in finals} == {None}
    assert not set(design.DIGITS.tune_seeds) & set(design.DIGITS.report_seeds())
    lines = plan.describe(design.DIGITS, design.METHODS)
    assert lines[0].endswith("52 runs; report seeds 0..2, tuning seeds [100]")
    assert "  tune       taps taps_grad_scale=25 seed 100" in lines
    assert lines[-2] == "runs per phase: teacher 4, tune 21, tune-after 3, final 24"


def test_the_cost_estimate_on_hand_numbers():
    tiny = replace(design.DIGITS, n_val=10, test_limit=20, seeds=2, overrides=(("epochs", 20),))
    methods = [design.METHOD_BY_NAME[n] for n in ("ibp", "cc-ibp", "cc-dist")]
    runs = plan.plan(tiny, methods)
    # teachers (0, 1, 100): 3; tuning 3 x 3; finals 3 methods x 2 seeds
    assert len(runs) == 3 + 9 + 6
    train_s = {"ibp": 10.0, "cc-ibp": 20.0, "cc-dist": 40.0, "teacher": 100.0}
    est = plan.estimate(runs, tiny, train_s, point_s=0.5)
    # epochs 20 of 40 halve training: teachers 3*50, tuning 3*(5+10+20), finals 2*(5+10+20)
    assert est["train_s"] == 150 + 105 + 70
    assert est["verify_s"] == 9 * 10 * 0.5 + 6 * 20 * 0.5
    assert est["total_s"] == est["train_s"] + est["verify_s"]
    assert plan.estimate(plan.plan(design.SMOKE, methods), design.SMOKE, train_s, 0.0)["verify_s"] == 0.0


def test_configs_tune_the_methods_key_and_cc_dist_distils_its_seeds_teacher(tmp_path):
    cfg = plan.method_config(design.DIGITS, "taps", 25.0, 1, tmp_path)
    assert (cfg.method, cfg.taps_grad_scale, cfg.seed, cfg.train_limit) == ("taps", 25.0, 1, 1150)
    assert plan.method_config(design.DIGITS, "ibp", 3e-3, 0, tmp_path).lr == 3e-3
    assert plan.method_config(design.DIGITS, "crown-ibp", 0.5, 0, tmp_path).crown_ibp_beta_end == 0.5
    cfg = plan.method_config(design.DIGITS, "cc-dist", 10.0, 2, tmp_path, alpha=0.3)
    assert (cfg.method, cfg.beta, cfg.alpha) == ("cc-dist", 10.0, 0.3)
    assert cfg.teacher == str(tmp_path / "digits" / "teachers" / "pgd-at-s2")
    with pytest.raises(StudyError, match="trains at the α selected for cc-ibp"):
        plan.method_config(design.DIGITS, "cc-dist", 1.0, 0, tmp_path)
    assert plan.tune_dir(tmp_path, design.DIGITS, "staps", 0.3, 100) == tmp_path / "digits/tune/staps/alpha0.3-s100"


def test_statistics_on_hand_made_numbers():
    s = report.metric_stats([0.5, 0.6, 0.7])  # percent 50, 60, 70: sd 10
    half = T975_2 * 10 / math.sqrt(3)
    assert s["mean"] == pytest.approx(60.0, abs=1e-12) and s["n"] == 3
    assert (s["lo"], s["hi"], s["half"]) == (pytest.approx(60 - half, rel=1e-12), pytest.approx(60 + half, rel=1e-12),
                                             pytest.approx(24.841377, abs=1e-6))
    assert report.cell(s) == "60.0 ± 24.8"
    assert report.cell(report.metric_stats([0.25])) == "25.0 (1 seed)"
    assert report.cell(None) == "–"
    run = lambda v, to: {"clean_accuracy": 0.9, "pgd40_accuracy": 0.8, "pgd_accuracy": 0.75,  # noqa: E731
                         "ibp_verified_accuracy": 0.5, "verified_accuracy": v, "n": 100, "timeouts": to}
    summ = report.summarise({"a": {0: run(0.5, 1), 1: run(0.6, 0), 2: run(0.7, 3)}, "b": {}})
    assert summ["b"] == {"seeds": []}
    a = summ["a"]
    assert a["seeds"] == [0, 1, 2] and (a["points"], a["timeouts"], a["timeout_fraction"]) == (300, 4, 4 / 300)
    assert a["clean_accuracy"]["half"] == 0.0 and a["verified_accuracy"]["mean"] == pytest.approx(60.0)
    sel = {"arms": {"a": 0.3}, "keys": {"a": "alpha", "b": "beta"}, "metric": "verified_accuracy",
           "scores": {"b": {"25": [0.5], "5": [0.25], "0.5": [0.125]}, "a": {"0.3": [0.55]}}}
    md = report.markdown(summ, sel, ["# title"])
    assert md[-2] == "- a (alpha): 0.3: 55.0"  # the summary's order, and grid values in numeric order
    assert md[-1] == "- b (beta): 0.5: 12.5, 5: 25.0, 25: 50.0"
    assert md[4] == "| a | alpha = 0.3 | 3 | 90.0 ± 0.0 | 80.0 ± 0.0 | 75.0 ± 0.0 | 50.0 ± 0.0 | 60.0 ± 24.8 | 4/300 (1.3%) |"
    assert md[5] == "| b | – | 0 | – | – | – | – | – | – |"


def test_bad_arguments_are_one_line_refusals(capsys):
    assert method_comparison.main(["--plan", "--methods", "ibp,cc-kd"]) == 2
    assert capsys.readouterr().err.strip() == ("error: unknown method(s) cc-kd; choose from ibp, crown-ibp, sabr, taps, "
                                               "staps, cc-ibp, mtl-ibp, cc-dist")
    assert method_comparison.main(["--smoke", "--methods", "cc-dist", "--out", "/nonexistent/x", "--allow-dirty"]) == 2
    assert "cc-dist trains at the α selected for cc-ibp: add it to --methods" in capsys.readouterr().err
    assert method_comparison.main(["--plan", "--timeout", "0"]) == 2


@pytest.mark.slow
def test_smoke_mode_end_to_end_and_resumes(tmp_path, capsys):
    out, res = tmp_path / "runs", tmp_path / "results"
    argv = ["--smoke", "--out", str(out), "--results", str(res), "--allow-dirty"]
    assert method_comparison.main(argv) == 0
    first = capsys.readouterr().out
    data = json.loads((res / "method_comparison_digits-smoke.json").read_text())
    assert set(data["summary"]) == ISSUE_METHODS and data["setting"]["smoke"] is True
    sel = json.loads((out / "digits-smoke" / "selection.json").read_text())
    assert sel["arms"] == {m.name: m.grid[0] for m in design.METHODS} and sel["alpha"] == 0.1
    for m in design.METHODS:
        row = data["summary"][m.name]
        assert row["seeds"] == [0, 1] and row["points"] == 20
        for seed in (0, 1):
            run = out / "digits-smoke" / "final" / f"{m.name}-s{seed}"
            test = json.loads((run / "test.json").read_text())
            assert test["n"] == 10 and test["complete"] and test["timeout_s"] == 1.0
            assert row["verified_accuracy"]["values"][seed] == pytest.approx(100 * test["verified_accuracy"])
            assert row["timeouts"] >= test["timeouts"]
            # a certificate never contradicts an attack: verified <= PGD-robust <= clean, per run
            assert test["verified_accuracy"] <= test["pgd_accuracy"] <= test["clean_accuracy"]
            ev = json.loads((run / "evaluate.json").read_text())
            assert ev["n"] == 10 and ev["weights_sha256"] == json.loads((run / "study.json").read_text())["weights_sha256"]
    from certkd.runs import read_config

    cfg = read_config(out / "digits-smoke" / "final" / "cc-dist-s1")
    assert cfg.teacher == str(out / "digits-smoke" / "teachers" / "pgd-at-s1") and cfg.alpha == sel["alpha"]
    md = (res / "method_comparison_digits-smoke.md").read_text()
    assert "SMOKE RUN" in md and md.count("\n| ") == 1 + len(design.METHODS)
    # rerun: nothing trains or verifies again, the same numbers come out
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")}
    assert method_comparison.main(argv) == 0
    assert "train" in first and {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")} == mtimes
    assert json.loads((res / "method_comparison_digits-smoke.json").read_text())["summary"] == data["summary"]


def _square(kind: str, x: int) -> str:
    return f"{kind}{x * x}"


def test_run_jobs_takes_another_job_function_in_order_and_in_parallel():
    from study.execute import run_jobs

    for workers in (1, 2):
        lines = []
        run_jobs([("a", 2), ("b", 3), ("c", 4)], workers, lines.append, _square)
        assert lines == ["  a a4", "  b b9", "  c c16"]
