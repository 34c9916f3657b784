"""Issue 4: the verification pipeline, branch-and-bound vs MILP, resume and workers."""
import json

import pytest
import torch

from certkd import load_model, resolve_config, train
from certkd.attacks import PGD, linf_box, margin_loss
from certkd.cli import main
from certkd.data import load_dataset
from certkd.data.subsets import stratified_indices
from certkd.errors import CertkdError
from certkd.verification.bab import bab_verify
from certkd.verification.milp import milp_verify
from certkd.verification.pipeline import STATUSES, VerifyConfig, verify_run, verify_sample

QUIET = dict(progress=False, log=lambda s: None)


@pytest.fixture(scope="module")
def small_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    torch.manual_seed(0)
    mlp = train(resolve_config("digits-small", {"method": "standard", "model": "mlp", "epochs": 5, "eval_limit": 10,
                                                "model_kwargs": {"hidden": [32, 32]}}), root / "mlp", **QUIET)
    cnn = train(resolve_config("digits-small", {"method": "cc-ibp", "epochs": 6, "eps_length": 3, "eval_limit": 10}),
                root / "cnn", **QUIET)
    return {"mlp": mlp, "cnn": cnn}


def _strong_attack(model, x, y, lo, hi):
    attack = PGD(50, 0.1, restarts=5, stop_on_success=True)
    x_adv = attack(model, x, torch.tensor([y]), lo, hi, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return float(-margin_loss(model(x_adv), torch.tensor([y]))[0])


def _hard_radii(model, x, y):
    """Two radii between the largest CROWN-certified one and the smallest PGD-attacked one.

    Properties there are decided neither by CROWN at the root nor by a plain attack, so BaB
    has to branch (and the MILP to search) on them.
    """
    from certkd.bounds.crown import crown_bounds

    def certified(eps):
        lo, hi = linf_box(x, eps)
        return float(crown_bounds(model, lo, hi, torch.tensor([y])).min()) > 0

    def attacked(eps):
        lo, hi = linf_box(x, eps)
        return _strong_attack(model, x, y, lo, hi) <= 0

    if not certified(1e-4):
        return []
    a, b = 1e-4, 0.5
    for _ in range(12):  # a: certified, b: not certified
        m = (a + b) / 2
        a, b = (m, b) if certified(m) else (a, m)
    top = b
    while top < 0.5 and not attacked(top):
        top *= 1.5
    if not attacked(top):
        return []
    return [a + f * (top - a) for f in (0.15, 0.5)]


@pytest.mark.slow
def test_bab_and_milp_agree_and_never_verify_attackable_points(small_runs):
    """24 hard properties over an MLP and cnn-small: BaB and MILP agree wherever both decide.

    Radii sit between the CROWN-certified and the PGD-attacked radius of each point, so the
    root bound fails and both engines have to search; the test asserts that BaB branched.
    Both engines stop at a wall-clock timeout, so on a loaded machine a few properties stay
    undecided: at least 20 of the 24 must be decided by both (29 of 32 was seen at load 4).
    """
    _, test, _ = load_dataset("digits")
    decided, branched, outcomes, props_total = 0, 0, set(), 0
    for name, run in small_runs.items():
        model = load_model(run)
        i = 0
        props = 0
        while props < 12 and i < 60:
            x, y = test.get(torch.tensor([i]))
            y = int(y)
            i += 1
            with torch.no_grad():
                if int(model(x).argmax(1)) != y:
                    continue
            for eps in _hard_radii(model, x, y):
                props += 1
                props_total += 1
                lo, hi = linf_box(x, eps)
                b = bab_verify(model, x[0], y, lo[0], hi[0], timeout=60)
                m = milp_verify(model, x[0], y, lower=lo[0], upper=hi[0], timeout=60)
                branched += int(b.status == "verified" and b.domains > 2)  # root plus its children
                if b.status != "timeout" and m.status != "timeout":
                    assert b.status == m.status, (name, i, eps, b, m)
                    decided += 1
                    outcomes.add(b.status)
                if "verified" in (b.status, m.status):
                    assert _strong_attack(model, x, y, lo, hi) > 0, (name, i, eps)
                for r in (b, m):
                    if r.status == "falsified":
                        cx = r.counterexample.unsqueeze(0)
                        assert bool(((cx >= lo - 1e-7) & (cx <= hi + 1e-7)).all())
                        with torch.no_grad():
                            assert float(-margin_loss(model(cx), torch.tensor([y]))[0]) <= 0
    assert props_total == 24 and decided >= 20, (props_total, decided)
    assert branched >= 4, branched
    assert outcomes == {"verified", "falsified"}, outcomes


def test_pipeline_statuses_are_consistent(small_runs):
    model = load_model(small_runs["cnn"])
    _, test, _ = load_dataset("digits")
    cfg = VerifyConfig(eps=0.05, timeout=10, engine="bab")
    for i in range(6):
        x, y = test.get(torch.tensor([i]))
        row = verify_sample(model, x, int(y), cfg, index=i)
        assert row["status"] in STATUSES
        assert row["index"] == i and row["label"] == int(y) and row["time_s"] >= 0
        if row["status"].startswith("verified"):
            assert row["margin"] > 0
            lo, hi = linf_box(x, 0.05)
            assert _strong_attack(model, x, int(y), lo, hi) > 0
        if row["status"] in ("attacked", "misclassified"):
            assert row["margin"] <= 0


def _strip_times(summary):
    s = dict(summary)
    s.pop("median_time_s", None)
    return s


def _rows(path):
    rows = [json.loads(l) for l in (path / "verification.jsonl").read_text().splitlines()]
    for r in rows:
        r.pop("time_s")
    return rows


def test_verify_cli_writes_json_and_jsonl(small_runs, tmp_path, capsys):
    out = tmp_path / "v"
    main(["verify", str(small_runs["cnn"]), "--eps", "0.05", "--timeout", "10", "--limit", "12", "--out", str(out),
          "--quiet"])
    text = capsys.readouterr().out
    assert "verified (bab)" in text and "CROWN" in text
    summary = json.loads((out / "verification.json").read_text())
    rows = _rows(out)
    _, test_set, _ = load_dataset("digits")
    chosen = stratified_indices(test_set.labels, 12).tolist()
    assert summary["n"] == 12 and len(rows) == 12 and [r["index"] for r in rows] == chosen
    assert sum(summary["counts"].values()) == 12
    assert summary["ibp_verified_accuracy"] <= summary["crown_verified_accuracy"] <= summary["alpha_crown_verified_accuracy"]
    assert summary["alpha_crown_verified_accuracy"] <= summary["verified_accuracy"]
    assert summary["verified_accuracy"] <= summary["empirical_robust_accuracy"] <= summary["pgd_accuracy"]
    assert summary["pgd_accuracy"] <= summary["clean_accuracy"]
    # PGD accuracy counts PGD's counterexamples only; the verifier's own lower the upper bound
    pgd_rows = sum(r["status"] == "attacked" and r["stage"] == "pgd" for r in rows)
    wrong = summary["counts"]["misclassified"]
    assert summary["pgd_accuracy"] == pytest.approx((12 - wrong - pgd_rows) / 12)
    assert summary["falsified_by_verifier"] == summary["counts"]["attacked"] - pgd_rows
    assert "not falsified (upper bound)" in text


def test_resume_after_interruption_gives_same_result(small_runs, tmp_path, monkeypatch):
    cfg = VerifyConfig(eps=0.05, timeout=10)
    full = verify_run(small_runs["cnn"], cfg, limit=10, out_dir=tmp_path / "full", progress=False)

    import certkd.verification.pipeline as pl

    real = pl.verify_sample
    calls = {"n": 0}

    def dies_after_4(*a, **k):
        calls["n"] += 1
        if calls["n"] > 4:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(pl, "verify_sample", dies_after_4)
    with pytest.raises(KeyboardInterrupt):
        verify_run(small_runs["cnn"], cfg, limit=10, out_dir=tmp_path / "cut", progress=False)
    # a torn last line, as a crash mid-write leaves it
    part = tmp_path / "cut" / "verification.part0.jsonl"
    part.write_text(part.read_text() + '{"index": 4, "lab')
    monkeypatch.setattr(pl, "verify_sample", real)
    resumed = verify_run(small_runs["cnn"], cfg, limit=10, out_dir=tmp_path / "cut", resume=True, progress=False)
    assert _strip_times(resumed) == _strip_times(full)
    assert _rows(tmp_path / "cut") == _rows(tmp_path / "full")


@pytest.mark.slow
def test_two_workers_match_one(small_runs, tmp_path):
    cfg = VerifyConfig(eps=0.05, timeout=10)
    one = verify_run(small_runs["cnn"], cfg, limit=8, out_dir=tmp_path / "one", progress=False)
    two = verify_run(small_runs["cnn"], cfg, limit=8, out_dir=tmp_path / "two", workers=2, progress=False)
    assert _strip_times(one) == _strip_times(two)
    assert _rows(tmp_path / "one") == _rows(tmp_path / "two")


def test_bab_timeout_is_honoured(small_runs):
    import time

    model = load_model(small_runs["mlp"])
    _, test, _ = load_dataset("digits")
    x, y = test.get(torch.tensor([1]))
    lo, hi = linf_box(x, 0.3)
    start = time.perf_counter()
    res = bab_verify(model, x[0], int(y), lo[0], hi[0], timeout=1.0)
    assert time.perf_counter() - start <= 1.1 * 1.0 + 1.0
    assert res.status in ("timeout", "falsified", "verified")


@pytest.mark.parametrize("argv,expected", [
    (["--workers", "0"], "--workers must be >= 1"),
    (["--timeout", "0"], "timeout must be > 0"),
    (["--eps", "2"], "eps must be in (0, 1]"),
    (["--engine", "magic"], "unknown engine 'magic'"),
])
def test_verify_bad_input(small_runs, tmp_path, capsys, argv, expected):
    with pytest.raises(SystemExit) as exc:
        main(["verify", str(small_runs["cnn"]), "--out", str(tmp_path / "o"), "--quiet"] + argv)
    assert exc.value.code == 2
    assert expected in capsys.readouterr().err


def test_verify_float64_gives_the_same_statuses(small_runs, tmp_path, monkeypatch):
    """`certkd verify --dtype float64` runs attack and bounds in float64 and decides every point
    as the float32 run does (the margins differ by rounding only)."""
    import certkd.verification.pipeline as pl

    dtypes = set()
    real = pl.ibp_logit_difference_bounds

    def spy(model, lower, *args, **kwargs):
        dtypes.add((lower.dtype, next(model.parameters()).dtype))
        return real(model, lower, *args, **kwargs)

    monkeypatch.setattr(pl, "ibp_logit_difference_bounds", spy)
    verify_run(small_runs["cnn"], VerifyConfig(eps=0.05, engine="none"), limit=40, out_dir=tmp_path / "f32",
               progress=False)
    assert dtypes == {(torch.float32, torch.float32)}
    dtypes.clear()
    main(["verify", str(small_runs["cnn"]), "--eps", "0.05", "--engine", "none", "--limit", "40", "--dtype", "float64",
          "--out", str(tmp_path / "f64"), "--quiet"])
    assert dtypes == {(torch.float64, torch.float64)}
    r32, r64 = _rows(tmp_path / "f32"), _rows(tmp_path / "f64")
    assert [r["status"] for r in r32] == [r["status"] for r in r64]
    assert len({r["status"] for r in r32}) >= 2, r32  # a mix of outcomes, not a trivial agreement
    for a, b in zip(r32, r64):
        assert b["margin"] == pytest.approx(a["margin"], rel=1e-3, abs=1e-4), (a, b)
    assert json.loads((tmp_path / "f64" / "verification.json").read_text())["settings"]["dtype"] == "float64"
    with pytest.raises(CertkdError, match="unknown dtype"):
        VerifyConfig(eps=0.05, dtype="float16").validate()


def test_verified_points_of_a_trained_model_have_float_proofs(small_runs):
    """The margins of a certified-trained model clear twice the float32 rounding bound by far."""
    import math

    model = load_model(small_runs["cnn"])
    _, test, _ = load_dataset("digits")
    rows = [verify_sample(model, *_point(test, i), VerifyConfig(eps=0.05, engine="none"), index=i) for i in range(8)]
    verified = [r for r in rows if r["status"].startswith("verified")]
    assert verified, rows
    for r in verified:
        assert 0 < r["rounding_bound"] < math.inf and r["float_proof"] is True
        assert r["margin"] > 2 * r["rounding_bound"]
    assert all("float_proof" not in r for r in rows if not r["status"].startswith("verified"))


def _point(test, i):
    x, y = test.get(torch.tensor([i]))
    return x, int(y)


def test_verify_run_strict_rounding_cli_and_resume(small_runs, tmp_path, capsys):
    """`certkd verify RUN --strict-rounding` (exit 0) records the fields and the setting; a resume with the
    other setting is refused instead of mixing rows certified under both."""
    out = tmp_path / "strict"
    args = ["verify", str(small_runs["cnn"]), "--eps", "0.05", "--engine", "none", "--limit", "10", "--out", str(out),
            "--quiet"]
    main(args + ["--strict-rounding"])
    text = capsys.readouterr().out
    summary = json.loads((out / "verification.json").read_text())
    rows = _rows(out)
    verified = [r for r in rows if r["status"].startswith("verified")]
    assert verified and all(r["float_proof"] is True and r["rounding_bound"] > 0 for r in verified)
    assert summary["settings"]["strict_rounding"] is True and summary["certifies"]["settings"]["strict_rounding"]
    assert summary["verified_float_proof"] == len(verified)
    assert f"float proofs: {len(verified)} of the {len(verified)} verified points" in text
    before = (out / "verification.jsonl").read_text()
    with pytest.raises(SystemExit) as exc:
        main(args + ["--resume"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "was computed for" in err and "strict_rounding" in err and "--force" in err
    assert (out / "verification.jsonl").read_text() == before
