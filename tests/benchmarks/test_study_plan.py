"""The study's design, planner and provenance (benchmarks/study/): no training, tiny fake run trees."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from study import design, orchestrate, planner, provenance  # noqa: E402

TINY = design.Setting("tiny", "digits-cnn7w16-ccibp", train_limit=1000, n_val=50, seeds=2, tune_seeds=(100,),
                      arms=("cc-ibp", "cc-dist-pgd", "zero"), grids=(("cc-ibp", (0.1, 0.5)),
                                                                      ("cc-dist-pgd", (0.01, 1.0)), ("zero", (0.01, 1.0))))


def test_planner_lists_the_expected_runs_for_a_tiny_setting():
    arms = planner.arms_of(TINY)
    runs = planner.plan(TINY, arms)
    P = planner.Planned
    # teachers: only the types some arm distils (pgd-at), one per report and tuning seed
    assert runs[:3] == [P("teacher", "pgd-at", None, 0), P("teacher", "pgd-at", None, 1),
                        P("teacher", "pgd-at", None, 100)]
    assert runs[3:5] == [P("tune-baseline", "cc-ibp", 0.1, 100), P("tune-baseline", "cc-ibp", 0.5, 100)]
    assert runs[5:9] == [P("tune", "cc-dist-pgd", 0.01, 100), P("tune", "cc-dist-pgd", 1.0, 100),
                         P("tune", "zero", 0.01, 100), P("tune", "zero", 1.0, 100)]
    assert runs[9:] == [P("final", a, None, s) for s in (0, 1) for a in ("cc-ibp", "cc-dist-pgd", "zero")]
    assert planner.plan_counts(runs) == {"teacher": 3, "tune-baseline": 2, "tune": 4, "final": 6}
    lines = orchestrate.describe_plan(TINY, arms)
    assert lines[0].endswith("15 runs; seeds 0..1, tuning seeds [100]")
    assert "  tune          cc-dist-pgd beta=0.01 seed 100" in lines


def test_trades_arm_only_with_the_flag():
    st = design.SETTINGS["digits"]
    assert "cc-dist-trades" not in [a.name for a in planner.arms_of(st)]
    arms = planner.arms_of(st, trades=True)
    assert arms[-1].name == "cc-dist-trades"
    assert planner.teacher_types(st, arms) == ("pgd-at", "standard", "trades")


def test_every_arm_of_a_setting_gets_the_same_tuning_budget():
    for st in design.SETTINGS.values():
        sizes = {a.name: len(st.grid(a)) for a in planner.arms_of(st, trades=True)}
        assert len(set(sizes.values())) == 1, (st.name, sizes)
        assert not set(st.tune_seeds) & set(st.report_seeds()), st.name  # tuning seeds are not report seeds


def test_the_settings_meet_the_issue_budgets():
    s = design.SETTINGS
    assert s["digits"].seeds >= 10 and s["digits"].test_limit is None
    steps = {n: -(-s[n].train_limit // 256) * 8 for n in ("mnist", "mnist-4x")}  # 8 epochs of batch 256
    assert steps == {"mnist": 160, "mnist-4x": 640}  # the larger budget: 4x today's optimiser steps
    assert s["mnist-4x"].train_limit % 256 == 0        # whole batches: no partial batch dropped below 4x
    assert s["mnist"].test_limit >= 500 and s["mnist-4x"].test_limit >= 500
    assert {n for n, x in s.items() if x.smoke} == {"cifar-smoke", "digits-smoke"}


def test_validation_points_are_held_out_from_every_training_subset():
    from certkd.data.dataset import ImageDataset

    n = 300
    ds = ImageDataset(torch.arange(n, dtype=torch.float32).reshape(n, 1, 1, 1) / n, torch.arange(n) % 10)
    val = planner.validation_indices(n, 120, 60)
    assert val.shape == (60,) and bool((val[1:] > val[:-1]).all())
    for limit in (50, 120):  # the students' and (larger) teachers' train_limit: certkd's own sampling
        trained = set((ds.sample(limit, seed=0).images.reshape(-1) * n).round().long().tolist())
        assert not trained & set(val.tolist())
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    assert set(val.tolist()) == set(perm[120:180].tolist())
    with pytest.raises(planner.StudyError, match="validation needs"):
        planner.validation_indices(n, 250, 60)
    assert design.SETTINGS["cifar-smoke"].held_out_start() == 5000  # after the teachers' 5000 points
    assert design.SETTINGS["digits"].held_out_start() + design.SETTINGS["digits"].n_val == 1437


def test_student_configs_pair_teacher_seeds_and_take_the_selected_alpha(tmp_path):
    cfg = planner.student_config(TINY, "cc-dist-pgd", 0.01, 1, tmp_path, alpha=0.3)
    assert (cfg.method, cfg.beta, cfg.alpha, cfg.seed) == ("cc-dist", 0.01, 0.3, 1)
    assert cfg.teacher == str(tmp_path / "tiny" / "teachers" / "pgd-at-s1")
    assert cfg.train_limit == 1000 and cfg.test_interval == planner.NO_TEST_INTERVAL
    base = planner.student_config(TINY, "cc-ibp", 0.1, 100, tmp_path)
    assert (base.method, base.alpha, base.teacher) == ("cc-ibp", 0.1, None)
    with pytest.raises(planner.StudyError, match="select it first"):
        planner.student_config(TINY, "zero", 0.01, 0, tmp_path)
    t0, t1 = (planner.teacher_config(TINY, "standard", s) for s in (0, 1))
    assert (t0.method, t0.seed, t1.seed, t0.train_limit) == ("standard", 0, 1, 1000)


def test_an_arm_with_an_option_this_certkd_lacks_is_reported_not_run():
    fake = design.Arm("fake", "beta", (1.0,), (("dist_target", "no-such-target"),))
    assert "no-such-target" in planner.available(TINY, fake)
    assert planner.available(TINY, design.ARM_BY_NAME["cc-ibp"]) is None


def test_comparisons_are_named_in_advance_and_filtered_by_the_setting():
    assert design.comparisons_for(TINY, ("cc-ibp", "cc-dist-pgd", "zero")) == (
        ("cc-dist-pgd", "cc-ibp"), ("cc-dist-pgd", "zero"))
    assert design.TOST_MARGIN == 2.0 and design.TOST_PAIR in design.COMPARISONS


# ----------------------------------------------------------------------------- provenance

def test_git_state_names_the_commit_and_a_dirty_tree(tmp_path):
    def git(*a):
        subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True)
    git("init", "-q")
    (tmp_path / "f.txt").write_text("a\n")
    git("add", "f.txt")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "x")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    assert provenance.git_state(tmp_path) == {"commit": head, "dirty": False}
    (tmp_path / "f.txt").write_text("b\n")
    assert provenance.git_state(tmp_path) == {"commit": head, "dirty": True}
    assert provenance.provenance_key({"commit": head, "dirty": True}) == head + "+dirty"


def test_one_commit_per_report_unless_allowed():
    rec = lambda *cs: {"events": [{"stage": "train", "commit": c, "dirty": False} for c in cs]}  # noqa: E731
    assert provenance.check_one_commit([rec("a", "a"), rec("a")], allow_mixed=False) == {"a": 3}
    with pytest.raises(planner.StudyError, match="2 commits"):
        provenance.check_one_commit([rec("a"), rec("b")], allow_mixed=False)
    assert provenance.check_one_commit([rec("a"), rec("b")], allow_mixed=True) == {"a": 1, "b": 1}
    dirty = {"events": [{"stage": "test", "commit": "a", "dirty": True}]}
    with pytest.raises(planner.StudyError, match="2 commits"):  # a dirty tree is another code
        provenance.check_one_commit([rec("a"), dirty], allow_mixed=False)
    with pytest.raises(planner.StudyError, match="no study.json events"):
        provenance.check_one_commit([rec("a"), {"events": []}], allow_mixed=False)
    with pytest.raises(planner.StudyError, match="uncommitted"):
        provenance.require_clean_for_claims({"dirty": True}, allow_dirty=False)
    provenance.require_clean_for_claims({"dirty": True}, allow_dirty=True)


def test_config_hash_ignores_where_data_lives_but_not_the_config():
    a = {"seed": 0, "beta": 1.0, "data_dir": "/x", "teacher": None}
    assert provenance.config_sha256(a) == provenance.config_sha256(dict(a, data_dir="/elsewhere"))
    assert provenance.config_sha256(a) != provenance.config_sha256(dict(a, seed=1))


def test_a_selection_cannot_change_after_the_test_set_was_touched(tmp_path):
    sel = {"alpha": 0.5, "arms": {"cc-ibp": 0.5, "zero": 0.01}}
    orchestrate.freeze(tmp_path, TINY, sel)
    orchestrate.freeze(tmp_path, TINY, dict(sel, arms={"cc-ibp": 0.5, "zero": 1.0}))  # no test yet: allowed
    assert orchestrate.read_selection(tmp_path, TINY)["arms"]["zero"] == 1.0
    run = tmp_path / "tiny" / "final" / "zero-s0"
    run.mkdir(parents=True)
    (run / "test.jsonl").write_text("")
    orchestrate.freeze(tmp_path, TINY, dict(sel, arms={"cc-ibp": 0.5, "zero": 1.0}, scores={}))  # same choice
    with pytest.raises(planner.StudyError, match="touched the test set"):
        orchestrate.freeze(tmp_path, TINY, sel)
    assert json.loads((tmp_path / "tiny" / "selection.json").read_text())["arms"]["zero"] == 1.0


def test_choose_refuses_before_every_tuning_run_is_validated(tmp_path):
    arm = design.ARM_BY_NAME["cc-ibp"]
    for v, acc in ((0.1, 0.6), (0.5, 0.7)):
        run = planner.tune_dir(tmp_path, TINY, "cc-ibp", v, 100)
        run.mkdir(parents=True)
        (run / "validation.json").write_text(json.dumps({"complete": v == 0.1, "verified_accuracy": acc}))
    with pytest.raises(planner.StudyError, match="1 tuning run"):
        orchestrate.choose(tmp_path, TINY, arm)
    (planner.tune_dir(tmp_path, TINY, "cc-ibp", 0.5, 100) / "validation.json").write_text(
        json.dumps({"complete": True, "verified_accuracy": 0.7}))
    assert orchestrate.choose(tmp_path, TINY, arm) == 0.5
