"""Numerical faults in training: a NaN/Inf loss or gradient stops the run with a one-line error naming
the step and the term, and the last good checkpoint (and metrics.jsonl) are left untouched."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict

import pytest
import torch

import certkd.training.loop as loop
from certkd import resolve_config, train
from certkd.cli import main
from certkd.errors import CertkdError
from certkd.training import NonFiniteError

QUIET = dict(progress=False, log=lambda s: None)
STEPS = 23  # digits: 1437 training points / batch 64
FAULT_AT = STEPS + 3  # epoch 2, batch 3


def _cfg(**kw):
    return resolve_config("digits-small", dict({"method": "standard", "model": "mlp", "epochs": 3, "eval_limit": 10,
                                                "model_kwargs": {"hidden": [32, 32]}}, **kw))


class _NaNGrad(torch.autograd.Function):
    """Identity forward; NaN gradient backward (a finite loss whose gradient is not)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


def _faulty_loss(monkeypatch, kind: str):
    real = loop.training_loss
    calls = {"n": 0}

    def wrapped(model, *a, **k):
        loss, logs = real(model, *a, **k)
        calls["n"] += 1
        if calls["n"] == FAULT_AT:
            if kind == "loss":
                loss = loss * float("nan")
                logs = dict(logs, ce_clean=float("nan"))
            else:
                loss = loss + 0.0 * _NaNGrad.apply(model.head.weight).sum()
        return loss, logs

    monkeypatch.setattr(loop, "training_loss", wrapped)


def _snapshot_after_epoch_1(monkeypatch) -> Dict[str, bytes]:
    """Bytes of every checkpoint file right after epoch 1 is saved."""
    real = loop.save_checkpoint
    snap: Dict[str, bytes] = {}

    def wrapped(run_dir, epoch, *a, **k):
        path = real(run_dir, epoch, *a, **k)
        if epoch == 1:
            ckdir = Path(run_dir) / "checkpoints"
            snap.update({str(p.relative_to(ckdir)): p.read_bytes() for p in ckdir.rglob("*") if p.is_file()})
        return path

    monkeypatch.setattr(loop, "save_checkpoint", wrapped)
    return snap


def _files(run: Path) -> Dict[str, bytes]:
    ckdir = run / "checkpoints"
    return {str(p.relative_to(ckdir)): p.read_bytes() for p in ckdir.rglob("*") if p.is_file()}


@pytest.mark.parametrize("kind,grad_clip,expected", [
    ("loss", 10.0, "non-finite loss at epoch 2, batch 3 (step 26) in term ce_clean"),
    ("grad", 10.0, "non-finite gradient at epoch 2, batch 3 (step 26) in head.weight"),
    ("grad", 0.0, "non-finite gradient at epoch 2, batch 3 (step 26) in head.weight"),  # checked without clipping
])
def test_nonfinite_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, kind, grad_clip,
                                                                     expected):
    cfg = _cfg(grad_clip=grad_clip)
    snap = _snapshot_after_epoch_1(monkeypatch)
    _faulty_loss(monkeypatch, kind)
    run = tmp_path / "run"
    with pytest.raises(NonFiniteError) as exc:
        train(cfg, run, **QUIET)
    msg = str(exc.value)
    assert isinstance(exc.value, CertkdError) and "\n" not in msg
    assert expected in msg and "the last good checkpoint is kept" in msg and "--resume" in msg
    assert snap and _files(run) == snap  # epoch 1 untouched, nothing of epoch 2 written
    assert (run / "checkpoints" / "latest").read_text().strip() == "epoch-0001"
    assert [json.loads(l)["epoch"] for l in (run / "metrics.jsonl").read_text().splitlines()] == [1]
    for p in loop.load_model(run).state_dict().values():
        assert torch.isfinite(p).all()

    # the fault gone, --resume finishes the run exactly as if nothing had happened
    monkeypatch.undo()
    train(cfg, run, resume=True, **QUIET)
    ref = train(cfg, tmp_path / "ref", **QUIET)
    a, b = loop.load_model(run).state_dict(), loop.load_model(ref).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nonfinite_loss_through_the_cli_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    _faulty_loss(monkeypatch, "loss")
    with pytest.raises(SystemExit) as exc:
        main(["train", "--preset", "digits-small", "--method", "standard", "--model", "mlp", "--epochs", "3",
              "--set", "model_kwargs={hidden: [32, 32]}", "--set", "eval_limit=10", "--out", str(tmp_path / "run"),
              "--quiet"])
    captured = capsys.readouterr()
    assert exc.value.code == 2
    assert "Traceback" not in captured.out + captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "non-finite loss at epoch 2, batch 3" in lines[0], captured.err
    assert "epoch 1:" in captured.out  # the first epoch completed and was logged
