"""Grouping and statistics: :func:`group_runs` groups the seeds of one configuration (runs differing
only in :data:`GROUP_IGNORED_KEYS`), names each group by the keys that distinguish it, and
:func:`mean_std` gives the statistics of its metrics.

Two runs of one configuration with the same seed are one seed, not two: the group counts one of them
(the one with the most results, then by name) and the other gets a one-line warning, so a configuration
trained twice (``sweep --grid lr=0.001,1e-3`` before sweeps refused it) never narrows the spread.
"""
from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from certkd.config import TrainConfig
from certkd.reporting.records import FAMILIES, GROUP_IGNORED_KEYS, RunRecord, _PRETTY_KEYS

@dataclass
class Group:
    """Runs whose resolved configs are identical except the seed (and runtime keys)."""

    name: str
    config: Dict[str, Any]
    runs: List[RunRecord]

    @property
    def method(self) -> str:
        return self.runs[0].method

    @property
    def family(self) -> str:
        return self.runs[0].family

    @property
    def seeds(self) -> List[int]:
        return [r.config.seed for r in self.runs]

    def stats(self, key: str) -> "Stat":
        return mean_std([r.value(key) for r in self.runs])

    def pareto(self) -> Tuple["Stat", "Stat", bool]:
        """(clean accuracy, verified accuracy, whether every y is from a complete verifier)."""
        ys = [r.pareto_y() for r in self.runs]
        complete = all(c for y, c in ys if y is not None) and any(y is not None for y, _ in ys)
        if not complete:  # do not mix complete-verifier and IBP numbers in one mean
            ys = [(r.value("ibp_verified_accuracy"), False) for r in self.runs]
        return self.stats("clean_accuracy"), mean_std([y for y, _ in ys]), complete


@dataclass
class Stat:
    mean: Optional[float]
    std: Optional[float]   # sample standard deviation (ddof=1); None with fewer than 2 values
    n: int                 # number of runs that have the value
    total: int             # number of runs in the group

    def format(self, percent: bool = True, digits: int = 1) -> str:
        if self.mean is None:
            return "–"
        s = 100.0 if percent else 1.0
        text = f"{s * self.mean:.{digits}f}"
        if self.std is not None:
            text += f" ± {s * self.std:.{digits}f}"
        if self.n < self.total:
            text += f" ({self.n}/{self.total})"
        return text


def mean_std(values: Sequence[Optional[float]]) -> Stat:
    """Mean and sample standard deviation (ddof=1) of the values that are not None."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return Stat(None, None, 0, len(values))
    return Stat(statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else None, len(vals), len(values))


def _fmt_value(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


# Keys tried first when naming groups; the rest follow in TrainConfig order.
_NAME_PRIORITY = ("beta", "alpha", "eps", "teacher", "dist_target", "dist_combination", "dist_distance", "dist_reduction",
                  "feature_adapter", "kd_temperature", "trades_beta", "model", "model_kwargs", "dataset", "epochs",
                  "lr", "batch_size", "train_eps_mul", "eps_length", "eps_start", "attack_steps")


def _distinguishing_keys(configs: Sequence[Mapping[str, Any]]) -> List[str]:
    """A short list of keys that tells the configs apart: greedily, in :data:`_NAME_PRIORITY` order."""
    keys = [k for k in configs[0] if k != "method"]
    order = [k for k in _NAME_PRIORITY if k in keys] + [k for k in keys if k not in _NAME_PRIORITY]
    classes = lambda ks: len({tuple(json.dumps(c.get(k), sort_keys=True) for k in ks) for c in configs})
    target = classes(keys)
    chosen: List[str] = []
    current = 1
    for k in order:
        if current >= target:
            break
        n = classes(chosen + [k])
        if n > current:
            chosen.append(k)
            current = n
    return chosen


def _name_value(key: str, value: Any, configs: Sequence[Mapping[str, Any]]) -> str:
    if key == "teacher" and isinstance(value, str):  # the folder name, unless two teachers share it
        tails = {Path(str(c.get(key))).name for c in configs if c.get(key)}
        paths = {str(c.get(key)) for c in configs if c.get(key)}
        if len(tails) == len(paths):
            return Path(value).name
    return _fmt_value(value)


def _group_key(cfg: TrainConfig) -> str:
    d = cfg.to_dict()
    for k in GROUP_IGNORED_KEYS:
        d.pop(k, None)
    return json.dumps(d, sort_keys=True)


def _one_run_per_seed(runs: Sequence[RunRecord]) -> List[RunRecord]:
    """The runs of one configuration, one per seed, sorted by seed; a repeated seed is counted once and
    the run left out gets a warning (it is still listed with the report's warnings)."""
    ranked = sorted(runs, key=lambda r: (r.config.seed, r.verification is None, r.evaluation is None, r.name))
    kept: Dict[int, RunRecord] = {}
    for r in ranked:
        first = kept.setdefault(r.config.seed, r)
        if first is not r:
            note = (f"same configuration and seed ({r.config.seed}) as `{first.name}`: counted once, as `{first.name}`, "
                    "not averaged in as another seed; delete one of them or retrain it with another seed")
            if note not in r.warnings:
                r.warnings.append(note)
    return list(kept.values())


def group_runs(runs: Sequence[RunRecord]) -> List[Group]:
    """Group seeds; name each group by its method plus the keys that tell apart groups of that method."""
    by_key: Dict[str, List[RunRecord]] = {}
    for r in runs:
        by_key.setdefault(_group_key(r.config), []).append(r)
    groups = [(json.loads(k), _one_run_per_seed(rs)) for k, rs in by_key.items()]
    names: List[str] = []
    for cfg, rs in groups:
        same_method = [c for c, _ in groups if c["method"] == cfg["method"]]
        keys = _distinguishing_keys(same_method)
        parts = [cfg["method"]] + [f"{_PRETTY_KEYS.get(k, k)}={_name_value(k, cfg[k], same_method)}" for k in keys]
        names.append(" ".join(parts))
    out = [Group(name=n, config=c, runs=rs) for n, (c, rs) in zip(names, groups)]
    order = {f: i for i, (f, _) in enumerate(FAMILIES)}
    out.sort(key=lambda g: (order[g.family], g.method, g.name))
    return out


