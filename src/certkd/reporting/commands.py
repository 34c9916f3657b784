"""Reconstructed commands: the ``certkd train`` / ``teacher`` / ``sweep`` / ``evaluate`` / ``verify``
lines that reproduce a run, written with the flags of the option table (:mod:`certkd.options`)
and each checked with the planning of :mod:`certkd.run_plan`, the one the command line resolves
its arguments with, before it is written into a report.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shlex
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from certkd.config import TrainConfig, base_config, rescale_schedule
from certkd.errors import CertkdError
from certkd.options import command_options, option
from certkd.reporting.groups import Group
from certkd.reporting.records import RunRecord
from certkd.run_plan import SET, TrainRequest, parse_sweep_command
from certkd.runs import SWEEP_FILE


def _set_value(value: Any) -> str:
    """A --set value that the CLI (yaml.safe_load, then the field's type) reads back as ``value``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(", ", ": "))
    if isinstance(value, str):
        try:
            same = yaml.safe_load(value) == value
        except yaml.YAMLError:
            same = False
        return value if same and value.strip() == value and value else json.dumps(value)
    return str(value)


def _flag_says(key: str, value: Any, command: str) -> bool:
    """Whether the key's own flag in ``certkd COMMAND`` can say ``value`` (a boolean flag only turns a key
    on; a flag with choices takes only those)."""
    if isinstance(value, bool):
        return value
    allowed = option(key).allowed(command)
    return not allowed or value in allowed


def _train_request(cfg: TrainConfig, base: TrainConfig, command: str = "train",
                   preset: Optional[str] = None) -> Optional[TrainRequest]:
    """The ``certkd COMMAND`` request (train or teacher) turning ``base`` (``preset`` resolved) into ``cfg``
    (None when a key cannot be expressed, e.g. a value back to None): the command's flags of the option
    table (:mod:`certkd.options`) where they can say the value, ``--set key=value`` otherwise.

    A different ``--epochs`` rescales the base's schedule (:func:`certkd.config.rescale_schedule`), so
    schedule keys are compared with the rescaled base: only those that differ from it need a ``--set``.
    """
    if cfg.epochs != base.epochs:
        base = dataclasses.replace(rescale_schedule(base, cfg.epochs), epochs=base.epochs)
    target, ref = cfg.to_dict(), base.to_dict()
    flagged = {opt.key for opt in command_options(command, flagged=True)}
    given: List[Tuple[str, Any]] = []
    for f in dataclasses.fields(TrainConfig):
        key, v = f.name, target[f.name]
        if v == ref[key] and type(v) is type(ref[key]):
            continue
        if v is None:  # resolve_config ignores None overrides
            return None
        given.append((key, v) if key in flagged and _flag_says(key, v, command) else (SET, f"{key}={_set_value(v)}"))
    return TrainRequest(command, preset, tuple(given))


def _resolves_to(request: TrainRequest, cfg: TrainConfig) -> bool:
    """Whether ``request`` resolves to ``cfg`` as the command line would resolve it (:meth:`TrainRequest.config`)."""
    try:
        return request.config().to_dict() == cfg.to_dict()
    except Exception:  # a preset that no longer loads, a value the config refuses, ...
        return False


def display_path(path: Optional[str]) -> Optional[str]:
    """An absolute path relative to the current folder when it lies at most two levels above it (e.g.
    ``../shared/data/mnist``), so that commands written into reports hold no machine-specific prefix."""
    if not path or not Path(path).is_absolute():
        return path
    try:
        rel = os.path.relpath(path, Path.cwd())
    except ValueError:  # another drive (Windows)
        return path
    return rel if Path(rel).parts[:3] != ("..", "..", "..") else path


def train_command(cfg: TrainConfig, out, preset: Optional[str] = None, infer_preset: bool = True) -> str:
    """The ``certkd train`` (for an empirical method: ``certkd teacher``) command line that resolves to
    exactly ``cfg`` and writes to ``out``.

    Keys are compared with the :class:`TrainConfig` defaults, or with a preset: the one the run
    recorded, else (``infer_preset``) the preset giving the shortest command. The command's flags
    of the option table are used where they can say a value, ``--set key=value`` otherwise. Each
    candidate is parsed back through the CLI and kept only if it resolves to ``cfg`` exactly. A
    data directory is written relative to the current folder where that is short (:func:`display_path`).
    """
    from certkd.config import list_presets

    cfg = dataclasses.replace(cfg, data_dir=display_path(cfg.data_dir))
    names: List[Optional[str]] = [preset] if preset else (list(list_presets()) if infer_preset else [])
    tail = ["--out", str(out)]
    commands = (["teacher"] if cfg.method in option("method").allowed("teacher") else []) + ["train"]
    for command in commands:
        teacher = command == "teacher"
        candidates: List[TrainRequest] = []
        for name in names:
            try:
                base = base_config(name, teacher=teacher, method=cfg.method)
            except CertkdError:
                continue
            # exact but misleading: another dataset's or another architecture's preset
            if not preset and (base.dataset != cfg.dataset or base.model != cfg.model):
                continue
            request = _train_request(cfg, base, command, str(name))
            if request is not None:
                candidates.append(request)
        plain = _train_request(cfg, base_config(None, teacher=teacher, method=cfg.method), command)
        if plain is not None:
            candidates.append(plain)
        candidates.sort(key=lambda r: len(r.argv()))
        chosen = next((r for r in candidates if _resolves_to(r, cfg)), None)
        if chosen is not None:
            return chosen.line(tail)
    # cannot happen for a valid config; keep the explicit form
    explicit = _train_request(cfg, TrainConfig()) or TrainRequest()
    return explicit.line(tail)


def _evaluate_flags(run: RunRecord) -> Optional[Tuple[str, ...]]:
    ev = run.evaluation
    if ev is None:
        return None
    flags: List[str] = []
    if isinstance(ev.get("eps"), (int, float)) and not math.isclose(float(ev["eps"]), run.config.eps):
        flags += ["--eps", repr(float(ev["eps"]))]
    if isinstance(ev.get("n"), int):
        flags += ["--limit", str(ev["n"])]
    return tuple(flags)


def evaluate_command(run: RunRecord) -> Optional[str]:
    """``certkd evaluate RUN [--eps E] --limit N`` reproducing the run's evaluation.json."""
    flags = _evaluate_flags(run)
    return None if flags is None else _join(["certkd", "evaluate", str(run.path), *flags])


def _evaluate_commands(runs: Sequence[RunRecord]) -> List[str]:
    """One ``certkd evaluate`` line per set of flags, listing every run evaluated with them."""
    by_flags: Dict[Tuple[str, ...], List[RunRecord]] = {}
    for r in runs:
        flags = _evaluate_flags(r)
        if flags is not None:
            by_flags.setdefault(flags, []).append(r)
    return [_join(["certkd", "evaluate", *[str(r.path) for r in rs], *flags]) for flags, rs in by_flags.items()]


def _join(args: Sequence[str]) -> str:
    return " ".join(shlex.quote(a) for a in args)


def _sweep_of(run: RunRecord) -> Optional[Tuple[Path, str]]:
    """(sweep folder, its command) when the run was made by ``certkd sweep`` (listed in ../sweep.json) and
    that command, resolved today, still gives the run's config (it may not for a sweep made by an older
    certkd, e.g. before ``epochs`` rescaled the schedule: the run then gets its own exact command)."""
    path = run.path.parent / SWEEP_FILE
    if not path.is_file():
        return None
    try:
        stat = path.stat()
        command, planned = _planned_sweep(str(path), stat.st_mtime_ns, stat.st_size)
    except OSError:
        return None
    if not command or run.path.name not in planned:
        return None
    wanted = {k: v for k, v in run.config.to_dict().items() if k not in ("device",)}
    return (run.path.parent, command) if planned[run.path.name] == wanted else None


@functools.lru_cache(maxsize=64)
def _planned_sweep(path: str, mtime_ns: int, size: int) -> Tuple[Optional[str], Dict[str, Dict[str, Any]]]:
    """(command, {run name: config dict without runtime keys}) of a sweep.json, as its command resolves now."""
    from certkd.sweep import plan_sweep

    try:
        data = json.loads(Path(path).read_text())
        names = {r.get("name") for r in data.get("runs", [])}
        command = data.get("command")
        p = parse_sweep_command(str(command))  # grid values as typed, which is how the run folders were named
        runs = plan_sweep(Path(path).parent, p["preset"], p["grid"], p["seeds"], p["sets"])
    except Exception:  # an unreadable or foreign sweep.json: each run gets its own command
        return None, {}
    planned = {r.name: {k: v for k, v in r.config.to_dict().items() if k not in ("device",)}
               for r in runs if r.name in names}
    return (str(command) if command else None), planned


def verify_command(run: RunRecord) -> Optional[str]:
    ver = run.verification
    if ver is None:
        return None
    st = ver.get("settings") or {}
    args = ["certkd", "verify", str(run.path)]
    if isinstance(st.get("eps"), (int, float)) and not math.isclose(float(st["eps"]), run.config.eps):
        args += ["--eps", repr(float(st["eps"]))]
    if "timeout" in st:
        args += ["--timeout", f"{st['timeout']:g}"]
    if "engine" in st:
        args += ["--engine", str(st["engine"])]
    if st.get("attack_restarts", 1) != 1:
        args += ["--restarts", str(st["attack_restarts"])]
    if st.get("alpha_iterations", 20) != 20:
        args += ["--alpha-iterations", str(st["alpha_iterations"])]
    if st.get("dtype", "float32") != "float32":
        args += ["--dtype", str(st["dtype"])]
    if st.get("strict_rounding") is True:
        args += ["--strict-rounding"]
    n = ver.get("n_requested", ver.get("n"))
    if isinstance(n, int):
        args += ["--limit", str(n)]
    return " ".join(shlex.quote(a) for a in args)


def reproduce_commands(groups: Sequence[Group]) -> List[str]:
    """Train commands per group (teachers first; a sweep's runs as its one ``certkd sweep`` line),
    then evaluate and verify commands."""
    lines: List[str] = []
    sweeps_done = set()
    for g in groups:
        own = []
        for r in g.runs:
            sweep = _sweep_of(r)
            if sweep is None:
                own.append(train_command(r.config, r.path, r.preset))
            elif sweep[0] not in sweeps_done:
                sweeps_done.add(sweep[0])
                n = sum(1 for gg in groups for rr in gg.runs if _sweep_of(rr) and _sweep_of(rr)[0] == sweep[0])
                lines += [f"# sweep {sweep[0]} (makes {n} of the reported runs)", sweep[1]]
        if own:
            lines += [f"# {g.name}"] + own
    runs = [r for g in groups for r in g.runs]
    ev = _evaluate_commands(runs)
    if ev:
        lines += ["# evaluation (evaluation.json)"] + ev
    ver = [c for c in (verify_command(r) for r in runs) if c]
    if ver:
        lines += ["# complete verification (verification.json)"] + ver
    return lines


