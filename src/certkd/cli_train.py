"""The command-line options of training and the ``train``, ``teacher`` and ``sweep`` commands.

Kept apart from :mod:`certkd.cli`, which adds these commands to the ``certkd`` group. What a
parsed command line asks for is planned below, in :mod:`certkd.run_plan`, which the reports use too.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union, get_args, get_origin, get_type_hints

import click

from certkd.choices import ENGINES
from certkd.config import TrainConfig, parse_number, parse_sets
from certkd.errors import CertkdError
from certkd.options import Option, check_choice, command_options, unknown_name
from certkd.run_plan import TrainRequest


class EpsType(click.ParamType):
    """An L∞ radius in pixel units: a number (0.1, 7.8e-3) or a fraction of the 8-bit range (2/255)."""

    name = "EPS"

    def convert(self, value, param, ctx):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        try:
            return parse_number(str(value))
        except (ValueError, ZeroDivisionError):
            self.fail(f"{value!r} is not a radius; write a number such as 0.1 or a fraction such as 2/255", param, ctx)


EPS = EpsType()

_THREADS_HELP = ("CPU threads for PyTorch (default: $CERTKD_THREADS, else min(4, cores left idle by the 1-minute "
                 "load average), at least 1; more than max(64, usable cores) is capped there, with a warning; pass "
                 "it for bit-identical reruns).")
THREADS_OPTION = click.option("--threads", type=click.IntRange(min=1), help=_THREADS_HELP)


def _apply_threads(threads: Optional[int]) -> int:
    from certkd.threads import apply_threads

    return apply_threads(threads)


def _show_progress(quiet: bool) -> bool:
    """Progress bars only for a person watching: not with --quiet, not when stderr is a file or a pipe
    (a log then gets the one line per epoch that training prints anyway, not thousands of bar updates)."""
    return not quiet and sys.stderr.isatty()


class NameChoice(click.Choice):
    """``click.Choice`` over names computed when needed (help, tab completion, parsing), failing with
    certkd's one line: the value, the closest name and all of them. ``check`` returns the value
    as allowed (e.g. another spelling mapped to its name) or raises CertkdError."""

    def __init__(self, what: str, names: Callable[[], Sequence[str]],
                 check: Optional[Callable[[str], str]] = None):
        super().__init__(())
        self.what, self._names, self._check = what, names, check

    @property
    def choices(self) -> tuple:  # type: ignore[override]
        return tuple(self._names())

    @choices.setter
    def choices(self, value: Any) -> None:  # click.Choice.__init__ assigns it; the names stay computed
        pass

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> str:
        names = self.choices
        if value in names:
            return value
        try:
            if self._check is not None:
                return self._check(str(value))
            raise unknown_name(self.what, str(value), names)
        except CertkdError as e:
            self.fail(str(e), param, ctx)


ENGINE = NameChoice("engine", lambda: ENGINES)


def _click_type(opt: Option, command: str) -> Any:
    """The click type of a config key's flag: from the option table, else from the field's type."""
    if opt.choices is not None:
        return NameChoice(opt.key, lambda: opt.allowed(command), lambda v: check_choice(opt.key, v, command))
    if opt.kind == "radius":
        return EPS
    if opt.kind == "path":
        return click.Path()
    hint = get_type_hints(TrainConfig)[opt.key]
    if get_origin(hint) is Union:  # Optional[X]
        hint = next(a for a in get_args(hint) if a is not type(None))
    if hint not in (int, float, str):
        raise TypeError(f"config key '{opt.key}' of type {hint} cannot have a flag; reach it with --set")
    return hint


def _config_option(opt: Option, command: str) -> Callable:
    """The click option of a config key; None (its default) means "not given", so presets are not overridden."""
    if get_type_hints(TrainConfig)[opt.key] is bool:
        return click.option(opt.flag, opt.key, is_flag=True, default=None, help=opt.help)
    return click.option(opt.flag, opt.key, type=_click_type(opt, command), help=opt.help)


def _set_only_keys(command: str) -> List[tuple]:
    """(key, help) of the config keys that ``certkd COMMAND`` reaches through --set only."""
    rows = []
    for opt in command_options(command, flagged=False):
        names = opt.allowed(command)
        rows.append((opt.key, opt.help + (f" One of: {', '.join(names)}." if names else "")))
    return rows


class TrainCommand(click.Command):
    """``certkd train`` / ``teacher``: its help ends with the config keys that only ``--set`` reaches."""

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Config keys without a flag of their own (--set KEY=VALUE)"):
            formatter.write_dl(_set_only_keys(self.name or "train"))
        super().format_epilog(ctx, formatter)


def _train_options(command: str) -> Callable:
    """The options of ``certkd COMMAND`` (train or teacher), generated from the option table."""
    options = [click.option("--preset", help="Preset name ('certkd presets' lists them) or a YAML file; flags "
                                             "override it.")]
    options += [_config_option(opt, command) for opt in command_options(command, flagged=True)]
    options += [
        click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
                     help="Override any config key (repeatable; VALUE is YAML); the keys without a flag are "
                          "listed below."),
        click.option("--out", required=True, type=click.Path(), help="Run directory to write."),
        click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint."),
        click.option("--force", is_flag=True, help="Overwrite an existing --out."),
        click.option("--quiet", is_flag=True, help="No progress bars (there are none either when stderr is not a "
                                                   "terminal: one line per epoch then)."),
        click.option("--tensorboard", is_flag=True, help="Also log the metrics.jsonl scalars to OUT/tensorboard "
                                                         "(needs pip install 'certkd[tensorboard]')."),
        THREADS_OPTION,
    ]

    def decorate(fn: Callable) -> Callable:
        for opt in reversed(options):
            fn = opt(fn)
        return fn

    return decorate


def _parse_sets(sets: Sequence[str]) -> Dict[str, Any]:
    return parse_sets(sets)  # the one --set parser, shared with `certkd sweep`


class _Interrupted(Exception):
    """Ctrl-C during train/verify, carrying the hint to print. Not a KeyboardInterrupt, so that click
    does not turn it into a bare Abort ("aborted") before :func:`main` can say how to continue."""


def _train_interrupted(kw: Dict[str, Any]) -> _Interrupted:
    from certkd.checkpoints import latest_checkpoint

    out = Path(kw["out"])
    try:
        ckpt = latest_checkpoint(out) if out.is_dir() else None
    except CertkdError:
        ckpt = None
    if ckpt is None:
        return _Interrupted("interrupted before the first checkpoint was saved, so nothing was kept; rerun the same "
                            "command (without --resume) to start again")
    epoch = ckpt.name.split("-")[-1].lstrip("0") or "0"
    return _Interrupted(f"interrupted; the checkpoint of epoch {epoch} in {out} is kept: rerun the command with "
                        "--resume to continue from it")


def _run_training(kw: Dict[str, Any], teacher: bool = False) -> Path:
    try:
        return _run_training_inner(kw, teacher)
    except KeyboardInterrupt:
        raise _train_interrupted(kw) from None


def _run_training_inner(kw: Dict[str, Any], teacher: bool = False) -> Path:
    from certkd.training import train

    if kw["resume"]:
        cfg = TrainConfig()  # the stored config of the run is used
    else:
        cfg = TrainRequest.from_params("teacher" if teacher else "train", kw).config()
    _apply_threads(kw.get("threads"))
    return train(cfg, kw["out"], resume=kw["resume"], force=kw["force"], progress=_show_progress(kw["quiet"]),
                 log=click.echo, tensorboard=kw.get("tensorboard", False), hints="cli")


def _is_main_process() -> bool:
    """False on the non-zero ranks of a torchrun job (only rank 0 reports)."""
    import os

    return os.environ.get("RANK", "0") == "0"


@click.command(cls=TrainCommand)
@_train_options("train")
def train(**kw: Any) -> None:
    """Train a (certified) model: IBP, CC-IBP, MTL-IBP, Exp-IBP, SABR or a distillation method."""
    out = _run_training(kw)
    if _is_main_process():
        click.echo(f"run written to {out}; evaluate it with: certkd evaluate {out}")


@click.command(cls=TrainCommand)
@_train_options("teacher")
def teacher(**kw: Any) -> None:
    """Train an empirically robust teacher (PGD-AT by default, or --method trades)."""
    out = _run_training(kw, teacher=True)
    if _is_main_process():
        click.echo(f"teacher written to {out}; distil it with: certkd train --method cc-dist --teacher {out} ...")



@click.command()
@click.option("--preset", help="Preset name or YAML file, as in certkd train.")
@click.option("--grid", "grid", multiple=True, metavar="KEY=V1,V2,...",
              help="A config key and its values (repeatable; the runs are the cartesian product).")
@click.option("--seeds", help="Seeds, e.g. 0,1,2 (default: the config's seed).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override for every run (repeatable).")
@click.option("--out", required=True, type=click.Path(), help="Sweep folder: one run per combination + sweep.json.")
@click.option("--evaluate", is_flag=True, help="Also evaluate every run (certkd evaluate; writes evaluation.json).")
@click.option("--eval-limit", type=int, help="With --evaluate: the first N test points only.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--devices", help="Train on several devices at once, one worker process each, e.g. cuda:0,cuda:1 "
                              "(cpu,cpu: two CPU workers sharing --threads).")
@THREADS_OPTION
def sweep(preset: Optional[str], grid: Sequence[str], seeds: Optional[str], sets: Sequence[str], out: str,
          evaluate: bool, eval_limit: Optional[int], quiet: bool, devices: Optional[str],
          threads: Optional[int]) -> None:
    """Train every combination of --grid values × --seeds.

    Resumable: rerun the same command to skip finished runs and resume partial ones. Without
    --devices the runs train one after another in this process; with --devices cuda:0,cuda:1
    one worker process per device takes them from a shared queue.
    """
    from certkd.sweep import run_sweep

    _apply_threads(threads)  # --devices splits these threads between its workers
    s = run_sweep(out, preset, list(grid), seeds, list(sets), evaluate=evaluate, eval_limit=eval_limit,
                  progress=_show_progress(quiet), log=click.echo, devices=devices)
    counts = ", ".join(f"{v} {k}" for k, v in sorted(s["counts"].items()))
    click.echo(f"sweep {out}: {counts}; status in {Path(out) / 'sweep.json'}")
    failed = [r for r in s["runs"] if r["status"] == "failed"]
    if failed:
        raise CertkdError(f"{len(failed)} of {len(s['runs'])} runs failed (first: {failed[0]['name']}: "
                          f"{failed[0]['error']}); fix it and rerun the same command to continue")
    click.echo(f"report it with: certkd report {out} --out {Path(out) / 'report'}")
