"""The report of a ``certkd tune`` folder (``certkd report TUNE_DIR``, docs/tune.md §5).

Writes, from the study alone (so a study in a shared ``--storage`` reports the same from any machine):

* ``history.png`` (``history-K.png`` per objective of a Pareto search): Optuna's optimisation history;
* ``importances.png`` (``-K`` likewise): Optuna's parameter importances (fANOVA), when at least two
  complete trials vary a parameter;
* ``intermediate.png``: each trial's validation value per epoch (one objective: where pruning cut);
  ``pareto.png``: the Pareto front (two or three objectives);
* ``best.yaml``: the best trial's whole configuration as a preset (``certkd train --preset best.yaml``);
  for a Pareto search ``pareto/trial-NNNN.yaml``, one per trial on the front;
* ``trials.csv`` (one row per trial) and ``report.md``.
"""
from __future__ import annotations

import csv
import io
import json
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import yaml

from certkd.checkpoints import atomic_write_text
from certkd.errors import CertkdError
from certkd.reporting.plots import _pyplot, _save_png
from certkd.tuning import TUNE_FILE



def is_tune_dir(path: Any) -> bool:
    """Whether ``path`` is a ``certkd tune`` output folder (it holds ``tune.json``)."""
    return (Path(path) / TUNE_FILE).is_file()


def load_tune_study(tune_dir: Any) -> Any:
    """The Optuna study of a tune folder (read from its ``tune.json``), or a one-line CertkdError."""
    from certkd.tuning import require_optuna
    from certkd.tuning.study import make_storage, storage_url

    optuna = require_optuna()
    path = Path(tune_dir) / TUNE_FILE
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        name = str(info["study_name"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CertkdError(f"{path} is not a readable tune file ({type(e).__name__}); rerun certkd tune with the "
                          "same --out to rewrite it") from None
    storage = make_storage(storage_url(Path(tune_dir), info.get("storage")))
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        raise CertkdError(f"no study '{name}' in {storage.url} (named by {path}); check --storage") from None


def preset_text(trial: Any, study_name: str, objective: str) -> str:
    """A trial's resolved configuration as preset YAML, headed by a comment naming where it came from."""
    values = trial.values if trial.values is not None else []
    shown = ", ".join(f"{v:.4f}" for v in values)
    head = (f"# Trial {trial.number} of certkd tune study '{study_name}': validation {objective} = {shown}.\n"
            "# The whole resolved configuration; val_fraction holds out the validation split it was tuned on\n"
            "# (set it to 0 to train on the whole training set).\n")
    return head + yaml.safe_dump(trial.user_attrs["config"], sort_keys=False)


def _trials_csv(study: Any, names: List[str]) -> str:
    params = sorted({k for t in study.trials for k in t.params})
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["number", "state"] + names + ["epochs_reported"] + params + ["duration_s"])
    for t in study.trials:
        vals = list(t.values) if t.values is not None else [""] * len(names)
        dur = t.duration.total_seconds() if t.duration is not None else ""
        w.writerow([t.number, t.state.name.lower()] + vals + [len(t.intermediate_values)]
                   + [t.params.get(k, "") for k in params] + [dur])
    return buf.getvalue()


def _save_axes(ax: Any, path: Path, files: List[Path]) -> None:
    fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
    _save_png(fig, path)
    _pyplot().close(fig)
    files.append(path)


def _plot(draw: Callable[[], Any], path: Path, files: List[Path], notes: List[str], what: str) -> None:
    try:
        _save_axes(draw(), path, files)
    except (ValueError, RuntimeError, ZeroDivisionError) as e:  # too few trials, or no parameter varies
        notes.append(f"no {what}: {str(e).splitlines()[0]}")


def write_tune_report(tune_dir: Any, out_dir: Any) -> Dict[str, Any]:
    """Write the plots, best preset(s), ``trials.csv`` and ``report.md`` of a tune folder into ``out_dir``."""
    from certkd.tuning import require_optuna
    from certkd.tuning.study import trial_counts

    optuna = require_optuna()
    out = Path(out_dir)
    study = load_tune_study(tune_dir)
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
        raise CertkdError(f"study '{study.study_name}' has no complete trial yet; run certkd tune --out {tune_dir} "
                          "until one finishes")
    names = str(study.user_attrs.get("certkd_objective", "objective")).split(",")
    multi = len(study.directions) > 1
    _pyplot()  # matplotlib present, Agg backend
    from optuna.visualization import matplotlib as ovm

    files: List[Path] = []
    notes: List[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        for i, name in enumerate(names):
            suffix = f"-{i + 1}" if multi else ""
            target: Optional[Callable] = (lambda t, i=i: t.values[i]) if multi else None
            _plot(lambda: ovm.plot_optimization_history(study, target=target, target_name=name),
                  out / f"history{suffix}.png", files, notes, f"history of {name}")
            _plot(lambda: ovm.plot_param_importances(study, evaluator=optuna.importance.FanovaImportanceEvaluator(
                      seed=0), target=target, target_name=name),
                  out / f"importances{suffix}.png", files, notes, f"parameter importances of {name}")
        if multi and len(names) in (2, 3):
            _plot(lambda: ovm.plot_pareto_front(study, target_names=names), out / "pareto.png", files, notes,
                  "Pareto front")
        if not multi:
            _plot(lambda: ovm.plot_intermediate_values(study), out / "intermediate.png", files, notes,
                  "intermediate values")

    objective = ",".join(names)
    best = study.best_trials if multi else [study.best_trial]
    presets = []
    for t in best:
        path = out / ("pareto" if multi else "") / (f"trial-{t.number:04d}.yaml" if multi else "best.yaml")
        atomic_write_text(path, preset_text(t, study.study_name, objective))
        presets.append(path)
    atomic_write_text(out / "trials.csv", _trials_csv(study, names))
    files += presets + [out / "trials.csv"]

    counts = trial_counts(study)
    md = [f"# certkd tune: study '{study.study_name}'", "",
          f"Objective (maximised, on the validation split): {objective}. Trials: "
          + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) + ".", ""]
    md += [f"![{p.stem}]({p.name})" for p in files if p.suffix == ".png"] + [""]
    md += ["## Best" + (" (the Pareto front)" if multi else ""), ""]
    for t, p in zip(best, presets):
        vals = ", ".join(f"{n} {v:.4f}" for n, v in zip(names, t.values))
        params = ", ".join(f"{k}={v}" for k, v in t.params.items())
        md.append(f"- trial {t.number}: {vals}; {params}; preset `{p.relative_to(out)}`: "
                  f"`certkd train --preset {p} --out RUN`")
    if notes:
        md += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    atomic_write_text(out / "report.md", "\n".join(md) + "\n")
    files.insert(0, out / "report.md")
    return {"report": str(out / "report.md"), "files": [str(f) for f in files], "best": [str(p) for p in presets],
            "counts": counts, "notes": notes}
