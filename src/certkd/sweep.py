"""Grid sweeps (``certkd sweep``): a cartesian grid over config keys × seeds, trained one after
another in this process, one run directory per combination, resumable.

``run_sweep("sweeps/b", preset="digits-small", grid=["beta=0.1,0.3", "alpha=0.1,0.5"], seeds=[0, 1])``
trains ``sweeps/b/beta=0.1_alpha=0.1_seed=0`` … and writes ``sweeps/b/sweep.json`` (the runs and
their status) after every run. Calling it again skips finished combinations (latest checkpoint
epoch = ``epochs``), resumes partial ones and starts the rest; a combination whose folder holds
a run of another configuration is refused before anything trains.

Every combination is resolved and validated before the first run starts, so a typo in a key
(``--grid alpah=...``) or a bad value fails at once with a one-line :class:`CertkdError`.

A grid value is compared after parsing, as the config stores it: ``lr=0.001,1e-3`` or
``eps=2/255,0.00784313725490196`` name one value twice and are refused with one line naming both
(they would train the same configuration twice, which ``report`` would then average as two seeds).
Numbers equal to 9 significant digits count as the same value (:func:`same_value`), so a fraction
and its decimal expansion written to 9 or more digits are one value; ``eps=2/255,0.0078`` are two.
As a last check, two combinations that resolve to the same configuration are refused too.

While a run trains, the sweep holds its folder's lock (:func:`certkd.runs.lock_run_dir`) and decides
there whether to train, resume or skip it: two sweeps sharing an ``--out`` never train one run twice
at once, and one never restarts a run the other has just finished; a run locked by another process is
recorded as ``failed`` with the holder's name, and the sweep goes on.

Several devices: ``devices=["cuda:0", "cuda:1"]`` (``--devices cuda:0,cuda:1``) starts one
worker process per device (spawned, so CUDA initialises cleanly in each); the workers take the
pending combinations from one queue in grid order, each with ``device`` set to its own, and
only the parent process writes ``sweep.json``. A worker's log goes to ``out/NAME.log``. Each
worker gets this process's torch threads divided by the number of devices, so a run trains
with the same arithmetic (and weights) as in a sequential sweep with that thread count. Several
machines: run disjoint sweeps (different ``--grid`` values, same shared ``--out``).
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import multiprocessing
import re
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import yaml

from certkd import evaluation as _evaluation
from certkd import training as _training
from certkd.checkpoints import latest_checkpoint, read_meta
from certkd.config import TrainConfig, apply_overrides, resolve_config
from certkd.config import parse_sets as _parse_sets
from certkd.errors import CertkdError
from certkd.runs import (SWEEP_FILE, atomic_write_json, evaluation_path, find_config, is_run_dir, lock_run_dir,
                         resolve_device)

GridSpec = Union[Sequence[str], Mapping[str, Sequence[Any]]]
#: Keys that may differ between a stored run and the sweep without making it another run.
RUNTIME_KEYS = ("device",)


def split_values(text: str) -> List[str]:
    """Split ``a,b,[1, 2]`` on the commas outside brackets/braces."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [p.strip() for p in parts]


def _yaml_value(raw: str) -> Any:
    try:
        return yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        return raw


def parse_grid(grid: GridSpec) -> List[Tuple[str, List[Tuple[str, Any]]]]:
    """``["beta=0.1,0.3", ...]`` or ``{"beta": [0.1, 0.3]}`` → ``[("beta", [("0.1", 0.1), ("0.3", 0.3)]), ...]``.

    Keys are normalised ('-' → '_') and checked against :class:`TrainConfig` (did-you-mean on typos).
    """
    if isinstance(grid, Mapping):
        items = [(str(k), [(v if isinstance(v, str) else _name_value(v), _yaml_value(v) if isinstance(v, str) else v)
                           for v in (vals if isinstance(vals, (list, tuple)) else [vals])])
                 for k, vals in grid.items()]
    else:
        items = []
        for spec in grid:
            if "=" not in spec:
                raise CertkdError(f"--grid expects KEY=V1,V2,..., got '{spec}'")
            key, raw = spec.split("=", 1)
            values = split_values(raw)
            if not raw.strip() or any(v == "" for v in values):
                raise CertkdError(f"--grid {key.strip()}: empty value in '{raw}'; write e.g. --grid {key.strip()}=0.1,0.3")
            items.append((key.strip(), [(v, _yaml_value(v)) for v in values]))
    out: List[Tuple[str, List[Tuple[str, Any]]]] = []
    seen = set()
    for key, values in items:
        name = key.replace("-", "_")
        if name == "seed":
            raise CertkdError("put seeds in --seeds (e.g. --seeds 0,1,2), not in --grid")
        if name in seen:
            raise CertkdError(f"--grid {name} given twice; list all its values in one --grid {name}=V1,V2")
        if not values:
            raise CertkdError(f"--grid {name} has no values")
        apply_overrides(TrainConfig(), {name: values[0][1]})  # unknown key → did-you-mean; bad type → one line
        raws = [r for r, _ in values]
        if len(set(raws)) != len(raws):
            raise CertkdError(f"--grid {name} repeats a value ({', '.join(raws)})")
        _refuse_equal_values(name, values)
        seen.add(name)
        out.append((name, values))
    return out


