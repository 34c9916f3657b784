"""The ``certkd tune`` command: Optuna search over config keys (docs/tune.md); the work is in :mod:`certkd.tuning`."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import click

from certkd.cli_train import THREADS_OPTION, _apply_threads
from certkd.config import parse_sets


@click.command()
@click.option("--preset", help="Preset name or YAML file every trial starts from, as in certkd train.")
@click.option("--space", "space_path", required=True, type=click.Path(),
              help="YAML search space: config keys mapped to {low, high, log, step} ranges or {choices: [...]}.")
@click.option("--objective", default="ibp", show_default=True,
              help="Validation metric(s) to maximise: clean, pgd, ibp (IBP-verified), a weighted sum such as "
                   "0.3*clean+0.7*ibp, or several separated by commas for a Pareto search (no pruning).")
@click.option("--trials", "n_trials", type=int, default=20, show_default=True,
              help="Complete or pruned trials the study should have (over all processes sharing it).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override for every trial (repeatable). val_fraction defaults to 0.2: the last 20 percent of the "
                   "training set is the validation split the objective is measured on.")
@click.option("--out", required=True, type=click.Path(),
              help="Tune folder: study.db (the default storage), tune.json and trials/trial-NNNN run folders.")
@click.option("--storage", help="Optuna storage URL (default sqlite:///OUT/study.db), e.g. postgresql://host/db "
                                "for processes on several machines.")
@click.option("--study-name", default="certkd-tune", show_default=True, help="Study name in the storage.")
@click.option("--pruner", help="median (default; none for a Pareto search), percentile:Q, threshold:LOWER, hyperband "
                               "or none.")
@click.option("--prune-warmup", type=int, default=1, show_default=True,
              help="Epochs a trial reports before it may be pruned.")
@click.option("--prune-startup", type=int, default=3, show_default=True,
              help="Trials that finish before median/percentile pruning starts.")
@click.option("--seed", "sampler_seed", type=int, help="Seed of the sampler (leave it unset when processes share "
                                                        "a study: equal seeds propose equal trials).")
@click.option("--heartbeat", type=click.IntRange(min=1), default=30, show_default=True,
              help="Seconds between a running trial's heartbeats; a trial silent for twice this (its process "
                   "was killed) is failed and its parameters are tried again.")
@THREADS_OPTION
def tune(preset: Optional[str], space_path: str, objective: str, n_trials: int, sets: Sequence[str], out: str,
         storage: Optional[str], study_name: str, pruner: Optional[str], prune_warmup: int, prune_startup: int,
         sampler_seed: Optional[int], heartbeat: int, threads: Optional[int]) -> None:
    """Search config keys with Optuna, on a validation split held out of the training set.

    Resumable: rerun the same command to continue the study. Several processes (or machines, with
    --storage) running the same command share one study and run different trials.
    """
    from certkd.tuning import require_optuna

    require_optuna()  # before any other work: one line naming the extra
    from certkd.tuning.objective import parse_objective
    from certkd.tuning.space import load_space
    from certkd.tuning.study import TuneSettings, run_tune

    settings = TuneSettings(out=Path(out), space=load_space(space_path), objective=parse_objective(objective),
                            n_trials=n_trials, preset=preset, sets=parse_sets(sets), storage=storage,
                            study_name=study_name, pruner=pruner, prune_warmup=prune_warmup,
                            prune_startup=prune_startup, sampler_seed=sampler_seed, heartbeat=heartbeat)
    _apply_threads(threads)
    s = run_tune(settings, log=click.echo)
    counts = ", ".join(f"{v} {k}" for k, v in sorted(s["counts"].items()))
    click.echo(f"study '{study_name}': {counts} ({s['ran']} run by this process)")
    click.echo(f"report it with: certkd report {out} --out {Path(out) / 'report'}")
