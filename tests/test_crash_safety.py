"""Crash safety: ``kill -9`` at a random moment, then ``--resume``, gives the uninterrupted result.

Real processes (``python -m certkd``), real SIGKILL: no cooperation from the code under test.
The kill moment is drawn from a fixed-seed RNG, so a failure can be replayed, and it lands
anywhere after the first checkpoint / first verified point (mid-batch, mid-evaluation, or while
a checkpoint or a JSONL line is being written).
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import pytest
import torch
from safetensors.torch import load_file

from certkd.data import load_dataset
from certkd.data.subsets import stratified_indices

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")]

ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")
EPOCHS = 16
TRAIN = ["train", "--preset", "digits-small", "--epochs", str(EPOCHS), "--seed", "3", "--set", "eps_length=8",
         "--set", "eval_limit=10", "--set", "test_interval=4", "--quiet"]
VERIFY = ["--eps", "0.1", "--engine", "none", "--limit", "100", "--quiet"]  # engine none: no wall-clock timeouts


def _certkd(args: List[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "certkd", *map(str, args)], env=ENV, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def _kill_at_random_moment(args: List[str], ready: Callable[[], bool], rng: random.Random, max_delay: float) -> float:
    """Start certkd, wait for ``ready()``, sleep U(0, max_delay), SIGKILL; returns the delay."""
    proc = subprocess.Popen([sys.executable, "-m", "certkd", *map(str, args)], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while not ready():
            assert proc.poll() is None, f"certkd ended before the kill window: {proc.stderr.read()[-2000:]!r}"
            assert time.monotonic() < deadline, "certkd never reached the kill window"
            time.sleep(0.01)
        delay = rng.uniform(0.0, max_delay)
        time.sleep(delay)
        assert proc.poll() is None, "certkd finished before the kill: lengthen the run or shorten max_delay"
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    return delay


def _tensors(path: Path) -> Dict[str, torch.Tensor]:
    return load_file(str(path))


def _assert_bit_identical(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def _records(run: Path) -> List[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _untimed(obj):
    """Drop wall-clock fields (time_s, median_time_s), recursively."""
    if isinstance(obj, dict):
        return {k: _untimed(v) for k, v in obj.items() if k not in ("time_s", "median_time_s")}
    if isinstance(obj, list):
        return [_untimed(v) for v in obj]
    return obj


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run (a subprocess too, so that both sides run with identical settings)."""
    out = tmp_path_factory.mktemp("crash") / "reference"
    _certkd(TRAIN + ["--out", out])
    return out


def test_training_killed_at_random_then_resumed_is_bit_identical(reference, tmp_path):
    run = tmp_path / "killed"
    latest = run / "checkpoints" / "latest"
    delay = _kill_at_random_moment(TRAIN + ["--out", run], latest.exists, random.Random(6), max_delay=2.0)
    epoch_at_kill = int(latest.read_text().strip().split("-")[1])
    assert epoch_at_kill < EPOCHS, f"killed {delay:.2f}s after the first checkpoint, but the run had finished"
    _certkd(["train", "--out", run, "--resume", "--quiet"])

    ck_ref = reference / "checkpoints" / f"epoch-{EPOCHS:04d}"
    ck = run / "checkpoints" / f"epoch-{EPOCHS:04d}"
    _assert_bit_identical(_tensors(ck_ref / "model.safetensors"), _tensors(ck / "model.safetensors"))
    _assert_bit_identical(_tensors(ck_ref / "optimizer.safetensors"), _tensors(ck / "optimizer.safetensors"))
    records = _records(run)
    assert [r["epoch"] for r in records] == list(range(1, EPOCHS + 1))  # every epoch exactly once
    assert _untimed(records) == _untimed(_records(reference))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [ck.name, "latest"]  # no half-written leftovers


def test_verification_killed_at_random_then_resumed_gives_the_same_result(reference, tmp_path):
    full = tmp_path / "full"
    _certkd(["verify", reference, "--out", full] + VERIFY)

    cut = tmp_path / "cut"
    part = cut / "verification.part0.jsonl"

    def three_points_done() -> bool:
        return part.exists() and part.read_text().count("\n") >= 3

    _kill_at_random_moment(["verify", reference, "--out", cut] + VERIFY, three_points_done, random.Random(7),
                           max_delay=1.5)
    assert not (cut / "verification.jsonl").exists() or json.loads(
        (cut / "verification.json").read_text())["complete"] is False
    _certkd(["verify", reference, "--out", cut, "--resume"] + VERIFY)

    rows = [json.loads(line) for line in (cut / "verification.jsonl").read_text().splitlines()]
    _, test_set, _ = load_dataset("digits")
    chosen = stratified_indices(test_set.labels, 100).tolist()  # --limit: a class-stratified subset
    assert [r["index"] for r in rows] == chosen  # every chosen point exactly once, in order
    full_rows = [json.loads(line) for line in (full / "verification.jsonl").read_text().splitlines()]
    assert _untimed(rows) == _untimed(full_rows)
    summary = json.loads((cut / "verification.json").read_text())
    assert summary["complete"] and summary["n"] == 100
    assert _untimed(summary) == _untimed(json.loads((full / "verification.json").read_text()))
    assert not list(cut.glob("verification.part*.jsonl"))
