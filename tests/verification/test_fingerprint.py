"""Issue 10 §1 and §3: a stored result certifies one set of weights, points and settings.

``verify --resume`` must never reuse rows computed for other weights (the soundness bug of
issue 10), results record what they certify, and limits pick a class-stratified subset.
"""
import json
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from certkd import resolve_config, train
from certkd.cli import main
from certkd.data.subsets import describe_points, stratified_indices
from certkd.runs import check_same_subject, collapse, subject_mismatch, weights_sha256
from certkd.errors import CertkdError

QUIET = dict(progress=False, log=lambda s: None)


def _cfg(seed, epochs=2):
    return resolve_config("digits-small", {"method": "cc-ibp", "epochs": epochs, "eps_start": 1, "eps_length": 1,
                                           "seed": seed, "eval_limit": 10})


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Q and B: the same architecture, other weights (other seeds)."""
    root = tmp_path_factory.mktemp("fp")
    q = train(_cfg(0), root / "Q", **QUIET)
    b = train(_cfg(1), root / "B", **QUIET)
    return q, b


def _error_lines(capsys):
    err = capsys.readouterr().err
    return [line for line in err.splitlines() if line.startswith("error:")], err


def test_stratified_indices_are_balanced_fixed_and_nested():
    labels = torch.arange(10).repeat_interleave(20)  # sorted by class, as ImageFolder test sets are
    idx = stratified_indices(labels, 30)
    assert idx.tolist() == sorted(idx.tolist()) and len(set(idx.tolist())) == 30
    assert torch.bincount(labels[idx], minlength=10).tolist() == [3] * 10  # the first 30 would be 2 classes
    assert torch.equal(idx, stratified_indices(labels, 30))  # fixed seed
    assert stratified_indices(labels, None).tolist() == list(range(200))
    assert stratified_indices(labels, 500).tolist() == list(range(200))
    # uneven classes: shares by size, remainder to the largest fractional parts
    uneven = torch.tensor([0] * 6 + [1] * 3 + [2] * 1)
    counts = torch.bincount(uneven[stratified_indices(uneven, 5)], minlength=3).tolist()
    assert counts == [3, 2, 0]  # exact shares 3, 1.5, 0.5: the tie goes to the smaller class index
    desc = describe_points(labels, idx)
    assert desc["n"] == 30 and desc["of"] == 200 and "class-stratified" in desc["points"]
    assert describe_points(labels, stratified_indices(labels, None))["points"] == "all 200 test points"


def test_resume_refuses_rows_of_other_weights(two_runs, tmp_path, capsys):
    """The issue's reproduction: rows of Q must not be reused as certificates of B."""
    q, b = two_runs
    out = tmp_path / "VX"
    main(["verify", str(q), "--limit", "10", "--timeout", "1", "--engine", "none", "--out", str(out), "--quiet"])
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["verify", str(b), "--limit", "10", "--timeout", "1", "--engine", "none", "--out", str(out), "--resume",
              "--quiet"])
    assert exc.value.code == 2
    errors, err = _error_lines(capsys)
    assert len(errors) == 1 and "other weights" in errors[0] and "--force" in errors[0] and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing touched
    # --force starts over, and the result then certifies B's weights
    main(["verify", str(b), "--limit", "10", "--timeout", "1", "--engine", "none", "--out", str(out), "--force",
          "--quiet"])
    summary = json.loads((out / "verification.json").read_text())
    fresh = tmp_path / "fresh"
    main(["verify", str(b), "--limit", "10", "--timeout", "1", "--engine", "none", "--out", str(fresh), "--quiet"])
    strip = lambda p: [{k: v for k, v in json.loads(l).items() if k != "time_s"} for l in p.read_text().splitlines()]  # noqa: E731,E741
    assert strip(out / "verification.jsonl") == strip(fresh / "verification.jsonl")
    assert summary["certifies"]["weights_sha256"] == json.loads((fresh / "verification.json").read_text())[
        "certifies"]["weights_sha256"]


def test_a_rerun_without_resume_or_force_keeps_finished_work(two_runs, tmp_path, capsys):
    q, _ = two_runs
    out = tmp_path / "V"
    main(["verify", str(q), "--limit", "5", "--engine", "none", "--out", str(out), "--quiet"])
    before = (out / "verification.jsonl").read_bytes()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["verify", str(q), "--limit", "5", "--engine", "none", "--out", str(out), "--quiet"])
    errors, _ = _error_lines(capsys)
    assert exc.value.code == 2 and len(errors) == 1 and "already holds a verification" in errors[0]
    assert (out / "verification.jsonl").read_bytes() == before


def test_verify_resume_after_train_resume_is_refused(tmp_path, capsys):
    """The realistic path: verify a run, train it further, then verify --resume."""
    run = train(_cfg(0, epochs=1), tmp_path / "R", **QUIET)
    main(["verify", str(run), "--limit", "6", "--engine", "none", "--quiet"])
    done = json.loads((run / "verification.json").read_text())
    assert done["complete"] and done["certifies"]["checkpoint_epoch"] == 1
    cfg_path = run / "config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["epochs"] = 2
    cfg_path.write_text(yaml.safe_dump(cfg))
    train(_cfg(0, epochs=2), run, resume=True, **QUIET)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["verify", str(run), "--limit", "6", "--engine", "none", "--resume", "--quiet"])
    errors, _ = _error_lines(capsys)
    assert exc.value.code == 2 and len(errors) == 1 and "other weights" in errors[0]
    assert json.loads((run / "verification.json").read_text()) == done


