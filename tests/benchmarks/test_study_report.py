"""The study's report (benchmarks/study/report.py) and its command line on tiny fake run trees."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
from study import design, report  # noqa: E402


def _cli():
    name = "_certkd_bench_distillation_study"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "distillation_study.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


def _m(verified, clean=0.9, ibp=0.5, n=360, timeouts=0):
    return {"clean_accuracy": clean, "pgd_accuracy": clean - 0.1, "ibp_verified_accuracy": ibp,
            "verified_accuracy": verified, "n": n, "timeouts": timeouts, "complete": True}


def test_analyse_named_comparisons_holm_and_tost():
    table = {"cc-ibp": {s: _m(v) for s, v in enumerate([0.69, 0.70, 0.71])},
             "cc-dist-pgd": {s: _m(v) for s, v in enumerate([0.70, 0.72, 0.74])},
             "cc-dist-std": {s: _m(v) for s, v in enumerate([0.70, 0.725, 0.735])}}
    an = report.analyse(table)
    rows = {(c["a"], c["b"]): c for c in an["comparisons"]}
    assert list(rows) == [("cc-dist-pgd", "cc-ibp"), ("cc-dist-std", "cc-ibp"), ("cc-dist-pgd", "cc-dist-std")]
    first = rows[("cc-dist-pgd", "cc-ibp")]
    assert first["diffs"] == pytest.approx([1.0, 2.0, 3.0])
    assert first["p"] == pytest.approx(1 - 2 * math.sqrt(3 / 14), rel=1e-9)  # t(df=2) closed form
    ps = [c["p"] for c in an["comparisons"]]
    order = sorted(range(3), key=lambda i: ps[i])
    expect = [0.0] * 3
    run = 0.0
    for rank, i in enumerate(order):
        run = max(run, min(1.0, (3 - rank) * ps[i]))
        expect[i] = run
    assert [c["p_holm"] for c in an["comparisons"]] == pytest.approx(expect)
    # robust − standard: diffs [0, -0.5, +0.5] points -> TOST at ±2 is equivalent, p = 0.5 - 0.4 sqrt 1.5
    eq = an["tost"]
    assert eq["pair"] == ["cc-dist-pgd", "cc-dist-std"] and eq["margin"] == 2.0
    assert eq["p"] == pytest.approx(0.5 - 0.4 * math.sqrt(1.5), rel=1e-6) and eq["equivalent"] == 1.0


def test_cka_summary_groups_pairs_by_teacher_type():
    names = ["pgd-at-s0", "pgd-at-s1", "standard-s0"]
    m = [[1, 0.9, 0.5], [0.9, 1, 0.6], [0.5, 0.6, 1]]
    assert report.cka_summary(names, m) == {"pgd-at×pgd-at": [0.9], "pgd-at×standard": [0.5, 0.6]}


def _fake_study(root: Path, commit: str = "abc", seeds=3):
    vals = {"cc-ibp": [0.69, 0.70, 0.71], "cc-dist-pgd": [0.70, 0.72, 0.74]}
    for arm, vs in vals.items():
        for s in range(seeds):
            run = root / "digits" / "final" / f"{arm}-s{s}"
            run.mkdir(parents=True)
            (run / "test.json").write_text(json.dumps(_m(vs[s], timeouts=s)))
            (run / "study.json").write_text(json.dumps({"events": [{"stage": "test", "commit": commit,
                                                                   "dirty": False}]}))
    (root / "digits" / "selection.json").write_text(json.dumps({"alpha": 0.5, "arms": {"cc-ibp": 0.5,
                                                                                      "cc-dist-pgd": 0.01}}))


@pytest.fixture
def cli(monkeypatch):
    mod = _cli()
    monkeypatch.setitem(design.SETTINGS, "digits", design.SETTINGS["digits"])  # --seeds rewrites it: restore
    return mod


def test_report_only_on_a_fake_tree(tmp_path, cli, capsys):
    _fake_study(tmp_path / "runs")
    rep = tmp_path / "rep"
    argv = ["--report-only", "--settings", "digits", "--seeds", "3", "--out", str(tmp_path / "runs"), "--report", str(rep)]
    assert cli.main(argv) == 0
    text = (rep / "report.md").read_text()
    assert "Results made under commit(s): `abc` (6 stage events)" in text
    assert "| cc-dist-pgd − cc-ibp | 3 | +2.00 [-0.48, +4.48] | 3/3 | 0.0742 | 0.0742 | no |" in text
    assert "| cc-ibp | 0.5 | 3 | 360 | 90.0 ± 0.0 | 80.0 ± 0.0 | 50.0 ± 0.0 | 70.0 ± 1.0 | 3 (0.3%) |" in text
    assert "Mixed commits" not in text
    res = json.loads((rep / "results.json").read_text())
    assert res["commits"] == {"abc": 6} and res["mixed"] is False
    assert res["settings"]["digits"]["selection"]["alpha"] == 0.5


def test_report_refuses_mixed_commits_unless_allowed(tmp_path, cli, capsys):
    _fake_study(tmp_path / "runs")
    other = tmp_path / "runs" / "digits" / "final" / "cc-ibp-s0" / "study.json"
    other.write_text(json.dumps({"events": [{"stage": "test", "commit": "def", "dirty": False}]}))
    argv = ["--report-only", "--settings", "digits", "--seeds", "3", "--out", str(tmp_path / "runs"),
            "--report", str(tmp_path / "rep")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "2 commits" in err[0] and "--allow-mixed" in err[0]
    assert not (tmp_path / "rep" / "report.md").exists()
    assert cli.main(argv + ["--allow-mixed"]) == 0
    assert "**Mixed commits (--allow-mixed)" in (tmp_path / "rep" / "report.md").read_text()


def test_plan_lists_runs_and_bad_setting_is_one_line(tmp_path, cli, capsys):
    assert cli.main(["--plan", "--settings", "cifar-smoke"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("[cifar-smoke] smoke run: no claim rests on it (SMOKE RUN): 6 runs")
    assert cli.main(["--plan", "--settings", "nope"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown setting(s) nope; choose from digits")


def test_check_refuses_a_run_that_does_not_exist(tmp_path, cli, capsys):
    argv = ["--check", "digits", "0", "cc-ibp", "--out", str(tmp_path)]
    assert cli.main(argv) == 2
    assert "no selection for cc-ibp yet" in capsys.readouterr().err
    assert cli.main(["--check", "digits", "0", "cc-ibp@0.5", "--out", str(tmp_path)]) == 2
    assert "has no checkpoint: train it before checking it" in capsys.readouterr().err
    assert cli.main(["--check", "digits", "0", "nope", "--out", str(tmp_path)]) == 2


@pytest.mark.parametrize("same,code", [(True, 0), (False, 1)])
def test_check_exit_code_says_whether_the_rerun_is_bit_exact(tmp_path, cli, capsys, monkeypatch, same, code):
    from study import execute

    def fake(path, cfg, tmp):
        assert path == tmp_path / "digits" / "teachers" / "pgd-at-s3" and cfg.seed == 3 and cfg.method == "pgd-at"
        return {"run": str(path), "weights_sha256": "a" * 64, "rerun_weights_sha256": ("a" if same else "b") * 64,
                "config_sha256": "c", "stored_config_sha256": "c", "reproduces": same}
    monkeypatch.setattr(execute, "reproduce", fake)
    assert cli.main(["--check", "digits", "3", "teacher:pgd-at", "--out", str(tmp_path)]) == code
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith(f"check digits seed 3 teacher:pgd-at: reproduces bit-exactly: {'yes' if same else 'NO'}")
