"""The command-line options of training and the ``train``, ``teacher`` and ``sweep`` commands.

Kept apart from :mod:`certkd.cli` (which adds these commands to the ``certkd`` group) so that
:mod:`certkd.reporting` can parse a reconstructed command with the real options without importing
the CLI module that imports reporting.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import click

from certkd.errors import CertkdError
from certkd.methods import method_names


class EpsType(click.ParamType):
    """An L∞ radius in pixel units: a number (0.1, 7.8e-3) or a fraction of the 8-bit range (2/255)."""

    name = "EPS"

    def convert(self, value, param, ctx):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        from certkd.config import parse_number

        try:
            return parse_number(str(value))
        except (ValueError, ZeroDivisionError):
            self.fail(f"{value!r} is not a radius; write a number such as 0.1 or a fraction such as 2/255", param, ctx)


EPS = EpsType()

_THREADS_HELP = ("CPU threads for PyTorch (default: $CERTKD_THREADS, else min(4, cores left idle by the 1-minute "
                 "load average), at least 1; pass it for bit-identical reruns).")
THREADS_OPTION = click.option("--threads", type=click.IntRange(min=1), help=_THREADS_HELP)


def _apply_threads(threads: Optional[int]) -> int:
    from certkd.threads import apply_threads

    return apply_threads(threads)


def _show_progress(quiet: bool) -> bool:
    """Progress bars only for a person watching: not with --quiet, not when stderr is a file or a pipe
    (a log then gets the one line per epoch that training prints anyway, not thousands of bar updates)."""
    return not quiet and sys.stderr.isatty()


# Options shared by `train` and `teacher`; None means "not given" so presets are not overridden.
_TRAIN_OPTIONS = [
    click.option("--preset", help="Preset name ('certkd presets' lists them) or a YAML file; flags override it."),
    click.option("--dataset", help="digits, mnist, fashion-mnist, cifar10, imagefolder, tinyimagenet, imagenet64."),
    click.option("--data-dir", type=click.Path(), help="Directory holding the dataset files."),
    click.option("--model", help="Architecture: cnn7, cnn7-imagenet, cnn7-w16, cnn7-w32, cnn-small, mlp "
                                 "('certkd models' describes them)."),
    click.option("--method", help="Training method: " + ", ".join(method_names()) + "."),
    click.option("--eps", type=EPS, help="Target L∞ radius in pixel units [0, 1], e.g. 0.1 or 2/255."),
    click.option("--alpha", type=float, help="Over-approximation coefficient α (SABR: λ)."),
    click.option("--beta", type=float, help="Distillation weight β."),
    click.option("--teacher", type=click.Path(), help="Teacher run directory (distillation methods)."),
    click.option("--dist-combination", help="CC-Dist combination: literal, box (default) or distance."),
    click.option("--dist-target", help="Distillation target: teacher (default: the teacher's clean features) or "
                                       "zero (distil towards 0, no teacher needed: the control of docs/method.md §7.9)."),
    click.option("--feature-adapter", help="none or linear (learned linear map on the student's side, from student "
                                           "to teacher features, trained with the student; IBP maps the box exactly)."),
    click.option("--epochs", type=int, help="Number of epochs; the ε ramp (start, length) and the lr milestones "
                                            "of the preset are rescaled to it unless set with --set."),
    click.option("--batch-size", type=int, help="Training batch size (global: split across torchrun processes)."),
    click.option("--lr", type=float, help="Learning rate."),
    click.option("--seed", type=int, help="Random seed."),
    click.option("--device", help="auto (CUDA when present), cpu or cuda[:N]; under torchrun: cuda:LOCAL_RANK."),
    click.option("--tf32", "allow_tf32", is_flag=True, default=None,
                 help="Allow TF32 matmuls/convolutions in training (off by default: bounds are not sound in TF32)."),
    click.option("--amp", is_flag=True, default=None,
                 help="bfloat16 autocast on CUDA; empirical methods (standard, pgd-at, trades) only."),
    click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override any config key (repeatable)."),
    click.option("--out", required=True, type=click.Path(), help="Run directory to write."),
    click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint."),
    click.option("--force", is_flag=True, help="Overwrite an existing --out."),
    click.option("--quiet", is_flag=True, help="No progress bars (there are none either when stderr is not a "
                                               "terminal: one line per epoch then)."),
    click.option("--tensorboard", is_flag=True, help="Also log the metrics.jsonl scalars to OUT/tensorboard (needs "
                                                     "pip install 'certkd[tensorboard]')."),
    THREADS_OPTION,
]


def _train_options(fn):
    for opt in reversed(_TRAIN_OPTIONS):
        fn = opt(fn)
    return fn


def _parse_sets(sets: Sequence[str]) -> Dict[str, Any]:
    from certkd.config import parse_sets

    return parse_sets(sets)  # the one --set parser, shared with `certkd sweep`


def _overrides(kw: Dict[str, Any]) -> Dict[str, Any]:
    keys = ("dataset", "data_dir", "model", "method", "eps", "alpha", "beta", "teacher", "dist_combination",
            "dist_target", "feature_adapter", "epochs", "batch_size", "lr", "seed", "device", "allow_tf32", "amp")
    values = {k: kw[k] for k in keys if kw.get(k) is not None}
    values.update(_parse_sets(kw.get("sets") or ()))
    return values


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
    from certkd.config import resolve_config
    from certkd.training import train

    if kw["resume"]:
        from certkd.config import TrainConfig

        cfg = TrainConfig()  # the stored config of the run is used
    else:
        cfg = resolve_config(kw.get("preset"), _overrides(kw), teacher=teacher)
    _apply_threads(kw.get("threads"))
    return train(cfg, kw["out"], resume=kw["resume"], force=kw["force"], progress=_show_progress(kw["quiet"]),
                 log=click.echo, tensorboard=kw.get("tensorboard", False), hints="cli")


def _is_main_process() -> bool:
    """False on the non-zero ranks of a torchrun job (only rank 0 reports)."""
    import os

    return os.environ.get("RANK", "0") == "0"


@click.command()
@_train_options
def train(**kw: Any) -> None:
    """Train a (certified) model: IBP, CC-IBP, MTL-IBP, Exp-IBP, SABR or a distillation method."""
    out = _run_training(kw)
    if _is_main_process():
        click.echo(f"run written to {out}; evaluate it with: certkd evaluate {out}")


@click.command()
@_train_options
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
