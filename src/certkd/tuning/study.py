"""The study of ``certkd tune`` in its storage, and the loop that runs trials until it has N (docs/tune.md §4).

Storage: ``sqlite:///OUT/study.db`` by default; ``--storage URL`` names any database Optuna's RDB
storage supports (PostgreSQL, MySQL, ...), so that processes on several machines work on one study.
Every process runs its own trials one after another; Optuna's storage hands out trial numbers and
the sampler reads every finished trial, so no trial is run twice.

Resuming: rerunning the same command loads the study (``load_if_exists``) and runs trials until
``n_trials`` are complete or pruned. A process killed mid-trial leaves a RUNNING trial; its heartbeat
stops, and once it is older than the grace period the next process to look fails it and re-queues its
parameters (Optuna's ``RetryHeartbeatStaleTrialCallback``), so the killed trial is retried.

A study records what it searches (preset, ``--set`` values, space, objective) as user attributes; a
rerun or a second process with other settings is refused, not mixed into it.
"""
from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional

from certkd.config import resolve_config
from certkd.errors import CertkdError
from certkd.tuning import TUNE_FILE, require_optuna
from certkd.tuning.objective import TRIALS_DIR, Objective, run_trial
from certkd.tuning.space import SearchSpace

STUDY_FILE = "study.db"
DEFAULT_STUDY_NAME = "certkd-tune"
DEFAULT_VAL_FRACTION = 0.2
STORAGE_ATTEMPTS = 5  # tries to open a storage that another process may be creating
MAX_FAILURES = 3  # failed trials in a row after which a process stops
PRUNERS = ("median", "percentile:Q", "threshold:LOWER", "hyperband", "none")


@dataclass
class TuneSettings:
    """Everything one ``certkd tune`` process needs."""

    out: Path
    space: SearchSpace
    objective: Objective
    n_trials: int
    preset: Optional[str] = None
    sets: Dict[str, Any] = field(default_factory=dict)
    storage: Optional[str] = None          # None: sqlite:///OUT/study.db
    study_name: str = DEFAULT_STUDY_NAME
    pruner: Optional[str] = None           # None: median for one objective, none for several
    prune_warmup: int = 1                  # epochs reported before a trial may be pruned
    prune_startup: int = 3                 # trials finished before any is pruned
    sampler_seed: Optional[int] = None
    heartbeat: int = 30                    # seconds; a trial silent for 2× this is failed and retried


def storage_url(out: Path, storage: Optional[str]) -> str:
    """``storage``, or the SQLite file in the tune folder ``out``."""
    return storage or f"sqlite:///{Path(out).resolve() / STUDY_FILE}"


def make_storage(url: str, heartbeat: Optional[int] = None) -> Any:
    """Optuna's RDB storage of ``url``, with heartbeats (every ``heartbeat`` s; stale after 2×) and the
    retry of stale trials. SQLite waits up to 60 s for a lock, as two processes share the file."""
    optuna = require_optuna()
    storages = optuna.storages
    kwargs: Dict[str, Any] = {}
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if heartbeat is not None:
            retry = retry_cls_or_old(storages)
            key = ("heartbeat_stale_trial_callback" if retry.__name__.startswith("RetryHeartbeat")
                   else "failed_trial_callback")  # the name before optuna 4.9
            kwargs = {"heartbeat_interval": heartbeat, "grace_period": 2 * heartbeat, key: retry(max_retry=3)}
        for attempt in range(STORAGE_ATTEMPTS):
            try:
                return storages.RDBStorage(url, engine_kwargs=engine, **kwargs)
            except (ImportError, ValueError) as e:
                raise CertkdError(f"--storage {url}: Optuna cannot open it ({str(e).splitlines()[0]}); pass a "
                                  "database URL such as sqlite:///study.db or postgresql://user@host/db") from None
            except Exception as e:  # sqlalchemy's errors: an unreachable server, a bad path, or a race
                # two processes creating the tables at once: one wins (a unique-constraint error for the
                # other), which then finds them on the next try
                if attempt + 1 < STORAGE_ATTEMPTS and type(e).__name__ in ("IntegrityError", "OperationalError"):
                    time.sleep(0.5 * (attempt + 1))
                    continue
                raise CertkdError(f"--storage {url}: cannot connect ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:200]}); check the URL and that the database is up"
                                  ) from None
        raise AssertionError("unreachable")


