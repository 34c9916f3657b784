"""The method comparison of issue #23 as data: the methods, the key each one tunes, the settings.

Each method tunes its own strength on the same budget: one grid of :data:`GRID_SIZE` values, one tuning
seed, selected by complete-verified accuracy on validation points held out from all training. Nothing
here changes with results. The data split, the runs' layout and the verification are the #21 study's
(benchmarks/study/), reused through a :class:`study.design.Setting`.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Dict, Optional, Tuple

from study.design import SELECT_METRIC, Setting


@dataclass(frozen=True)
class Method:
    """One certified-training method and the grid of the one key it tunes.

    key: the config key tuned on validation. IBP has no strength of its own: it tunes ``lr`` instead, on
        a grid of the same size, so that every method gets the same number of tuning runs.
    overrides: config keys on top of the setting's preset.
    after: the method whose selected ``alpha`` this one trains at (CC-Dist: CC-IBP's, as in issue #21),
        so its own grid only searches its own term.
    teacher: teacher type whose seed-k teacher the seed-k run distils (None: no teacher).
    """

    name: str
    key: str
    grid: Tuple[float, ...]
    overrides: Tuple[Tuple[str, Any], ...] = ()
    after: Optional[str] = None
    teacher: Optional[str] = None

    # name, key and grid are those of study.design.Arm, so Setting.grid and the study's selection apply

    @property
    def method(self) -> str:
        return dict(self.overrides).get("method", self.name)


GRID_SIZE = 3

#: In report order. Grids: CC-IBP/MTL-IBP α around the preset's 0.5; SABR/STAPS λ (the small box's
#: fraction of the ε box); TAPS's gradient expanding factor w around its default 5; CROWN-IBP's
#: β_end: 0 is the paper's 1 → 0 schedule, 1 keeps the CROWN-IBP bound all along; CC-Dist's β around
#: the digits-cnn7w16-ccdist preset's 1.
METHODS: Tuple[Method, ...] = (
    Method("ibp", "lr", (3e-4, 1e-3, 3e-3)),
    Method("crown-ibp", "crown_ibp_beta_end", (0.0, 0.5, 1.0)),
    Method("sabr", "alpha", (0.1, 0.3, 0.6)),
    Method("taps", "taps_grad_scale", (1.0, 5.0, 25.0)),
    Method("staps", "alpha", (0.1, 0.3, 0.6)),
    Method("cc-ibp", "alpha", (0.1, 0.3, 0.5)),
    Method("mtl-ibp", "alpha", (0.1, 0.3, 0.5)),
    Method("cc-dist", "beta", (0.1, 1.0, 10.0), after="cc-ibp", teacher="pgd-at"),
)
METHOD_BY_NAME: Dict[str, Method] = {m.name: m for m in METHODS}

#: The selection metric, fixed in advance, is the #21 study's (study.design.SELECT_METRIC):
#: complete-verified accuracy on the validation points of the tuning seed. IBP-verified accuracy would be
#: cheaper but would favour the methods that train the IBP bound itself (IBP, CC-IBP with a large α) over
#: SABR, TAPS and STAPS, whose networks are verified by the complete verifier and not by IBP; the issue
#: reports complete verification.

#: Per-point verification time (s) of the validation and the test points; timeouts count as not verified
#: and are reported per method.
TIMEOUT_S = 5.0

#: digits-small: BN-free cnn-small, ε = 0.05, 40 epochs; one training run takes ~20 s on one core. 1437
#: training points: the first 1150 of certkd's seed-0 permutation train, the next 287 validate; all 360
#: test points are verified at the end. Report seeds 0-2; tuning seed 100.
DIGITS = Setting("digits", "digits-small", train_limit=1150, n_val=287, seeds=3, tune_seeds=(100,),
                 arms=tuple(m.name for m in METHODS), teacher_types=("pgd-at",), timeout=TIMEOUT_S,
                 note="digits-small, 40 epochs, every method tuned on a 3-value grid of its own key")

#: The machinery end to end in seconds: 1 epoch on 200 points, 10 validation and 10 test points, 2 report
#: seeds, the first grid value only. No number of it means anything.
SMOKE = Setting("digits-smoke", "digits-small", train_limit=200, n_val=10, seeds=2, tune_seeds=(100,),
                arms=tuple(m.name for m in METHODS), teacher_types=("pgd-at",), timeout=1.0, test_limit=10,
                overrides=(("epochs", 1), ("batch_size", 32)), teacher_overrides=(("epochs", 1),),
                grids=tuple((m.name, m.grid[:1]) for m in METHODS),
                smoke=True, note="smoke run of the machinery: 1 epoch, 10 points")

SETTINGS: Dict[str, Setting] = {s.name: s for s in (DIGITS, SMOKE)}


def with_seeds(setting: Setting, seeds: Optional[int]) -> Setting:
    """``setting`` with ``seeds`` report seeds (unchanged for None)."""
    return setting if seeds is None else replace(setting, seeds=seeds)
