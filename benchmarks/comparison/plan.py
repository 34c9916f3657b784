"""Where every run of the method comparison lives, its config, and the list of runs with their cost.

Layout under ROOT (the #21 study's, so its verification, provenance and selection helpers apply)::

    ROOT/SETTING/teachers/pgd-at-s{k}              PGD-AT teacher, seed k (CC-Dist seed k distils it)
    ROOT/SETTING/tune/{method}/{key}{value}-s{seed} a tuning run, verified on the validation points
    ROOT/SETTING/final/{method}-s{seed}             the selected config at a report seed, verified on test
    ROOT/SETTING/selection.json                     each method's selected value, frozen before any test
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

from comparison.design import METHOD_BY_NAME, Method
from study.design import Setting
from study.planner import NO_TEST_INTERVAL, StudyError, teacher_dir, vstr

#: Seconds of one 40-epoch digits-small training run on one core at nice 15, next to the #21 study on
#: the machine's 2 cores (2026-12-08, timed runs at the tuning seed; the load varied between them):
#: ibp 6.8, crown-ibp 17.3 (β_end 0) and 33.4 (β_end 1), sabr 8.2-8.6, taps 31.2 (w 5), staps 69.1,
#: cc-ibp 21.4-22.7, cc-dist 14.3, the PGD-AT teacher 17.3; mtl-ibp taken as cc-ibp (not timed).
TRAIN_S: Dict[str, float] = {"ibp": 7.0, "crown-ibp": 28.0, "sabr": 9.0, "taps": 31.0, "staps": 69.0,
                             "cc-ibp": 22.0, "mtl-ibp": 22.0, "cc-dist": 15.0, "teacher": 17.0}
#: Mean seconds to verify one digits point completely, 5 s per point: 0.183 and 0.171 on the 287
#: validation points of cc-ibp α = 0.1 and sabr λ = 0.3 (no timeouts); taken as 0.2.
POINT_S = 0.2


def tune_dir(root: Path, setting: Setting, method: str, value: float, seed: int) -> Path:
    m = METHOD_BY_NAME[method]
    return root / setting.name / "tune" / method / f"{m.key}{vstr(value)}-s{seed}"


def final_dir(root: Path, setting: Setting, method: str, seed: int) -> Path:
    return root / setting.name / "final" / f"{method}-s{seed}"


def method_config(setting: Setting, method: str, value: float, seed: int, root: Path,
                  alpha: Optional[float] = None, data_dir: Optional[str] = None):
    """The TrainConfig of ``method`` with its key at ``value``, at ``seed``; a method trained after
    another (CC-Dist) takes ``alpha`` (the other's selected α) and distils the seed's teacher."""
    from certkd import resolve_config

    m = METHOD_BY_NAME[method]
    over: Dict[str, Any] = dict(setting.overrides, seed=seed, train_limit=setting.train_limit,
                                test_interval=NO_TEST_INTERVAL, method=m.method)
    over.update(m.overrides)
    if data_dir:
        over["data_dir"] = data_dir
    if m.after:
        if alpha is None:
            raise StudyError(f"{method} trains at the α selected for {m.after}: select it first")
        over["alpha"] = alpha
    over[m.key] = value
    if m.teacher:
        over["teacher"] = str(teacher_dir(root, setting, m.teacher, seed))
    return resolve_config(setting.preset, over)


@dataclass(frozen=True)
class Planned:
    """One run. value is None for a final run (the selected value, known after tuning)."""

    phase: str          # teacher, tune, tune-after, final
    method: str         # the teacher type for a teacher
    value: Optional[float]
    seed: int


def teacher_seeds(setting: Setting, methods: Sequence[Method]) -> List[int]:
    """Seeds that need a teacher: the report seeds and the tuning seeds, if some method distils."""
    if not any(m.teacher for m in methods):
        return []
    return sorted(set(setting.tune_seeds) | set(setting.report_seeds()))


def plan(setting: Setting, methods: Sequence[Method]) -> List[Planned]:
    """Every run in execution order: teachers, the tuning runs (those trained at another's α last),
    then each method's selected config on every report seed."""
    runs = [Planned("teacher", "pgd-at", None, s) for s in teacher_seeds(setting, methods)]
    first, after = [m for m in methods if not m.after], [m for m in methods if m.after]
    for phase, group in (("tune", first), ("tune-after", after)):
        runs += [Planned(phase, m.name, v, s) for s in setting.tune_seeds for m in group for v in setting.grid(m)]
    runs += [Planned("final", m.name, None, s) for s in setting.report_seeds() for m in methods]
    return runs


def points_per_run(setting: Setting, n_test: int = 360) -> Dict[str, int]:
    """Points verified per tuning run (validation) and per final run (test)."""
    return {"tune": setting.n_val, "final": min(setting.test_limit or n_test, n_test)}


def estimate(runs: Sequence[Planned], setting: Setting, train_s: Mapping[str, float] = TRAIN_S,
             point_s: float = POINT_S) -> Dict[str, float]:
    """Estimated seconds of ``runs`` on one core: training (``train_s`` per method, scaled by the
    setting's epochs against the preset's 40) and complete verification (``point_s`` per point)."""
    epochs = dict(setting.overrides).get("epochs", 40)
    scale = epochs / 40
    pts = points_per_run(setting)
    train = verify = 0.0
    for r in runs:
        train += train_s["teacher" if r.phase == "teacher" else r.method] * scale
        if r.phase != "teacher":
            verify += point_s * pts["final" if r.phase == "final" else "tune"]
    return {"train_s": train, "verify_s": verify, "total_s": train + verify}


def describe(setting: Setting, methods: Sequence[Method], train_s: Mapping[str, float] = TRAIN_S,
             point_s: float = POINT_S) -> List[str]:
    """The --plan lines: the runs, then the counts per phase and the estimated cost."""
    runs = plan(setting, methods)
    lines = [f"[{setting.name}] {setting.note}{' (SMOKE RUN)' if setting.smoke else ''}: {len(runs)} runs; "
             f"report seeds 0..{setting.seeds - 1}, tuning seeds {list(setting.tune_seeds)}"]
    for p in runs:
        key = METHOD_BY_NAME[p.method].key if p.phase != "teacher" else ""
        what = p.method + (f" {key}={p.value:g}" if p.value is not None else "")
        lines.append(f"  {p.phase:10s} {what} seed {p.seed}")
    counts: Dict[str, int] = {}
    for r in runs:
        counts[r.phase] = counts.get(r.phase, 0) + 1
    est = estimate(runs, setting, train_s, point_s)
    lines.append("runs per phase: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    lines.append(f"estimated cost on one core: training {est['train_s'] / 3600:.2f} h + verification "
                 f"{est['verify_s'] / 3600:.2f} h = {est['total_s'] / 3600:.2f} h "
                 f"(per-method training seconds {dict(train_s)}, {point_s:g} s per verified point)")
    return lines
