"""Issue 19: a hand-edited verification.json (100% verified, weights hash intact) was shown as-is by
``certkd report`` and ``certkd card`` although verification.jsonl contradicted it. The summary is now
checked against its rows with the verifier's own ``summarize_rows``: on disagreement the numbers of
the rows are used, with a one-line warning; without readable rows the summary is not used.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from certkd import reporting
from certkd.checkpoints import save_checkpoint
from certkd.config import resolve_config
from certkd.models import create_model
from certkd.verification.pipeline import VerifyConfig, summarize_rows, verify_run


@pytest.fixture(scope="module")
def verified(tmp_path_factory) -> Path:
    """A run (an 8×8 MLP, untrained weights, ε = 0.001) verified by the real pipeline on 12 points."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    run = tmp_path_factory.mktemp("s") / "run"
    net = create_model("mlp", 1, 8, 10, hidden=[16])
    cfg = resolve_config("digits-small", {"method": "standard", "model": "mlp", "model_kwargs": {"hidden": [16]},
                                          "epochs": 1})
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    save_checkpoint(run, 1, net, {"model": net.spec.to_dict(), "config": cfg.to_dict(), "dataset": "digits"})
    verify_run(run, VerifyConfig(eps=0.001, engine="none", crown=False), limit=12, progress=False, device="cpu")
    return run


def _copy(run: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(run, tmp_path / "run"))


def _rows(run: Path):
    return [json.loads(l) for l in (run / "verification.jsonl").read_text().splitlines()]


def test_untouched_summary_is_used_without_warning(verified):
    rec = reporting.load_run(verified)
    stored = json.loads((verified / "verification.json").read_text())
    assert rec.verification == stored
    assert not [w for w in rec.warnings if "verification" in w]
    numbers = summarize_rows(_rows(verified))
    assert numbers["n"] == 12 and rec.value("verified_accuracy") == numbers["verified_accuracy"]


def test_hand_edited_summary_is_recomputed_from_the_rows(verified, tmp_path):
    run = _copy(verified, tmp_path)
    summary = json.loads((run / "verification.json").read_text())
    true = summarize_rows(_rows(run))
    assert true["verified_accuracy"] < 1
    summary.update(verified_accuracy=1.0, crown_verified_accuracy=1.0, ibp_verified_accuracy=1.0,
                   counts=dict(summary["counts"], **{"verified-ibp": 12, "misclassified": 0, "attacked": 0,
                                                     "timeout": 0}))
    (run / "verification.json").write_text(json.dumps(summary))  # the weights hash (certifies) is intact

    rec = reporting.load_run(run)
    warn = [w for w in rec.warnings if "disagrees" in w]
    assert warn == [f"verification.json disagrees with verification.jsonl (verified_accuracy 100.0% in the summary, "
                    f"{100 * true['verified_accuracy']:.1f}% from its 12 rows): the numbers from the rows are used; "
                    f"rerun `certkd verify {run} --force`"]
    for key in ("verified_accuracy", "ibp_verified_accuracy", "crown_verified_accuracy", "clean_accuracy"):
        assert rec.value(key) == true[key]
    assert rec.verification["counts"] == true["counts"]
    assert rec.verification["certifies"] == summary["certifies"]

    card = reporting.model_card(run)
    verified_row = [c.strip() for c in next(l for l in card.splitlines() if l.startswith("| verified accuracy"))
                    .split("|")]
    assert verified_row[2] == f"{100 * true['verified_accuracy']:.1f}%"
    assert "100.0%" not in card.split("## Caveats")[0]
    assert "verification.json disagrees with verification.jsonl" in card.split("## Caveats")[1]

    s = reporting.write_report([run], tmp_path / "rep")
    assert any("disagrees" in w for w in s["warnings"])
    rows = (tmp_path / "rep" / "results.csv").read_text().splitlines()
    header = rows[0].split(",")
    values = dict(zip(header, rows[1].split(",")))
    assert float(values["verified_accuracy_mean"]) == pytest.approx(true["verified_accuracy"])

    rel = reporting.make_release(run, tmp_path / "release")  # the release carries the numbers it can back
    released = json.loads((rel / "verification.json").read_text())
    assert released["verified_accuracy"] == true["verified_accuracy"]
    assert (rel / "verification.jsonl").read_bytes() == (run / "verification.jsonl").read_bytes()


def test_summary_that_claims_more_points_than_its_rows_is_incomplete(verified, tmp_path):
    run = _copy(verified, tmp_path)
    lines = (run / "verification.jsonl").read_text().splitlines()
    (run / "verification.jsonl").write_text("\n".join(lines[:5]) + "\n")  # 5 of the 12 rows left
    rec = reporting.load_run(run)
    assert rec.verification is None
    assert any("disagrees" in w and "(n 12 in the summary, 5 from its 5 rows)" in w for w in rec.warnings)
    assert any(w.startswith("verification incomplete (5/12 points)") for w in rec.warnings)


@pytest.mark.parametrize("rows, problem", [
    (None, "verification.json has no verification.jsonl beside it"),
    ('{"index": 0, "status": "verified-magic", "time_s": 0.1}\n', "row 1 has no known status and time"),
    ('{"index": 0, "status": "verified-ibp", "time_s": 0.1}\n' * 2, "row 2 repeats test point 0"),
])
def test_summary_without_readable_rows_is_not_used(verified, tmp_path, rows, problem):
    run = _copy(verified, tmp_path)
    if rows is None:
        (run / "verification.jsonl").unlink()
    else:
        (run / "verification.jsonl").write_text(rows)
    rec = reporting.load_run(run)
    assert rec.verification is None and rec.value("verified_accuracy") is None
    warn = [w for w in rec.warnings if problem in w]
    assert len(warn) == 1 and "\n" not in warn[0] and warn[0].endswith(f"rerun `certkd verify {run} --force`")
    assert "| verified accuracy" not in reporting.model_card(run)


def test_card_command_prints_the_disagreement(verified, tmp_path, capsys):
    """`certkd card` says on stderr what the card's caveats say, so a hand-edited summary is not missed."""
    from certkd.cli import main

    run = _copy(verified, tmp_path)
    summary = json.loads((run / "verification.json").read_text())
    summary.update(verified_accuracy=1.0)
    (run / "verification.json").write_text(json.dumps(summary))
    main(["card", str(run), "--out", str(tmp_path / "card.md")])
    err = capsys.readouterr().err
    assert "warning: verification.json disagrees with verification.jsonl" in err
