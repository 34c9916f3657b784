"""certkd report / card / release: tables over seeds, CSV, plots, commands, model card, release folder."""
import csv
import io
import json
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import certkd
import certkd.training
from certkd import reporting
from certkd.cli import cli, main
from certkd.errors import CertkdError

FAST = {"epochs": 2, "eval_limit": 30}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _quiet(_):
    pass


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A PGD-AT teacher, two CC-IBP seeds and a CC-Dist student of the teacher (2 epochs each, evaluated)."""
    yield _train_runs(tmp_path_factory.mktemp("runs"))


def _train_runs(root):
    teacher = certkd.train(certkd.resolve_config("digits-small", FAST, teacher=True), root / "teacher",
                           progress=False, log=_quiet)
    for seed in (0, 1):
        certkd.train(certkd.resolve_config("digits-small", dict(FAST, seed=seed)), root / f"ccibp-s{seed}",
                     progress=False, log=_quiet)
    certkd.train(certkd.resolve_config("digits-small", dict(FAST, method="cc-dist", beta=0.1, teacher=str(teacher))),
                 root / "ccdist", progress=False, log=_quiet)
    for name in ("teacher", "ccibp-s0", "ccibp-s1", "ccdist"):
        certkd.evaluate_run(root / name, limit=30)
    return root


@pytest.fixture(scope="module")
def report(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "report"
    summary = reporting.write_report(sorted(runs.iterdir()), out)
    return out, summary


def _eval(run_dir):
    return json.loads((run_dir / "evaluation.json").read_text())


def _is_png(path):
    data = path.read_bytes()
    return data[:8] == PNG_MAGIC and len(data) > 5000


def test_groups_and_mean_std_match_numpy(runs, report):
    out, summary = report
    assert summary["runs"] == 4 and summary["missing"] == []
    assert summary["groups"] == ["pgd-at", "cc-ibp", "cc-dist"]  # teachers, certified, distillation
    rows = list(csv.DictReader(io.StringIO((out / "results.csv").read_text())))
    by_group = {r["group"]: r for r in rows}
    assert set(by_group) == {"pgd-at", "cc-ibp", "cc-dist"}
    cc = by_group["cc-ibp"]
    assert cc["n_runs"] == "2" and cc["seeds"] == "0 1"
    md = (out / "report.md").read_text()
    for key in ("clean_accuracy", "pgd_accuracy", "ibp_verified_accuracy"):
        vals = np.array([_eval(runs / f"ccibp-s{s}")[key] for s in (0, 1)])
        assert float(cc[f"{key}_mean"]) == pytest.approx(vals.mean())
        assert float(cc[f"{key}_std"]) == pytest.approx(vals.std(ddof=1))
        assert cc[f"{key}_n"] == "2"
        assert f"{100 * vals.mean():.1f} ± {100 * vals.std(ddof=1):.1f}" in md
        single = by_group["cc-dist"]
        assert float(single[f"{key}_mean"]) == pytest.approx(_eval(runs / "ccdist")[key])
        assert single[f"{key}_std"] == ""  # one seed: no spread
    # never verified: CROWN / verified columns are empty
    assert cc["verified_accuracy_mean"] == "" and cc["verified_accuracy_n"] == "0"
    per_run = list(csv.DictReader(io.StringIO((out / "runs.csv").read_text())))
    assert len(per_run) == 4


def test_pngs_are_written(runs, report):
    out, summary = report
    assert _is_png(out / "pareto.png")
    for name in ("teacher", "ccibp-s0", "ccibp-s1", "ccdist"):
        assert _is_png(out / "curves" / f"{name}.png"), name


def test_report_md_has_table_plot_and_exact_commands(runs, report, monkeypatch):
    out, _ = report
    md = (out / "report.md").read_text()
    assert "| configuration" in md and "| cc-ibp" in md and "| pgd-at" in md
    assert "](pareto.png)" in md and "curves/ccdist.png" in md
    lines = [l for l in md.splitlines() if l.startswith(("certkd train", "certkd teacher"))]
    assert len(lines) == 4
    assert lines[0].endswith(str(runs / "teacher"))  # the teacher first: students need it
    assert lines[0].startswith("certkd teacher ")  # written as the command that made it
    evaluate = [l for l in md.splitlines() if l.startswith("certkd evaluate")]
    assert len(evaluate) == 1 and evaluate[0].endswith(" --limit 30")  # one line: same flags for all four
    assert all(str(runs / name) in evaluate[0] for name in ("teacher", "ccibp-s0", "ccibp-s1", "ccdist"))
    assert md.rstrip().endswith("```") and "certkd report" in md
    # every train command resolves, through the real CLI, to exactly the stored config
    captured = []
    monkeypatch.setattr(certkd.training, "train", lambda cfg, out, **kw: captured.append((cfg, out)) or out)
    for line in lines:
        main(shlex.split(line)[1:])
    for cfg, run in captured:
        stored = yaml.safe_load((Path(run) / "config.yaml").read_text())
        assert cfg.to_dict() == stored, run


def test_group_names_show_the_distinguishing_keys(tmp_path):
    recs = []
    for i, (beta, seed) in enumerate([(0.1, 0), (0.1, 1), (1.0, 0)]):
        cfg = certkd.resolve_config("digits-small", {"method": "cc-dist", "teacher": "t", "beta": beta, "seed": seed})
        recs.append(reporting.RunRecord(path=tmp_path / str(i), name=str(i), config=cfg))
    recs.append(reporting.RunRecord(path=tmp_path / "c", name="c", config=certkd.resolve_config("digits-small")))
    groups = reporting.group_runs(recs)
    assert [g.name for g in groups] == ["cc-ibp", "cc-dist β=0.1", "cc-dist β=1"]
    assert [len(g.runs) for g in groups] == [1, 2, 1]


def _fake_run(path, seed, evaluation=None, **overrides):
    cfg = certkd.resolve_config("digits-small", dict(overrides, seed=seed))
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    if evaluation is not None:
        (path / "evaluation.json").write_text(json.dumps(evaluation))


def _write_rows(run, counts, time_s=0.5):
    """verification.jsonl with ``counts[status]`` rows per status (what ``certkd verify`` writes beside
    verification.json; report and card check the summary against it). "attacked@milp": a counterexample
    found by the complete verifier, not by PGD."""
    rows = []
    for key, k in counts.items():
        status, _, stage = key.partition("@")
        rows += [{"index": len(rows) + j, "label": 0, "status": status, "time_s": time_s, "margin": 0.0,
                  "stage": stage or "pgd"} for j in range(k)]
    (run / "verification.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_three_seeds_partial_metrics_and_missing_runs(tmp_path):
    rng = np.random.default_rng(0)
    vals = rng.uniform(0.2, 0.9, size=(3, 3))
    for seed in range(3):
        ev = dict(zip(("clean_accuracy", "pgd_accuracy", "ibp_verified_accuracy"), map(float, vals[seed])), n=30,
                  eps=0.05)
        _fake_run(tmp_path / "runs" / f"s{seed}", seed, ev)
    # the third seed also has a complete verification: verified counts 1/3
    (tmp_path / "runs" / "s2" / "verification.json").write_text(json.dumps(
        {"complete": True, "n": 30, "verified_accuracy": 0.5, "crown_verified_accuracy": 0.4,
         "clean_accuracy": 0.9, "settings": {"eps": 0.05, "timeout": 1.0, "engine": "bab"}}))
    _write_rows(tmp_path / "runs" / "s2", {"misclassified": 3, "verified-crown": 12, "verified-bab": 3, "timeout": 12})
    _fake_run(tmp_path / "runs" / "noeval", 0, method="ibp")
    s = reporting.write_report([tmp_path / "runs"], tmp_path / "rep")  # a folder of runs is expanded
    assert s["missing"] == ["noeval"]
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "certkd evaluate" in md and "noeval" in md
    rows = {r["group"]: r for r in csv.DictReader(io.StringIO((tmp_path / "rep" / "results.csv").read_text()))}
    cc = rows["cc-ibp"]
    assert float(cc["clean_accuracy_mean"]) == pytest.approx(vals[:, 0].mean())
    assert float(cc["clean_accuracy_std"]) == pytest.approx(vals[:, 0].std(ddof=1))
    assert float(cc["ibp_verified_accuracy_std"]) == pytest.approx(vals[:, 2].std(ddof=1))
    assert cc["verified_accuracy_n"] == "1" and float(cc["verified_accuracy_mean"]) == 0.5
    assert "50.0 (1/3)" in md
    assert rows["ibp"]["clean_accuracy_n"] == "0"


def test_bad_inputs_raise_one_line_errors(tmp_path, runs):
    with pytest.raises(CertkdError, match="no run directories"):
        reporting.write_report([], tmp_path / "r")
    with pytest.raises(CertkdError, match="no such run directory"):
        reporting.write_report([tmp_path / "missing"], tmp_path / "r")
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    for bad in (tmp_path / "empty", tmp_path / "file.txt"):
        with pytest.raises(CertkdError, match="not a certkd run directory") as e:
            reporting.write_report([bad], tmp_path / "r")
        assert "\n" not in str(e.value)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.yaml").write_text("alpah: 0.3\n")
    with pytest.raises(CertkdError, match="did you mean 'alpha'"):
        reporting.write_report([broken], tmp_path / "r")
    # the report folder itself is skipped when a glob picks it up (certkd report runs/* --out runs/report)
    (tmp_path / "several").mkdir()
    shutil.copytree(runs / "teacher", tmp_path / "several" / "teacher")
    reporting.write_report([tmp_path / "several" / "teacher"], tmp_path / "several" / "report")
    again = reporting.write_report(sorted((tmp_path / "several").iterdir()), tmp_path / "several" / "report")
    assert again["runs"] == 1
    with pytest.raises(CertkdError, match="is a run directory"):
        reporting.write_report([runs / "teacher"], runs / "teacher")
    with pytest.raises(CertkdError, match="no checkpoint"):
        reporting.write_card(_make_untrained(tmp_path))
    with pytest.raises(CertkdError, match="inside the run"):
        reporting.make_release(runs / "ccdist", runs / "ccdist")


def _make_untrained(tmp_path):
    _fake_run(tmp_path / "untrained", 0)
    return tmp_path / "untrained"


def test_model_card_lists_architecture_metrics_and_teacher(runs, tmp_path):
    path = reporting.write_card(runs / "ccdist")
    assert path == runs / "ccdist" / "MODEL_CARD.md"
    card = path.read_text()
    ev = _eval(runs / "ccdist")
    for key in ("clean_accuracy", "pgd_accuracy", "ibp_verified_accuracy"):
        assert f"{100 * ev[key]:.1f}%" in card
    model = certkd.load_model(runs / "ccdist")
    assert f"{sum(p.numel() for p in model.parameters()):,}" in card
    assert "cnn-small" in card and "1×8×8" in card and "classes: 10" in card and "ε = 0.05" in card
    assert f"teacher: `{runs / 'teacher'}`: pgd-at" in card
    assert "PGD-40" in card and "cc-dist" in card
    assert "--method cc-dist" in card and f"--out {runs / 'ccdist'}" in card and "certkd evaluate" in card
    other = reporting.write_card(runs / "ccibp-s0", tmp_path / "card.md")
    assert other == tmp_path / "card.md" and "teacher" not in other.read_text().split("## Metrics")[0].split("## Training")[1]


def test_card_describes_complete_verification(runs, tmp_path):
    from dataclasses import asdict

    from certkd.verification.pipeline import VerifyConfig

    run = tmp_path / "verified"
    shutil.copytree(runs / "ccibp-s0", run)
    settings = asdict(VerifyConfig(eps=0.05, timeout=7.0, engine="milp"))
    counts = {"misclassified": 20, "attacked": 4, "attacked@milp": 3, "verified-ibp": 4, "verified-crown": 4,
              "verified-alpha-crown": 2, "verified-milp": 2, "timeout": 1}
    (run / "verification.json").write_text(json.dumps({
        "n": 40, "n_requested": 40, "complete": True, "eps": 0.05, "clean_accuracy": 0.5, "pgd_accuracy": 0.4,
        "ibp_verified_accuracy": 0.1, "crown_verified_accuracy": 0.2, "alpha_crown_verified_accuracy": 0.25,
        "verified_accuracy": 0.3, "counts": {"misclassified": 20, "attacked": 7, "verified-ibp": 4, "verified-crown": 4,
                                             "verified-alpha-crown": 2, "verified-milp": 2, "timeout": 1},
        "median_time_s": 0.5, "settings": settings}))
    _write_rows(run, counts)
    card = reporting.model_card(run)
    assert "| verified accuracy" in card and "30.0%" in card and "25.0%" in card
    assert "complete verifier `milp`, timeout 7.0 s per point" in card and "timeout 1" in card
    assert f"certkd verify {run} --timeout 7 --engine milp --limit 40" in card
    assert "disagrees" not in card  # the summary follows from its rows
    md = reporting.write_report([run], tmp_path / "rep")
    assert "verify" in (tmp_path / "rep" / "report.md").read_text() and md["groups"] == ["cc-ibp"]


def test_release_folder_loads_with_same_logits(runs, tmp_path):
    rel = reporting.make_release(runs / "ccdist", tmp_path / "release")
    names = {p.name for p in rel.iterdir()}
    assert {"model.safetensors", "meta.json", "MODEL_CARD.md", "evaluation.json", "config.yaml",
            "SHA256SUMS"} <= names
    assert "optimizer" not in json.loads((rel / "meta.json").read_text())
    original, released = certkd.load_model(runs / "ccdist"), certkd.load_model(rel)
    x = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(original(x), released(x))
    assert f"certkd.load_model({str(rel)!r})" in (rel / "MODEL_CARD.md").read_text()
    # a second release into the same folder replaces it
    reporting.make_release(runs / "ccibp-s0", rel)
    with torch.no_grad():
        assert torch.equal(certkd.load_model(rel)(x), certkd.load_model(runs / "ccibp-s0")(x))


@pytest.mark.skipif("report" not in cli.commands, reason="certkd report not registered in cli.py yet")
def test_cli_report_and_card(runs, tmp_path, capsys):
    main(["report", str(runs / "teacher"), str(runs / "ccdist"), "--out", str(tmp_path / "rep")])
    assert (tmp_path / "rep" / "report.md").exists()
    main(["card", str(runs / "ccdist"), "--out", str(tmp_path / "card.md"), "--release", str(tmp_path / "rel")])
    assert (tmp_path / "card.md").exists() and (tmp_path / "rel" / "model.safetensors").exists()
    capsys.readouterr()
    for argv in (["report", "--out", str(tmp_path / "r")], ["report", str(tmp_path / "nope")],
                 ["card", str(tmp_path)]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and len(err.splitlines()) == 1, err


# ------------------------------------------------------------------------------------------------
# Issue 14: numbers a reader can trust (n, same points, unfinished/collapsed marks), plots, commands
# ------------------------------------------------------------------------------------------------

def _record(tmp_path, name, ev=None, ver=None, epoch=2, **overrides):
    cfg = certkd.resolve_config("digits-small", dict({"epochs": 2}, **overrides))
    return reporting.RunRecord(path=tmp_path / name, name=name, config=cfg, evaluation=ev, verification=ver,
                               checkpoint=tmp_path / name / "checkpoints" / f"epoch-{epoch:04d}",
                               meta={"epoch": epoch})


def _result(n, indices, **values):
    return dict(values, n=n, eps=0.05, certifies={"indices_sha256": indices, "n": n})


def test_results_table_shows_n_and_says_when_ibp_and_verified_are_on_other_points(tmp_path):
    same = _record(tmp_path, "same", _result(20, "aaa", clean_accuracy=0.9, pgd_accuracy=0.8,
                                             ibp_verified_accuracy=0.5),
                   _result(20, "aaa", verified_accuracy=0.6, crown_verified_accuracy=0.55), seed=1)
    other = _record(tmp_path, "other", _result(300, "bbb", clean_accuracy=0.9, pgd_accuracy=0.8,
                                               ibp_verified_accuracy=0.5),
                    _result(20, "ccc", verified_accuracy=0.7, crown_verified_accuracy=0.6), method="ibp")
    table = reporting.results_table(reporting.group_runs([same, other]))
    lines = table.splitlines()
    header = [c.strip() for c in lines[0].split("|")[1:-1]]
    assert header == ["configuration", "ε", "seeds", "clean", "PGD", "IBP", "n", "CROWN", "verified", "n verified",
                      "notes"]
    rows = {cells[0]: dict(zip(header, cells)) for cells in
            ([c.strip() for c in line.split("|")[1:-1]] for line in lines[2:])}
    assert rows["cc-ibp"]["n"] == "20" and rows["cc-ibp"]["n verified"] == "20" and rows["cc-ibp"]["notes"] == "–"
    assert rows["ibp"]["n"] == "300" and rows["ibp"]["n verified"] == "20"
    assert "IBP (n=300) and verified (n=20) on different points" in rows["ibp"]["notes"]
    csv_rows = {r["group"]: r for r in csv.DictReader(io.StringIO(reporting.results_csv(
        reporting.group_runs([same, other]))))}
    assert csv_rows["ibp"]["ibp_verified_accuracy_points"] == "300"
    assert csv_rows["ibp"]["verified_accuracy_points"] == "20" and "different points" in csv_rows["ibp"]["notes"]


def test_tables_mark_unfinished_and_collapsed_runs(tmp_path):
    collapsed = _result(30, "a", clean_accuracy=0.1, pgd_accuracy=0.1, ibp_verified_accuracy=0.0,
                        predictions={"collapsed": True, "top_class": 3, "top_share": 1.0})
    runs = [_record(tmp_path, "s0", _result(30, "a", clean_accuracy=0.9, pgd_accuracy=0.8, ibp_verified_accuracy=0.5),
                    epoch=1, seed=0),
            _record(tmp_path, "s1", collapsed, seed=1)]
    groups = reporting.group_runs(runs)
    table = reporting.results_table(groups)
    assert "unfinished (1/2 runs)" in table and "collapsed (1/2 runs)" in table
    measured = reporting.measured_table(runs)
    assert "unfinished (epoch 1/2)" in measured and "collapsed" in measured
    terminal = reporting.accuracy_table({"a": dict(collapsed, training={"finished": False, "epoch": 1, "epochs": 2})})
    assert "| n " in terminal and "unfinished (epoch 1/2); collapsed" in terminal and "| 30 " in terminal


def test_curves_plot_loss_components_distillation_term_and_integer_epochs(tmp_path, monkeypatch):
    rec = _record(tmp_path, "dist", method="cc-dist", teacher="t", beta=0.1)
    rec.metrics = [{"epoch": e, "lr": 1e-3, "train": {"loss": 3.0 - e / 10, "ce_clean": 2.0, "robust_loss": 2.1,
                                                      "reg": 0.01, "dist": 9.0 - e, "eps": 0.01 * e,
                                                      "acc_clean": 0.5}}
                   for e in range(1, 8)]
    rec.metrics[-1]["test"] = {"clean_accuracy": 0.5, "pgd_accuracy": 0.4, "ibp_verified_accuracy": 0.2, "n": 30}
    figs = []
    monkeypatch.setattr(reporting.plots, "_save_png", lambda fig, path: figs.append(fig))
    monkeypatch.setattr(reporting._pyplot(), "close", lambda fig: None)
    reporting.plot_curves(rec, tmp_path / "c.png")
    (fig,) = figs
    axes = {ax.get_title(): ax for ax in fig.axes}
    comp = axes["loss components (unweighted)"]
    assert {l.get_label() for l in comp.lines} >= {"clean cross-entropy", "certified / expressive loss",
                                                   "warm-up regulariser (before λ)"}
    (dist_title,) = [t for t in axes if t.startswith("distillation term D")]
    assert list(axes[dist_title].lines[0].get_ydata()) == [9.0 - e for e in range(1, 8)]
    for ax in fig.axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), (ax.get_title(), ticks)


def test_commands_use_relative_data_dirs_and_certkd_teacher(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    data = tmp_path / "mydata" / "mnist"
    cfg = certkd.resolve_config("mnist-0.1-cpu", {"data_dir": str(data)})
    line = reporting.train_command(cfg, "runs/m", "mnist-0.1-cpu")
    assert "--data-dir ../mydata/mnist" in line and str(tmp_path) not in line
    teacher = certkd.resolve_config("digits-small", {"epochs": 3}, teacher=True)
    line = reporting.train_command(teacher, "runs/t")
    assert line.startswith("certkd teacher --preset digits-small") and "--epochs 3" in line
    assert "--set" not in line  # the rescaled schedule needs no --set: --epochs implies it
    ctx = cli.commands["teacher"].make_context("teacher", shlex.split(line)[2:])
    from certkd.run_plan import TrainRequest
    assert TrainRequest.from_params("teacher", ctx.params).config() == teacher


def test_card_states_lr_decay_and_an_unfinished_ramp(runs, tmp_path):
    card = reporting.model_card(runs / "ccibp-s0")  # 2 epochs of digits-small: milestones rescaled to [2, 2]
    assert "at epochs [" not in card and "no decay within the epochs" in card
    short = tmp_path / "short"
    certkd.train(certkd.resolve_config("digits-small", {"epochs": 1, "eps_length": 5, "eval_limit": 10}), short,
                 progress=False, log=_quiet)
    card = reporting.model_card(short)
    assert "**not finished**: ends at epoch 5, after the 1 epochs" in card


def test_a_sweep_command_is_used_only_while_it_still_resolves_to_the_runs(tmp_path):
    """A sweep made before --epochs rescaled the schedule: its command would now train other configs, so
    its runs get their own exact commands instead."""
    sweep = tmp_path / "S"
    (sweep / "epochs=2_seed=0").mkdir(parents=True)
    command = f"certkd sweep --preset digits-small --grid epochs=2 --seeds 0 --out {sweep}"
    (sweep / "sweep.json").write_text(json.dumps({"command": command, "runs": [{"name": "epochs=2_seed=0"}]}))
    now = certkd.resolve_config("digits-small", {"epochs": 2, "seed": 0})
    rec = reporting.RunRecord(path=sweep / "epochs=2_seed=0", name="r", config=now)
    assert reporting._sweep_of(rec) == (sweep, command)
    old = certkd.config.apply_overrides(now, {"eps_start": 2, "eps_length": 15, "lr_milestones": [30, 36]})
    rec = reporting.RunRecord(path=sweep / "epochs=2_seed=0", name="r", config=old)
    assert reporting._sweep_of(rec) is None
    line = reporting.train_command(old, rec.path, "digits-small")
    assert "--set eps_length=15" in line and "--epochs 2" in line


def test_card_counts_float_proofs_and_reproduces_strict_rounding(runs, tmp_path):
    """A strict-rounding verification: the card says how many verified points have a float proof, the
    reproduce command carries --strict-rounding, and a hand-edited count is replaced by the rows'."""
    from dataclasses import asdict

    from certkd.reporting.commands import verify_command
    from certkd.reporting.records import load_run
    from certkd.verification.pipeline import VerifyConfig, summarize, summarize_rows

    run = tmp_path / "strict"
    shutil.copytree(runs / "ccibp-s0", run)
    rows = [{"index": i, "label": 0, "status": s, "time_s": 0.5, "margin": 0.1, "stage": "pgd"}
            for i, s in enumerate(["verified-ibp"] * 3 + ["unknown", "attacked"])]
    for r in rows[:4]:
        r.update(rounding_bound=1e-4, float_proof=r["status"] != "unknown")
    (run / "verification.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = VerifyConfig(eps=0.05, timeout=7.0, engine="none", strict_rounding=True)
    summary = summarize(rows, cfg, len(rows))
    assert summary["verified_float_proof"] == 3 and summary["counts"]["unknown"] == 1
    (run / "verification.json").write_text(json.dumps(dict(summary, settings=asdict(cfg))))
    card = reporting.model_card(run)
    assert "3 verified points with float proof (margins above twice the rounding bound of the network as run, " \
           "required)" in card and "unknown 1" in card and "disagrees" not in card
    assert verify_command(load_run(run)).endswith("--engine none --strict-rounding --limit 5")
    (run / "verification.json").write_text(json.dumps(dict(summary, settings=asdict(cfg), verified_float_proof=5)))
    rec = load_run(run)
    assert any("verified_float_proof 5 in the summary, 3 from its 5 rows" in w for w in rec.warnings), rec.warnings
    assert rec.verification["verified_float_proof"] == summarize_rows(rows)["verified_float_proof"] == 3