def retry_cls_or_old(storages: Any) -> Any:
    """Optuna's callback that re-queues a stale trial (renamed in optuna 4.9)."""
    return getattr(storages, "RetryHeartbeatStaleTrialCallback", None) or storages.RetryFailedTrialCallback


def make_pruner(spec: Optional[str], multi: bool, warmup: int = 1, startup: int = 3) -> Any:
    """The Optuna pruner of ``--pruner`` (``median``, ``percentile:25``, ``threshold:0.5``, ``hyperband``,
    ``none``); None (the default) is median for one objective and none for several. ``warmup``: a trial
    is not pruned in its first ``warmup`` epochs (trials report epochs 1, 2, ... as steps); ``startup``:
    trials finished before any is pruned (median, percentile)."""
    optuna = require_optuna()
    pruners = optuna.pruners
    name, _, arg = (spec or ("none" if multi else "median")).partition(":")
    if name not in ("median", "percentile", "threshold", "hyperband", "none"):
        raise CertkdError(f"--pruner {spec}: unknown pruner; choose one of: {', '.join(PRUNERS)}")
    if name == "none":
        return pruners.NopPruner()
    if multi:
        raise CertkdError(f"--pruner {spec}: Optuna cannot prune a multi-objective (Pareto) study; pass "
                          "--pruner none or a single --objective")
    if warmup < 0 or startup < 0:
        raise CertkdError("--prune-warmup and --prune-startup must be >= 0")
    needs_arg = name in ("percentile", "threshold")
    if needs_arg != bool(arg):
        raise CertkdError(f"--pruner {spec}: " + (f"write {name}:NUMBER, e.g. percentile:25 or threshold:0.5"
                                                   if needs_arg else f"{name} takes no argument"))
    if name == "median":
        return pruners.MedianPruner(n_startup_trials=startup, n_warmup_steps=warmup + 1)
    if name == "hyperband":
        return pruners.HyperbandPruner(min_resource=warmup + 1)
    try:
        x = float(arg)
    except ValueError:
        raise CertkdError(f"--pruner {spec}: '{arg}' is not a number") from None
    if name == "percentile":
        if not 0 <= x <= 100:
            raise CertkdError(f"--pruner {spec}: the percentile must be in [0, 100]")
        return pruners.PercentilePruner(x, n_startup_trials=startup, n_warmup_steps=warmup + 1)
    return pruners.ThresholdPruner(lower=x, n_warmup_steps=warmup + 1)


def _study_attrs(s: TuneSettings) -> Dict[str, Any]:
    return {"certkd_preset": s.preset, "certkd_sets": s.sets, "certkd_space": s.space.to_dict(),
            "certkd_objective": s.objective.text}


def open_study(s: TuneSettings) -> Any:
    """Create the study, or load it when it exists with the same settings (else a one-line error)."""
    optuna = require_optuna()
    storage = make_storage(storage_url(s.out, s.storage), s.heartbeat)
    directions = ["maximize"] * len(s.objective.sums)
    pruner = make_pruner(s.pruner, s.objective.multi, s.prune_warmup, s.prune_startup)
    sampler = (optuna.samplers.NSGAIISampler if s.objective.multi else optuna.samplers.TPESampler)(
        seed=s.sampler_seed)
    names = {st.study_name for st in storage.get_all_studies()}
    if s.study_name not in names and any((Path(s.out) / TRIALS_DIR).glob("trial-*")):
        raise CertkdError(f"{s.out} holds trials of another study than '{s.study_name}' in {storage.url}; choose "
                          "another --out (or the --storage/--study-name that the trials belong to)")
    study = optuna.create_study(storage=storage, study_name=s.study_name, directions=directions, pruner=pruner,
                                sampler=sampler, load_if_exists=True)
    wanted = _study_attrs(s)
    have = study.user_attrs
    if not have:
        for k, v in wanted.items():
            study.set_user_attr(k, v)
    else:
        differ = [k[len("certkd_"):] for k, v in wanted.items() if json.dumps(have.get(k), sort_keys=True) !=
                  json.dumps(v, sort_keys=True)]
        if differ:
            raise CertkdError(f"study '{s.study_name}' in {storage.url} was started with another "
                              f"{', '.join(differ)}; rerun with the same settings to resume it, or choose another "
                              "--out or --study-name")
        if len(study.directions) != len(directions):
            raise CertkdError(f"study '{s.study_name}' has {len(study.directions)} objectives; pass the same "
                              "--objective to resume it")
    return study


