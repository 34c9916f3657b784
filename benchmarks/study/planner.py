"""Where every run of the study lives, its config, its validation points, and the list of runs.

Layout under the study folder ROOT (default runs/distillation_study_21)::

    ROOT/SETTING/teachers/{type}-s{k}              teacher of type pgd-at/standard/trades, seed k
    ROOT/SETTING/tune/{arm}/{key}{value}-s{seed}   a tuning run (tuning seeds), verified on validation
    ROOT/SETTING/final/{arm}-s{seed}               the selected config at a report seed, verified on test
    ROOT/SETTING/selection.json                    α* and each arm's selected value, frozen before any test
    ROOT/SETTING/pilot.json                        the per-point verification time chosen on a pilot
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from study.design import ARM_BY_NAME, BASELINE, Arm, Setting

NO_TEST_INTERVAL = 10 ** 6  # no test-set evaluation during training: the test set is touched once, at the end


class StudyError(Exception):
    """A one-line refusal of the study script (exit code 2)."""


def vstr(value: float) -> str:
    return f"{value:g}"


def teacher_dir(root: Path, setting: Setting, kind: str, seed: int) -> Path:
    return root / setting.name / "teachers" / f"{kind}-s{seed}"


def tune_dir(root: Path, setting: Setting, arm: str, value: float, seed: int) -> Path:
    a = ARM_BY_NAME[arm]
    return root / setting.name / "tune" / arm / f"{a.key}{vstr(value)}-s{seed}"


def final_dir(root: Path, setting: Setting, arm: str, seed: int) -> Path:
    return root / setting.name / "final" / f"{arm}-s{seed}"


def validation_indices(n_train: int, start: int, n_val: int):
    """Indices (into the full training split) of the validation points, ascending.

    certkd's ``train_limit = L`` trains on the first L points of ``torch.randperm(n_train)`` under seed 0
    (``ImageDataset.sample``); the validation points are the next ``n_val`` of that permutation,
    ``perm[start : start + n_val]`` with ``start >= L`` for every run of the setting.
    Returns: (n_val,) int64 tensor.
    """
    import torch

    if start + n_val > n_train:
        raise StudyError(f"validation needs {start} + {n_val} <= {n_train} training points; lower train_limit or n_val")
    perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(0))
    return perm[start:start + n_val].sort().values


def arms_of(setting: Setting, trades: bool = False) -> Tuple[Arm, ...]:
    """The setting's arms (the TRADES arm only with --trades)."""
    arms = [ARM_BY_NAME[a] for a in setting.arms]
    if trades and "cc-dist-trades" not in setting.arms and "pgd-at" in setting.teacher_types:
        arms.append(ARM_BY_NAME["cc-dist-trades"])
    return tuple(a for a in arms if trades or not a.optional)


def teacher_types(setting: Setting, arms: Sequence[Arm]) -> Tuple[str, ...]:
    """The teacher types some arm distils, in the setting's order (trades last)."""
    used = {a.teacher for a in arms if a.teacher}
    order = list(setting.teacher_types) + [t for t in sorted(used) if t not in setting.teacher_types]
    return tuple(t for t in order if t in used)


def _base(setting: Setting, seed: int, data_dir: Optional[str]) -> Dict[str, Any]:
    over: Dict[str, Any] = dict(setting.overrides, seed=seed, train_limit=setting.train_limit,
                                test_interval=NO_TEST_INTERVAL)
    if data_dir:
        over["data_dir"] = data_dir
    return over


def teacher_config(setting: Setting, kind: str, seed: int, data_dir: Optional[str] = None):
    """The TrainConfig of teacher ``kind`` (pgd-at, standard, trades) with its own seed: its own
    initialisation and batch order."""
    from certkd import resolve_config

    over = {k: v for k, v in _base(setting, seed, data_dir).items() if not k.startswith("attack_")}
    over.update(setting.teacher_overrides, method=kind)
    return resolve_config(setting.preset, over, teacher=True)


def student_config(setting: Setting, arm: str, value: float, seed: int, root: Path,
                   alpha: Optional[float] = None, data_dir: Optional[str] = None):
    """The TrainConfig of ``arm`` at grid ``value`` and ``seed``; non-baseline arms train at ``alpha``
    (the α selected for cc-ibp), and distil the teacher of their type with the same seed.

    Raises CertkdError when this certkd does not know an option of the arm (see :func:`available`).
    """
    from certkd import resolve_config

    a = ARM_BY_NAME[arm]
    over = _base(setting, seed, data_dir)
    over.update(a.overrides)
    if a.key != "alpha":
        if alpha is None:
            raise StudyError(f"arm {arm} trains at the α selected for {BASELINE}: select it first")
        over["alpha"] = alpha
    over[a.key] = value
    if a.teacher:
        over["teacher"] = str(teacher_dir(root, setting, a.teacher, seed))
    return resolve_config(setting.preset, over)


def available(setting: Setting, arm: Arm) -> Optional[str]:
    """None if this certkd accepts the arm's options, else the one-line reason it does not."""
    from certkd.errors import CertkdError

    try:
        over = dict(setting.overrides, **dict(arm.overrides), alpha=0.5, beta=1.0)
        if arm.teacher:
            over["teacher"] = "/nonexistent/teacher"  # only validated for presence, never read here
        from certkd import resolve_config

        resolve_config(setting.preset, over)
    except CertkdError as e:
        return str(e).splitlines()[0]
    return None


@dataclass(frozen=True)
class Planned:
    """One run of the plan. value is None for a final run (the selected value, known after tuning)."""

    phase: str          # teacher, tune-baseline, tune, final
    arm: str            # teacher type for teachers
    value: Optional[float]
    seed: int


def plan(setting: Setting, arms: Sequence[Arm]) -> List[Planned]:
    """Every run of a setting in execution order: teachers, the baseline's α grid on the tuning seeds,
    the other arms' grids (at the selected α), then each arm's selected config on the report seeds."""
    runs = [Planned("teacher", t, None, s) for t in teacher_types(setting, arms) for s in setting.teacher_seeds()]
    base = [a for a in arms if a.name == BASELINE]
    runs += [Planned("tune-baseline", a.name, v, s) for a in base for s in setting.tune_seeds for v in setting.grid(a)]
    runs += [Planned("tune", a.name, v, s) for s in setting.tune_seeds for a in arms if a.name != BASELINE
             for v in setting.grid(a)]
    runs += [Planned("final", a.name, None, s) for s in setting.report_seeds() for a in arms]
    return runs


def plan_counts(runs: Sequence[Planned]) -> Dict[str, int]:
    out: Dict[str, int] = {}
    for r in runs:
        out[r.phase] = out.get(r.phase, 0) + 1
    return out
