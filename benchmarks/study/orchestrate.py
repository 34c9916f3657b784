"""The order of a setting's work, the pilot's per-point time and the frozen selection.

teachers → baseline tuning runs → pilot (per-point time) → validation of the baseline → α* →
other arms' tuning runs at α* (train, validate) → each arm's value → selection.json (frozen) →
final runs (train, verify the test points once) → teacher evaluation.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from study.design import BASELINE, MAX_TIMEOUT_FRACTION, SELECT_METRIC, TIMEOUT_CANDIDATES, Arm, Setting
from study.execute import read_summary, run_jobs
from study.planner import (StudyError, arms_of, available, final_dir, plan, teacher_types, tune_dir)
from study.stats import choose_timeout, select


def pilot_timeout(root: Path, setting: Setting) -> Optional[float]:
    """The per-point time recorded by the pilot (ROOT/SETTING/pilot.json), or None before the pilot."""
    path = root / setting.name / "pilot.json"
    return json.loads(path.read_text())["chosen_s"] if path.exists() else None


def write_pilot(root: Path, setting: Setting, arm: Arm) -> Dict[str, Any]:
    """Pool the pilot rows of the baseline's tuning runs at the first tuning seed; choose the time."""
    from certkd.checkpoints import atomic_write_json
    from certkd.verification.pipeline import read_rows

    seed = setting.tune_seeds[0]
    rows: List[Dict[str, Any]] = []
    for v in setting.grid(arm):
        rows += read_rows(tune_dir(root, setting, arm.name, v, seed) / "pilot.jsonl")
    chosen, fractions = choose_timeout(rows, TIMEOUT_CANDIDATES, MAX_TIMEOUT_FRACTION)
    out = {"points": len(rows), "pilot_time_s": max(TIMEOUT_CANDIDATES), "fractions": {f"{k:g}": f for k, f in
                                                                                       fractions.items()},
           "chosen_s": chosen if chosen is not None else max(TIMEOUT_CANDIDATES),
           "met": chosen is not None, "runs": f"{arm.name} grid at seed {seed}, first {setting.pilot_points} "
                                              "validation points each"}
    atomic_write_json(root / setting.name / "pilot.json", out)
    return out


def scores(root: Path, setting: Setting, arm: Arm, run_dir: Optional[Callable[..., Path]] = None
           ) -> Dict[float, List[float]]:
    """Grid value -> validation scores (SELECT_METRIC) of the tuning seeds with complete validation.
    ``run_dir(root, setting, name, value, seed)``: where a tuning run lives (default :func:`tune_dir`)."""
    out: Dict[float, List[float]] = {}
    for v in setting.grid(arm):
        for s in setting.tune_seeds:
            summ = read_summary((run_dir or tune_dir)(root, setting, arm.name, v, s), "validation")
            if summ is not None:
                out.setdefault(v, []).append(summ[SELECT_METRIC])
    return out


def choose(root: Path, setting: Setting, arm: Arm, run_dir: Optional[Callable[..., Path]] = None) -> float:
    """The arm's selected value; refuses while a tuning run lacks its complete validation (``run_dir``:
    as in :func:`scores`)."""
    sc = scores(root, setting, arm, run_dir)
    missing = sum(len(setting.tune_seeds) - len(sc.get(v, [])) for v in setting.grid(arm))
    if missing:
        raise StudyError(f"{setting.name}/{arm.name}: {missing} tuning run(s) without complete validation; "
                         "run the study (it resumes) before selecting")
    return select(sc, setting.grid(arm))


def freeze(root: Path, setting: Setting, selection: Dict[str, Any]) -> Dict[str, Any]:
    """Write ROOT/SETTING/selection.json; once a final run has touched the test set, a different
    selection is refused (the test set would be used twice)."""
    from certkd.checkpoints import atomic_write_json

    path = root / setting.name / "selection.json"
    if path.exists():
        old = json.loads(path.read_text())
        if {k: old.get(k) for k in ("alpha", "arms")} != {k: selection.get(k) for k in ("alpha", "arms")}:
            touched = list((root / setting.name / "final").glob("*/test.jsonl"))
            if touched:
                raise StudyError(f"{setting.name}: the selection changed ({old['arms']} -> {selection['arms']}) after "
                                 f"{len(touched)} final run(s) touched the test set; start a new study folder")
    atomic_write_json(path, selection)
    return selection


