"""What a ``certkd tune`` trial maximises, and one trial (docs/tune.md §3).

An objective is measured on the validation split (``val_fraction`` of the training set, held out from
training: :meth:`certkd.data.ImageDataset.split_validation`), never on the test set. Its text:

* ``ibp``: IBP-verified accuracy (also ``clean``: clean, ``pgd``: PGD accuracy, with the config's
  test attack);
* ``0.3*clean+0.7*ibp``: a weighted sum;
* ``clean,ibp``: two (or more) objectives, a Pareto search (Optuna's multi-objective study, which
  cannot prune: :mod:`certkd.tuning.study` refuses a pruner there).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

from certkd.errors import CertkdError
from certkd.options import did_you_mean

#: Objective names → keys of :func:`certkd.verification.evaluate_accuracy`'s result.
METRICS = {"clean": "clean_accuracy", "pgd": "pgd_accuracy", "ibp": "ibp_verified_accuracy"}
#: How the run folders of trials are named under the tune folder.
TRIALS_DIR = "trials"

Term = Tuple[float, str]  # (weight, metric name)


@dataclass(frozen=True)
class Objective:
    """One or more weighted sums of validation metrics, each maximised."""

    sums: Tuple[Tuple[Term, ...], ...]

    @property
    def names(self) -> Tuple[str, ...]:
        """Each objective as text, e.g. ``("ibp",)`` or ``("0.3*clean+0.7*ibp",)``."""
        return tuple("+".join(m if w == 1 else f"{w:g}*{m}" for w, m in terms) for terms in self.sums)

    @property
    def text(self) -> str:
        return ",".join(self.names)

    @property
    def multi(self) -> bool:
        return len(self.sums) > 1

    def values(self, metrics: Mapping[str, Any]) -> Tuple[float, ...]:
        """The objective values of one evaluation (``evaluate_accuracy``'s result)."""
        return tuple(sum(w * float(metrics[METRICS[m]]) for w, m in terms) for terms in self.sums)


def _term(text: str, whole: str) -> Term:
    weight, _, name = text.rpartition("*")
    name = name.strip()
    if name not in METRICS:
        raise CertkdError(f"--objective {whole}: unknown metric '{name}'{did_you_mean(name, METRICS)}; the metrics "
                          f"are {', '.join(METRICS)} (validation accuracies), e.g. --objective ibp or "
                          "--objective 0.3*clean+0.7*ibp")
    if not weight:
        return 1.0, name
    try:
        w = float(weight)
    except ValueError:
        raise CertkdError(f"--objective {whole}: '{weight}' is not a weight; write e.g. 0.3*clean+0.7*ibp") from None
    if not (math.isfinite(w) and w > 0):
        raise CertkdError(f"--objective {whole}: weights must be positive numbers, got {weight}")
    return w, name


def parse_objective(text: str) -> Objective:
    """An :class:`Objective` from ``ibp``, ``0.3*clean+0.7*ibp`` or ``clean,ibp`` (one-line errors)."""
    parts = [p.strip() for p in str(text).split(",")]
    if not all(parts):
        raise CertkdError(f"--objective '{text}': an empty objective; write e.g. ibp, 0.3*clean+0.7*ibp or clean,ibp")
    sums = []
    for part in parts:
        terms = tuple(_term(t.strip(), text) for t in part.split("+"))
        names = [m for _, m in terms]
        if len(set(names)) != len(names):
            raise CertkdError(f"--objective {text}: a metric appears twice in '{part}'; add its weights")
        sums.append(terms)
    obj = Objective(tuple(sums))
    if len(set(obj.names)) != len(obj.names):
        raise CertkdError(f"--objective {text}: the same objective is listed twice")
    return obj


def trial_dir(out: Path, number: int) -> Path:
    """The run folder of trial ``number`` in the tune folder ``out``."""
    return Path(out) / TRIALS_DIR / f"trial-{number:04d}"


def run_trial(trial: Any, *, out: Path, preset: Optional[str], sets: Mapping[str, Any], space: Any,
              objective: Objective, log: Callable[[str], None] = print) -> Sequence[float]:
    """Train the configuration ``trial`` suggests and return its final validation objective(s).

    Every epoch's validation value is reported to the study's pruner (one objective only), which may
    end the trial (``optuna.TrialPruned``; its run folder keeps the checkpoints trained so far). The
    resolved config and the final validation metrics are stored with the trial (user attributes
    ``config`` and ``val``), so the study alone holds what ``certkd report`` needs.
    """
    import optuna

    from certkd.config import resolve_config
    from certkd.training import train

    params = space.suggest(trial)
    cfg = resolve_config(preset, {**sets, **params})
    run = trial_dir(out, trial.number)
    trial.set_user_attr("run_dir", str(run.relative_to(out)))
    trial.set_user_attr("config", cfg.to_dict())
    shown = ", ".join(f"{k}={v}" for k, v in params.items())
    log(f"trial {trial.number}: {shown} → {run}")
    last: Dict[str, Any] = {}

    def report(record: Dict[str, Any]) -> None:
        last.update(record["val"])
        if objective.multi:
            return  # Optuna cannot prune (or take intermediate values of) a multi-objective trial
        value = objective.values(record["val"])[0]
        trial.report(value, record["epoch"])
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned at epoch {record['epoch']} (validation {objective.text} {value:.4f})")

    train(cfg, run, force=True, progress=False, log=lambda s: None, on_epoch=report)
    values = objective.values(last)
    trial.set_user_attr("val", {k: last[v] for k, v in METRICS.items()} | {"n": last.get("n")})
    log(f"trial {trial.number}: validation {objective.text} = " + ", ".join(f"{v:.4f}" for v in values))
    return values
