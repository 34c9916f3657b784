"""The study's design as data: arms, settings, the comparisons of the Holm family, the TOST margin.

Everything a reader must know before the runs start lives here and in docs/distillation_study/plan.md,
and nothing here is changed by results. An arm is one line of :data:`ARMS`; a setting one entry of
:data:`SETTINGS`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple


@dataclass(frozen=True)
class Arm:
    """One training recipe and the grid of its own strength.

    key: the config key tuned on validation ("alpha" for CC-IBP, "beta" for every added term).
    overrides: config keys on top of the setting's student preset.
    teacher: the teacher type whose seed-k teacher student seed k distils (None: no teacher).
    optional: only with --trades (the TRADES teacher arm).
    """

    name: str
    key: str
    grid: Tuple[float, ...]
    overrides: Tuple[Tuple[str, Any], ...] = ()
    teacher: Optional[str] = None
    optional: bool = False


BETAS = (0.001, 0.01, 0.1, 1.0)          # β of the summed squared L2 feature terms: 4 decades
KD_BETAS = (0.03, 0.1, 0.3, 1.0)         # β of cc-ibp-kd's logit distillation (temperature 4)
DIST = (("method", "cc-dist"), ("dist_distance", "l2sq"), ("dist_reduction", "sum"))

#: The arms, in report order. Distillation and penalty arms train at the α selected for cc-ibp on
#: validation and tune only their own β, so every arm gets one grid of the same size.
ARMS: Tuple[Arm, ...] = (
    Arm("cc-ibp", "alpha", (0.1, 0.3, 0.5, 0.8)),
    Arm("cc-dist-pgd", "beta", BETAS, DIST, teacher="pgd-at"),
    Arm("cc-dist-std", "beta", BETAS, DIST, teacher="standard"),
    Arm("cc-dist-trades", "beta", BETAS, DIST, teacher="trades", optional=True),
    Arm("label-only", "beta", BETAS, DIST + (("dist_target", "class-mean"),), teacher="pgd-at"),
    Arm("logit-kd", "beta", KD_BETAS, (("method", "cc-ibp-kd"),), teacher="pgd-at"),
    Arm("zero", "beta", BETAS, DIST + (("dist_target", "zero"),)),
    Arm("box-width", "beta", BETAS, (("method", "cc-ibp-width"), ("dist_distance", "l1"), ("dist_reduction", "sum"))),
)
ARM_BY_NAME: Dict[str, Arm] = {a.name: a for a in ARMS}
BASELINE = "cc-ibp"

#: Metric of every selection (β, α), fixed in advance: mean complete-verifier verified accuracy over the
#: tuning seeds on the validation points. The epoch is not selected: a run is used at its last epoch.
SELECT_METRIC = "verified_accuracy"

#: The comparisons named in advance (a − b, test verified accuracy, paired by seed), one Holm family per
#: setting (those of them whose arms the setting runs).
COMPARISONS: Tuple[Tuple[str, str], ...] = (
    ("cc-dist-pgd", "cc-ibp"),
    ("cc-dist-std", "cc-ibp"),
    ("cc-dist-pgd", "label-only"),
    ("cc-dist-pgd", "zero"),
    ("cc-dist-pgd", "box-width"),
    ("cc-dist-pgd", "logit-kd"),
    ("cc-dist-pgd", "cc-dist-std"),
)
FAMILY_LEVEL = 0.05

#: Equivalence of robust and standard teachers: TOST at ±2 points of verified accuracy, level 0.05.
TOST_PAIR = ("cc-dist-pgd", "cc-dist-std")
TOST_MARGIN = 2.0

#: Per-point verification times tried on the pilot; the smallest with < 5% timeouts is used.
TIMEOUT_CANDIDATES = (1.0, 2.0, 5.0, 10.0, 20.0, 30.0)
MAX_TIMEOUT_FRACTION = 0.05


@dataclass(frozen=True)
class Setting:
    """One setting (dataset, ε, budget) of the study.

    train_limit: training points (a seed-0 random subset: certkd's ``train_limit``); the validation
        points are the next ``n_val`` of the same permutation, never trained on by students or teachers.
    seeds: report seeds 0..seeds-1 (student seed k distils teacher seed k).
    tune_seeds: seeds of the tuning runs, disjoint from the report seeds.
    test_limit: test points verified at the end (None: all).
    smoke: a labelled smoke run; its numbers enter no claim.
    """

    name: str
    preset: str
    train_limit: int
    n_val: int
    seeds: int
    tune_seeds: Tuple[int, ...]
    arms: Tuple[str, ...]
    teacher_types: Tuple[str, ...] = ("pgd-at", "standard")
    overrides: Tuple[Tuple[str, Any], ...] = ()
    teacher_overrides: Tuple[Tuple[str, Any], ...] = ()
    # grids replacing ARMS' ones, by arm name or, for every arm tuning that key, by key ("beta")
    grids: Tuple[Tuple[str, Tuple[float, ...]], ...] = ()
    test_limit: Optional[int] = None
    timeout: float = 5.0          # per-point time until a pilot (--pilot) records another
    pilot_points: int = 100
    data: str = "none"            # "none" (digits), "mnist" or "cifar"
    smoke: bool = False
    note: str = ""

    def grid(self, arm: Arm) -> Tuple[float, ...]:
        grids = dict(self.grids)
        return grids.get(arm.name, grids.get(arm.key, arm.grid))

    def report_seeds(self) -> Tuple[int, ...]:
        return tuple(range(self.seeds))

    def held_out_start(self) -> int:
        """Where the validation points start in the seed-0 permutation: after every training subset."""
        return max(self.train_limit, int(dict(self.teacher_overrides).get("train_limit", self.train_limit)))

    def teacher_seeds(self) -> Tuple[int, ...]:
        return tuple(sorted(set(self.report_seeds()) | set(self.tune_seeds)))


ALL_DIGITS_ARMS = tuple(a.name for a in ARMS if not a.optional)
# MNIST asks one question (does the gain over a tuned CC-IBP shrink with the budget?); digits carries the controls
MNIST_ARMS = ("cc-ibp", "cc-dist-pgd")
MNIST = (("eval_limit", 100),)
MNIST_GRIDS = (("cc-ibp", (0.03, 0.1, 0.3)), ("beta", BETAS[1:]), ("logit-kd", KD_BETAS[1:]))

SETTINGS: Dict[str, Setting] = {
    # 1437 training points: 1150 train, the other 287 validate; all 360 test points at the end
    "digits": Setting("digits", "digits-cnn7w16-ccibp", train_limit=1150, n_val=287, seeds=10,
                      tune_seeds=(100, 101), arms=ALL_DIGITS_ARMS,
                      note="the full 40-epoch schedule of the preset"),
    # the machinery end to end in minutes (2 epochs, one grid value per arm, 20 points): no claim
    "digits-smoke": Setting("digits-smoke", "digits-cnn7w16-ccibp", train_limit=1150, n_val=20, seeds=1,
                            tune_seeds=(100,), arms=ALL_DIGITS_ARMS, overrides=(("epochs", 2),),
                            grids=(("cc-ibp", (0.5,)), ("beta", (0.01,)), ("logit-kd", (0.1,))), test_limit=20,
                            pilot_points=10, smoke=True, note="smoke run of the machinery: 2 epochs, 20 points"),
    # today's budget: 5000 points x 8 epochs / batch 256 = 160 optimiser steps
    "mnist": Setting("mnist", "mnist-0.1-cnn7w16-ccibp", train_limit=5000, n_val=300, seeds=3, tune_seeds=(100,),
                     arms=MNIST_ARMS, teacher_types=("pgd-at",), overrides=MNIST, grids=MNIST_GRIDS,
                     test_limit=500, data="mnist", note="160 optimiser steps (5000 points, 8 epochs)"),
    # 4x today's steps: 20480 points x 8 epochs / batch 256 = 640 steps, the same schedule in epochs
    "mnist-4x": Setting("mnist-4x", "mnist-0.1-cnn7w16-ccibp", train_limit=20480, n_val=300, seeds=3,
                        tune_seeds=(100,), arms=MNIST_ARMS, teacher_types=("pgd-at",), overrides=MNIST,
                        grids=MNIST_GRIDS,
                        test_limit=500, data="mnist", note="640 optimiser steps (20480 points, 8 epochs)"),
    # a smoke run, labelled as such: 96 steps are not a CIFAR experiment
    "cifar-smoke": Setting("cifar-smoke", "cifar10-2_255-cnn7w32-ccibp", train_limit=2000, n_val=100, seeds=1,
                           tune_seeds=(100,), arms=("cc-ibp", "cc-dist-pgd"), teacher_types=("pgd-at",),
                           overrides=(("dataset", "imagefolder"), ("attack_steps", 1), ("attack_step_size", 10.0),
                                      ("eval_limit", 100)),
                           teacher_overrides=(("train_limit", 5000), ("epochs", 8), ("lr_milestones", [7])),
                           grids=(("cc-ibp", (0.1,)), ("beta", (1.0,))), test_limit=100, timeout=3.0,
                           data="cifar", smoke=True, note="smoke run: no claim rests on it"),
}


def comparisons_for(setting: Setting, arms: Tuple[str, ...]) -> Tuple[Tuple[str, str], ...]:
    """The named comparisons whose two arms ``arms`` (the setting's arms that run) both contain."""
    return tuple((a, b) for a, b in COMPARISONS if a in arms and b in arms)
