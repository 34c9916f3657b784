"""benchmarks/profile_step.py: exclusive phase times sum to the step, the wrappers come off, and one
tiny profile runs (issue #20)."""
from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load():
    name = "_certkd_bench_profile_step"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "profile_step.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        sys.modules[name] = mod
    return sys.modules[name]


def test_nested_phases_are_exclusive(monkeypatch):
    mod = _load()
    clock = {"t": 100.0}  # a fake clock: exact times, whatever the machine's load
    monkeypatch.setattr(mod.time, "perf_counter", lambda: clock["t"])

    def sleep(s):
        clock["t"] += s

    ph = mod.Phases()
    t0 = clock["t"]
    with ph.timed("outer"):
        sleep(0.01)
        with ph.timed("inner"):
            sleep(0.02)
        sleep(0.005)
    total = clock["t"] - t0
    got = ph.take()
    assert got["inner"] == pytest.approx(0.02, abs=1e-12) and got["outer"] == pytest.approx(0.015, abs=1e-12)
    assert got["outer"] + got["inner"] == pytest.approx(total, abs=1e-12)
    assert ph.take() == {}


def test_tiny_profile_and_wrappers_removed():
    mod = _load()
    before = (mod._parts.adversarial_pass, mod._bn.batch_stats, mod.Teacher.__dict__["targets"])
    res = mod.profile_config("cnn7-w16", 1, 8, 4, 1, repeats=1, warmup=0, variants=[True])
    after = (mod._parts.adversarial_pass, mod._bn.batch_stats, mod.Teacher.__dict__["targets"])
    assert before == after
    step = res["reg_active=true"]["cc-dist"]
    phases = step["phases_ms_median"]
    for k in ("attack", "clean forward", "teacher forward", "IBP pass", "BN statistics", "regulariser", "backward"):
        assert phases[k] > 0, k
    assert sum(phases.values()) <= step["step_ms_median"] * 1.01