def read_selection(root: Path, setting: Setting) -> Optional[Dict[str, Any]]:
    path = root / setting.name / "selection.json"
    return json.loads(path.read_text()) if path.exists() else None


def runnable_arms(setting: Setting, trades: bool, log) -> List[Arm]:
    """The setting's arms that this certkd can train; the others are logged and left out."""
    arms = []
    for a in arms_of(setting, trades):
        why = available(setting, a)
        if why:
            log(f"[{setting.name}] arm {a.name} not run: {why}")
        else:
            arms.append(a)
    if not any(a.name == BASELINE for a in arms):
        raise StudyError(f"{setting.name}: every setting needs the {BASELINE} arm (its α is the others' α)")
    return arms


def run_setting(root: Path, setting: Setting, data_dir: Optional[str], workers: int, trades: bool, log) -> None:
    """Everything of one setting, resumable: finished work is skipped."""
    arms = runnable_arms(setting, trades, log)
    base = next(a for a in arms if a.name == BASELINE)
    others = [a for a in arms if a.name != BASELINE]
    r, d, n = str(root), data_dir, setting.name

    log(f"[{n}] teachers")
    run_jobs([("teacher", n, r, d, t, None, s, None, None) for t in teacher_types(setting, arms)
              for s in setting.teacher_seeds()], workers, log)
    log(f"[{n}] {BASELINE} tuning runs")
    run_jobs([("train", n, r, d, base.name, v, s, None, None) for s in setting.tune_seeds for v in setting.grid(base)],
             workers, log)
    timeout = pilot_timeout(root, setting)
    if timeout is None:
        log(f"[{n}] pilot: {setting.pilot_points} validation points per {BASELINE} run at {max(TIMEOUT_CANDIDATES):g} s")
        run_jobs([("pilot", n, r, d, base.name, v, setting.tune_seeds[0], None, max(TIMEOUT_CANDIDATES))
                  for v in setting.grid(base)], workers, log)
        p = write_pilot(root, setting, base)
        timeout = p["chosen_s"]
        log(f"[{n}] pilot chose {timeout:g} s per point (timed-out fractions {p['fractions']})")
    run_jobs([("validate", n, r, d, base.name, v, s, None, timeout) for s in setting.tune_seeds
              for v in setting.grid(base)], workers, log)
    alpha = choose(root, setting, base)
    log(f"[{n}] α* = {alpha:g}")
    jobs = [(k, n, r, d, a.name, v, s, alpha, timeout) for k in ("train", "validate") for s in setting.tune_seeds
            for a in others for v in setting.grid(a)]
    run_jobs([j for j in jobs if j[0] == "train"], workers, log)
    run_jobs([j for j in jobs if j[0] == "validate"], workers, log)
    chosen = {base.name: alpha} | {a.name: choose(root, setting, a) for a in others}
    freeze(root, setting, {"alpha": alpha, "arms": chosen, "metric": SELECT_METRIC, "timeout_s": timeout,
                           "scores": {a.name: {f"{v:g}": s for v, s in scores(root, setting, a).items()} for a in arms}})
    log(f"[{n}] selection {chosen}; final runs on seeds 0..{setting.seeds - 1}, test verified once")
    run_jobs([("final", n, r, d, a.name, chosen[a.name], s, alpha, timeout) for s in setting.report_seeds()
              for a in arms], workers, log)
    run_jobs([("teacher-eval", n, r, d, t, None, s, None, None) for t in teacher_types(setting, arms)
              for s in setting.report_seeds()], workers, log)


def describe_plan(setting: Setting, arms: Sequence[Arm]) -> List[str]:
    """Lines listing the planned runs of a setting (the --plan output)."""
    runs = plan(setting, arms)
    lines = [f"[{setting.name}] {setting.note}{' (SMOKE RUN)' if setting.smoke else ''}: "
             f"{len(runs)} runs; seeds 0..{setting.seeds - 1}, tuning seeds {list(setting.tune_seeds)}"]
    for p in runs:
        what = f"{p.arm}" + (f" {dict(((a.name, a.key) for a in arms)).get(p.arm, '')}={p.value:g}"
                             if p.value is not None else "")
        lines.append(f"  {p.phase:13s} {what} seed {p.seed}")
    return lines


def final_runs(root: Path, setting: Setting, arms: Sequence[str]) -> Dict[str, Dict[int, Path]]:
    return {a: {s: final_dir(root, setting, a, s) for s in setting.report_seeds()} for a in arms}