#: Numbers that agree to this relative tolerance are one grid value (a fraction and its decimal expansion).
SAME_VALUE_REL_TOL = 1e-9


def same_value(a: Any, b: Any) -> bool:
    """Whether two parsed config values are the same: equal, or numbers equal to 9 significant digits
    (:data:`SAME_VALUE_REL_TOL`), element by element in lists and mappings."""
    if isinstance(a, bool) or isinstance(b, bool):  # True is not the number 1 here
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b or math.isclose(a, b, rel_tol=SAME_VALUE_REL_TOL, abs_tol=0.0)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return set(a) == set(b) and all(same_value(a[k], b[k]) for k in a)
    return a == b


def _refuse_equal_values(name: str, values: Sequence[Tuple[str, Any]]) -> None:
    """One line naming two values of ``--grid NAME`` that parse to the same config value."""
    parsed: List[Tuple[str, Any]] = []
    for raw, value in values:
        try:
            parsed.append((raw, getattr(apply_overrides(TrainConfig(), {name: value}), name)))
        except CertkdError:  # a bad value: plan_sweep names the combination it breaks
            continue
    for i, (raw_a, a) in enumerate(parsed):
        for raw_b, b in parsed[i + 1:]:
            if same_value(a, b):
                shown = f"{a:.9g}" if isinstance(a, float) else json.dumps(a, default=str)
                raise CertkdError(f"--grid {name} lists one value twice: {raw_a} and {raw_b} are both {shown} "
                                  f"(numbers equal to 9 significant digits are one value); list each value once")


def _name_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def parse_seeds(seeds: Union[None, str, Sequence[int]]) -> Optional[List[int]]:
    """``"0,1,2"`` → ``[0, 1, 2]``; None stays None (the config's seed)."""
    if seeds is None:
        return None
    if isinstance(seeds, str):
        try:
            values = [int(s) for s in split_values(seeds)]
        except ValueError:
            raise CertkdError(f"--seeds expects integers separated by commas (e.g. 0,1,2), got '{seeds}'") from None
    else:
        values = [int(s) for s in seeds]
    if not values:
        raise CertkdError("--seeds is empty; give e.g. --seeds 0,1,2")
    if len(set(values)) != len(values):
        raise CertkdError(f"--seeds repeats a seed ({seeds})")
    return values


def parse_sets(sets: Union[None, Sequence[str], Mapping[str, Any]]) -> Dict[str, Any]:
    """``["k=v", ...]`` (YAML values) or a mapping → dict: :func:`certkd.config.parse_sets`, the
    parser of ``certkd train --set`` too."""
    return _parse_sets(sets)