def test_resume_refuses_other_eps_points_and_legacy_files(two_runs, tmp_path, capsys):
    q, _ = two_runs
    out = tmp_path / "V"
    main(["verify", str(q), "--limit", "5", "--engine", "none", "--out", str(out), "--quiet"])
    summary = json.loads((out / "verification.json").read_text())
    new = dict(summary["certifies"], eps=0.5)
    assert "another eps" in subject_mismatch(summary["certifies"], new)
    assert "other test points" in subject_mismatch(summary["certifies"], dict(summary["certifies"],
                                                                             indices_sha256="0" * 64))
    legacy = {k: v for k, v in summary.items() if k != "certifies"}
    with pytest.raises(CertkdError, match="does not record which weights"):
        check_same_subject(legacy, summary["certifies"], "x")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["verify", str(q), "--limit", "6", "--engine", "none", "--out", str(out), "--resume", "--quiet"])
    errors, _ = _error_lines(capsys)
    assert exc.value.code == 2 and len(errors) == 1 and "other test points" in errors[0]


def test_evaluation_records_what_it_measured_and_refuses_nan_weights(two_runs, tmp_path, capsys):
    q, _ = two_runs
    run = tmp_path / "Q"
    shutil.copytree(q, run)
    main(["evaluate", str(run), "--limit", "20"])
    ev = json.loads((run / "evaluation.json").read_text())
    ck = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    tensors = load_file(str(ck / "model.safetensors"))
    assert ev["certifies"]["weights_sha256"] == weights_sha256(tensors)
    assert ev["n"] == 20 and "class-stratified" in ev["points"] and ev["training"]["finished"] is True
    # NaN weights: refused, and the old evaluation.json stays
    name = next(k for k, v in tensors.items() if v.is_floating_point())
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, str(ck / "model.safetensors"))
    before = (run / "evaluation.json").read_bytes()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", str(run)])
    errors, _ = _error_lines(capsys)
    assert exc.value.code == 2 and len(errors) == 1 and "NaN/Inf" in errors[0]
    assert (run / "evaluation.json").read_bytes() == before


def test_unfinished_and_collapsed_runs_are_flagged(tmp_path, capsys):
    cfg = resolve_config("digits-small", {"method": "standard", "epochs": 3, "lr": 1e-9, "eval_limit": 10})
    run = train(cfg, tmp_path / "U", **QUIET)
    # pretend the run stopped after epoch 1 of 3 and collapsed: a huge bias on one class
    ck = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    meta = json.loads((ck / "meta.json").read_text())
    meta["epoch"] = 1
    (ck / "meta.json").write_text(json.dumps(meta))
    tensors = load_file(str(ck / "model.safetensors"))
    bias = [k for k in tensors if k.endswith("bias")][-1]
    tensors[bias] = torch.zeros_like(tensors[bias])
    tensors[bias][3] = 1e4
    save_file(tensors, str(ck / "model.safetensors"))
    capsys.readouterr()
    main(["evaluate", str(run), "--limit", "40"])
    ev = json.loads((run / "evaluation.json").read_text())
    assert ev["training"] == {"epoch": 1, "epochs": 3, "finished": False, "final_training_eps": None}  # standard: no ε
    assert ev["predictions"]["collapsed"] and ev["predictions"]["top_class"] == 3
    err = capsys.readouterr().err
    assert "warning:" in err and "unfinished run" in err and "collapsed model" in err
    main(["verify", str(run), "--limit", "40", "--engine", "none", "--quiet"])
    ver = json.loads((run / "verification.json").read_text())
    assert ver["predictions"]["collapsed"] and ver["training"]["finished"] is False
    assert "collapsed model" in capsys.readouterr().err


def test_collapse_thresholds():
    assert collapse(torch.tensor([3] * 18 + [1]), 10)["collapsed"] is False  # too few points to say
    assert collapse(torch.tensor([3] * 18 + [1, 2]), 10)["collapsed"] is True
    assert collapse(torch.tensor([3] * 17 + [1, 2, 4]), 10)["collapsed"] is False
    assert collapse(torch.tensor([1] * 40), 2)["collapsed"] is False  # two classes: not called collapsed


def test_report_and_card_never_mix_checkpoints(tmp_path):
    from certkd.reporting import load_run, model_card, write_report

    run = train(_cfg(0, epochs=1), tmp_path / "R", **QUIET)
    main(["evaluate", str(run), "--limit", "30"])
    main(["verify", str(run), "--limit", "30", "--engine", "none", "--quiet"])
    rec = load_run(run)
    assert rec.evaluation is not None and rec.verification is not None
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["epochs"] = 2
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    train(_cfg(0, epochs=2), run, resume=True, **QUIET)
    main(["evaluate", str(run), "--limit", "30"])  # evaluation of epoch 2; verification still of epoch 1
    rec = load_run(run)
    assert rec.evaluation is not None and rec.evaluation["certifies"]["checkpoint_epoch"] == 2
    assert rec.verification is None and rec.value("verified_accuracy") is None
    assert any("verification.json was measured on other weights (epoch 1" in w for w in rec.warnings)
    card = model_card(run)
    metrics = card.split("## Metrics")[1].split("##")[0]
    assert "epoch 2 weights (sha256" in card and "| verified accuracy" not in metrics and "CROWN" not in metrics
    report = write_report([run], tmp_path / "report")
    text = (tmp_path / "report" / "report.md").read_text()
    assert "What each run's numbers were measured on" in text and "30 of 360 test points" in text
    assert any("other weights" in w for w in report["warnings"])