def trial_counts(study: Any) -> Dict[str, int]:
    """``{state: number of trials}`` of a study, states lower-case (complete, pruned, running, fail, waiting)."""
    counts: Dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name.lower()] = counts.get(t.state.name.lower(), 0) + 1
    return counts


def write_tune_file(s: TuneSettings) -> Path:
    """``OUT/tune.json``: where the study is (what ``certkd report OUT`` reads)."""
    from certkd.checkpoints import atomic_write_text

    path = Path(s.out) / TUNE_FILE
    atomic_write_text(path, json.dumps({"storage": s.storage, "study_name": s.study_name,
                                        "objective": s.objective.text}, indent=1) + "\n")
    return path


def _trial(trial: Any, s: TuneSettings, sets: Mapping[str, Any], log: Callable[[str], None]) -> Any:
    """One trial of :func:`run_trial`, its outcome logged in one line (a failure also stored with it)."""
    import optuna

    try:
        return run_trial(trial, out=Path(s.out), preset=s.preset, sets=sets, space=s.space, objective=s.objective,
                         log=log)
    except optuna.TrialPruned as e:
        log(f"trial {trial.number}: {e}")
        raise
    except CertkdError as e:
        trial.set_user_attr("error", str(e))
        log(f"trial {trial.number} failed: {e}")
        raise


def run_tune(s: TuneSettings, log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Run trials in this process until the study has ``n_trials`` complete or pruned ones.

    Before each trial the process fails stale trials (their parameters are queued again) and stops when
    the finished trials plus those other processes are running reach ``n_trials``; it then waits for
    those to end, so that a crashed process's trial is retried here. Returns the final counts.
    """
    optuna = require_optuna()
    with warnings.catch_warnings():  # heartbeats and stale-trial retries are "experimental" in Optuna
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return _run_tune(s, log)


def _run_tune(s: TuneSettings, log: Callable[[str], None]) -> Dict[str, Any]:
    import optuna

    from certkd.runs import ensure_writable_dir

    if s.n_trials < 1:
        raise CertkdError(f"--trials must be >= 1, got {s.n_trials}")
    make_pruner(s.pruner, s.objective.multi, s.prune_warmup, s.prune_startup)  # its errors before any writing
    sets = dict(s.sets)
    base = resolve_config(s.preset, sets)
    if base.val_fraction == 0:  # the objective needs a validation split
        sets["val_fraction"] = DEFAULT_VAL_FRACTION
        base = resolve_config(s.preset, sets)
    s.sets = sets
    s.space.check(base)
    ensure_writable_dir(s.out, create=True)
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # a failed trial is one line of ours, not a traceback
    study = open_study(s)
    write_tune_file(s)
    done_states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    ran = failed = 0
    while True:
        optuna.storages.fail_stale_trials(study)
        counts = trial_counts(study)
        done = counts.get("complete", 0) + counts.get("pruned", 0)
        if done >= s.n_trials:
            break
        if done + counts.get("running", 0) >= s.n_trials:  # the rest are running elsewhere: wait for them
            time.sleep(min(5, s.heartbeat))
            continue
        mine: list = []
        study.optimize(lambda t: _trial(t, s, sets, log), n_trials=1, catch=(CertkdError,),
                       callbacks=[lambda _study, trial: mine.append(trial)])
        ran += 1
        failed = failed + 1 if mine and mine[0].state == optuna.trial.TrialState.FAIL else 0
        if failed and (failed >= MAX_FAILURES or not study.get_trials(deepcopy=False, states=done_states)):
            raise CertkdError(f"trial {mine[0].number} failed{' before any trial finished' if failed == 1 else ''} "
                              f"({failed} in a row here): {mine[0].user_attrs.get('error', 'see above')}; fix the "
                              "settings or the space and rerun the same command")
    counts = trial_counts(study)
    return {"counts": counts, "ran": ran, "study": study, "done": sum(counts.get(k, 0) for k in ("complete", "pruned"))}