def _dir_part(raw: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", raw).strip("-") or "_"


@dataclass
class SweepRun:
    name: str
    path: Path
    overrides: Dict[str, Any]     # grid values of this combination (seed excluded)
    seed: int
    config: TrainConfig


def plan_sweep(out, preset: Optional[str] = None, grid: GridSpec = (), seeds=None, sets=None) -> List[SweepRun]:
    """Resolve and validate every combination (nothing is trained); raises on the first bad one."""
    axes = parse_grid(grid)
    fixed = {k.replace("-", "_"): v for k, v in parse_sets(sets).items()}
    for key, _ in axes:
        if key in fixed:
            raise CertkdError(f"'{key}' is both in --grid and --set; keep one")
    if "seed" in fixed and seeds is not None:
        raise CertkdError("'seed' is both in --set and --seeds; keep --seeds")
    seed_list = parse_seeds(seeds)
    if seed_list is None:
        seed_list = [resolve_config(preset, fixed).seed]
    runs: List[SweepRun] = []
    names: Dict[str, Dict[str, Any]] = {}
    configs: Dict[str, str] = {}  # resolved config → the first combination that has it
    for combo in itertools.product(*[values for _, values in axes]):
        overrides = {key: val for (key, _), (_, val) in zip(axes, combo)}
        label = "_".join(f"{key}={_dir_part(raw)}" for (key, _), (raw, _) in zip(axes, combo))
        for seed in seed_list:
            name = f"{label}_seed={seed}" if label else f"seed={seed}"
            if name in names:
                raise CertkdError(f"grid values {names[name]} and {overrides} give the same folder name '{name}'; "
                                  "use values that differ after removing '/' and spaces")
            names[name] = overrides
            try:
                cfg = resolve_config(preset, dict(fixed, **overrides, seed=seed))
            except CertkdError as e:
                raise CertkdError(f"sweep combination {name}: {e}") from None
            key = json.dumps(cfg.to_dict(), sort_keys=True, default=str)
            if key in configs:
                raise CertkdError(f"sweep combinations {configs[key]} and {name} resolve to the same configuration, "
                                  "which would train it twice; drop one of the grid values")
            configs[key] = name
            runs.append(SweepRun(name=name, path=Path(out) / name, overrides=overrides, seed=seed, config=cfg))
    return runs


def _config_difference(stored: TrainConfig, wanted: TrainConfig) -> Optional[str]:
    a, b = stored.to_dict(), wanted.to_dict()
    for k in a:
        if k not in RUNTIME_KEYS and a[k] != b[k]:
            return f"{k}={a[k]!r} there, {b[k]!r} in this sweep"
    return None


def run_state(run: SweepRun) -> Tuple[str, Optional[int]]:
    """("new" | "partial" | "done", latest epoch) of one combination; raises if the folder holds another run."""
    ck = latest_checkpoint(run.path)
    if ck is None:
        return "new", None
    stored = find_config(run.path, fix="restore it, or delete that folder")
    if stored is not None:
        diff = _config_difference(stored, run.config)
        if diff:
            raise CertkdError(f"{run.path} holds a run of another configuration ({diff}); use another --out or "
                              "delete that folder")
    epoch = int(read_meta(ck).get("epoch", 0))
    return ("done" if epoch >= run.config.epochs else "partial"), epoch


def sweep_command(out, preset, grid: GridSpec, seeds, sets, evaluate: bool, eval_limit: Optional[int]) -> str:
    args = ["certkd", "sweep"]
    if preset:
        args += ["--preset", str(preset)]
    for key, values in parse_grid(grid):
        args += ["--grid", f"{key}=" + ",".join(raw for raw, _ in values)]
    if seeds is not None:
        args += ["--seeds", ",".join(str(s) for s in parse_seeds(seeds))]
    if isinstance(sets, Mapping):
        args += [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    else:
        args += [a for item in (sets or ()) for a in ("--set", item)]
    args += ["--out", str(out)]
    if evaluate:
        args.append("--evaluate")
        if eval_limit is not None:
            args += ["--eval-limit", str(eval_limit)]
    return " ".join(shlex.quote(a) for a in args)


def _run_one(run: SweepRun, state: str, evaluate: bool, eval_limit: Optional[int], progress: bool,
             log: Callable[[str], None]) -> Dict[str, Any]:
    """Train (resume, or skip) and evaluate one combination; returns the fields of its sweep entry.

    Holds the run's lock throughout, and decides under it whether to train, resume or skip (``state``
    was read before: another sweep sharing ``--out`` may have trained the run since)."""
    if state == "done" and not evaluate:
        return _run_locked(run, state, evaluate, eval_limit, progress, log)
    with lock_run_dir(run.path, "certkd sweep"):
        state, _ = run_state(run)
        return _run_locked(run, state, evaluate, eval_limit, progress, log)


def _run_locked(run: SweepRun, state: str, evaluate: bool, eval_limit: Optional[int], progress: bool,
                log: Callable[[str], None]) -> Dict[str, Any]:
    upd: Dict[str, Any] = {}
    if state == "partial":
        upd["action"] = "resumed"
        _training.train(run.config, run.path, resume=True, progress=progress, log=log)
    elif state == "new":
        upd["action"] = "trained"
        _training.train(run.config, run.path, force=True, progress=progress, log=log)
    else:
        upd["action"] = "skipped"
    ck = latest_checkpoint(run.path)
    upd["epoch"] = int(read_meta(ck)["epoch"]) if ck is not None else None
    if evaluate:
        ev = _evaluation_summary(run.path, upd["epoch"])
        if ev is None:
            log(f"{run.name}: evaluating")
            _evaluation.evaluate_run(run.path, limit=eval_limit, device=run.config.device)
            ev = _evaluation_summary(run.path, upd["epoch"])
        upd["evaluation"] = ev
    return upd


_WORKER_DEVICE: Optional[str] = None


def _init_worker(devices: "multiprocessing.Queue", threads: int) -> None:
    import torch

    global _WORKER_DEVICE
    _WORKER_DEVICE = devices.get()
    torch.set_num_threads(threads)


def _worker_run(run: SweepRun, state: str, evaluate: bool, eval_limit: Optional[int], log_path: str) -> Dict[str, Any]:
    """In a device worker: one combination on this worker's device, logging to ``log_path``."""
    run = dataclasses.replace(run, config=dataclasses.replace(run.config, device=_WORKER_DEVICE))
    with open(log_path, "a") as fh:
        def log(line: str) -> None:
            fh.write(line + "\n")
            fh.flush()
        log(f"{run.name} on {_WORKER_DEVICE}")
        try:
            upd = _run_one(run, state, evaluate, eval_limit, False, log)
        except CertkdError as e:
            log(f"failed: {e}")
            return {"status": "failed", "error": str(e), "device": _WORKER_DEVICE}
    upd.update(status="complete", error=None, device=_WORKER_DEVICE)
    return upd


def parse_devices(devices: Union[None, str, Sequence[str]]) -> Optional[List[str]]:
    if devices is None:
        return None
    items = [d.strip() for d in (devices.split(",") if isinstance(devices, str) else devices) if d.strip()]
    if not items:
        raise CertkdError("--devices is empty; give e.g. cuda:0,cuda:1")
    for d in items:
        resolve_device(d)  # one-line error for unknown / unavailable devices
    return items


def run_sweep(out, preset: Optional[str] = None, grid: GridSpec = (), seeds=None, sets=None, *,
              evaluate: bool = False, eval_limit: Optional[int] = None, progress: bool = False,
              log: Callable[[str], None] = print, devices: Union[None, str, Sequence[str]] = None) -> Dict[str, Any]:
    """Train (and with ``evaluate`` evaluate) every combination of ``grid`` × ``seeds`` in ``out``.

    Finished combinations are skipped, partial ones resumed (``train(..., resume=True)``). A
    combination that fails with a :class:`CertkdError` (e.g. a diverging loss) is recorded as
    ``failed`` and the sweep goes on. ``out/sweep.json`` is rewritten after every run; the
    returned dict is its content (``runs``: name, dir, overrides, seed, status, action, epoch,
    epochs, evaluation, error; ``counts`` per status). ``devices``: one worker process per device
    (see the module notes); None trains in this process on each config's own device.
    """
    out = Path(out)
    device_list = parse_devices(devices)
    if out.exists() and not out.is_dir():
        raise CertkdError(f"--out {out} exists and is not a directory; choose another --out")
    if is_run_dir(out):
        raise CertkdError(f"--out {out} is a run directory; a sweep needs a folder of its own (e.g. sweeps/name)")
    runs = plan_sweep(out, preset, grid, seeds, sets)
    states = [run_state(r) for r in runs]  # refuses foreign runs before anything trains
    axes = parse_grid(grid)
    summary: Dict[str, Any] = {
        "command": sweep_command(out, preset, grid, seeds, sets, evaluate, eval_limit),
        "preset": preset, "grid": {k: [v for _, v in vals] for k, vals in axes}, "grid_keys": [k for k, _ in axes],
        "seeds": sorted({r.seed for r in runs}, key=[r.seed for r in runs].index),
        "sets": parse_sets(sets), "evaluate": evaluate, "eval_limit": eval_limit,
        "devices": device_list,
        "note": ("runs train sequentially in one process" if not device_list else
                 f"one worker process per device ({', '.join(device_list)}); logs in NAME.log"),
        "runs": [{"name": r.name, "dir": r.name, "overrides": r.overrides, "seed": r.seed, "epochs": r.config.epochs,
                  "epoch": epoch, "status": "complete" if state == "done" else "pending", "action": None,
                  "evaluation": _evaluation_summary(r.path, epoch), "error": None}
                 for r, (state, epoch) in zip(runs, states)],
    }

    def write() -> None:
        counts: Dict[str, int] = {}
        for entry in summary["runs"]:
            counts[entry["status"]] = counts.get(entry["status"], 0) + 1
        summary["counts"] = counts
        summary["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        atomic_write_json(out / SWEEP_FILE, summary)

    out.mkdir(parents=True, exist_ok=True)
    write()
    if device_list:
        _run_on_devices(out, runs, states, summary, write, device_list, evaluate, eval_limit, log)
        return summary
    total = len(runs)
    for i, (run, (state, epoch), entry) in enumerate(zip(runs, states, summary["runs"]), 1):
        tag = f"[{i}/{total}] {run.name}"
        try:
            if state == "done":
                log(f"{tag}: complete (epoch {epoch}/{run.config.epochs}), skipped")
            else:
                entry["status"] = "running"
                write()
                log(f"{tag}: resuming from epoch {epoch}/{run.config.epochs}" if state == "partial" else
                    f"{tag}: training {run.config.method}, {run.config.epochs} epochs")
            entry.update(_run_one(run, state, evaluate, eval_limit, progress, log))
            entry["status"] = "complete"
            entry["error"] = None
        except CertkdError as e:
            entry["status"], entry["error"] = "failed", str(e)
            log(f"{tag}: failed: {e}")
        except BaseException as e:
            entry["status"] = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
            entry["error"] = f"{type(e).__name__}: {e}"
            write()
            raise
        write()
    return summary


def _run_on_devices(out: Path, runs: List[SweepRun], states, summary: Dict[str, Any], write: Callable[[], None],
                    devices: List[str], evaluate: bool, eval_limit: Optional[int],
                    log: Callable[[str], None]) -> None:
    from concurrent.futures import ProcessPoolExecutor, as_completed

    import torch

    ctx = multiprocessing.get_context("spawn")
    threads = max(1, torch.get_num_threads() // len(devices))  # the workers share this process's CPU threads
    queue = ctx.Queue()
    for d in devices:
        queue.put(d)
    todo = [(r, st, entry) for r, (st, _), entry in zip(runs, states, summary["runs"])
            if st != "done" or (evaluate and entry["evaluation"] is None)]
    for r, (st, epoch), entry in zip(runs, states, summary["runs"]):
        if st == "done" and not (evaluate and entry["evaluation"] is None):
            entry["action"] = "skipped"
            log(f"{r.name}: complete (epoch {epoch}/{r.config.epochs}), skipped")
    if not todo:
        write()
        return
    with ProcessPoolExecutor(max_workers=min(len(devices), len(todo)), mp_context=ctx,
                             initializer=_init_worker, initargs=(queue, threads)) as pool:
        futures = {}
        for r, st, entry in todo:
            entry["status"] = "queued"
            futures[pool.submit(_worker_run, r, st, evaluate, eval_limit, str(out / f"{r.name}.log"))] = (r, entry)
        write()
        done = 0
        for fut in as_completed(futures):
            r, entry = futures[fut]
            done += 1
            try:
                entry.update(fut.result())
            except Exception as e:  # a crashed worker process or an unexpected error in it
                entry["status"], entry["error"] = "failed", f"{type(e).__name__}: {e}"
            msg = entry["status"] + (f": {entry['error']}" if entry.get("error") else "")
            log(f"[{done}/{len(todo)}] {r.name} on {entry.get('device', '?')}: {msg}")
            write()


def _evaluation_summary(run_dir: Path, epoch: Optional[int]) -> Optional[Dict[str, Any]]:
    """evaluation.json of a run when it matches the latest checkpoint epoch, else None."""
    import json

    path = evaluation_path(run_dir)
    if epoch is None or not path.exists():
        return None
    try:
        ev = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(ev, dict) or ev.get("checkpoint_epoch") not in (None, epoch):
        return None
    return {k: ev.get(k) for k in ("clean_accuracy", "pgd_accuracy", "ibp_verified_accuracy", "eps", "n")}
