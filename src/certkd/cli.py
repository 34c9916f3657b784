"""The ``certkd`` command line (click).

Why click: already a dependency of most of the ecosystem, no extra weight, and its
``standalone_mode=False`` lets us turn every user mistake into one line and exit code 2.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import click

# train, teacher and sweep (and the options they share) live in cli_train
from certkd.cli_train import (ENGINE, EPS, THREADS_OPTION, EpsType, _apply_threads, _Interrupted,  # noqa: F401
                              _is_main_process, _parse_sets, _run_training, _show_progress,
                              _train_options, sweep, teacher, train)
from certkd.cli_tune import tune
from certkd.errors import CertkdError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="certkd")
def cli() -> None:
    """certkd: certified training, CC-Dist distillation and verification."""


for _command in (train, teacher, sweep, tune):
    cli.add_command(_command)


def _warn_result(result: Dict[str, Any], prefix: str = "") -> None:
    """Warnings a reader must not miss (unfinished or collapsed model), one line each on stderr."""
    from certkd.runs import result_warnings

    for line in result_warnings(result):
        click.echo(f"warning: {prefix}{line}", err=True)


@cli.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path())
@click.option("--eps", type=EPS, help="Radius, e.g. 0.1 or 2/255 (default: the run's training ε).")
@click.option("--limit", type=int, help="Evaluate N test points only, a fixed class-stratified subset.")
@click.option("--data-dir", type=click.Path(), help="Dataset directory (default: the run's).")
@click.option("--batch-size", type=int, default=256, show_default=True)
@click.option("--device", default="auto", show_default=True)
@THREADS_OPTION
def evaluate(runs: Sequence[str], eps: Optional[float], limit: Optional[int], data_dir: Optional[str],
             batch_size: int, device: str, threads: Optional[int]) -> None:
    """Clean / PGD-40 / IBP-verified accuracy of one or more runs (writes evaluation.json)."""
    from certkd.evaluation import evaluate_run
    from certkd.reporting import accuracy_table

    _apply_threads(threads)

    results = {}
    for run in runs:
        results[str(run)] = evaluate_run(run, eps=eps, limit=limit, data_dir=data_dir, batch_size=batch_size,
                                         device=device)
    first = next(iter(results.values()))
    click.echo(f"eps={first['eps']:g}, n={first['n']} ({first['certifies']['points']})")
    click.echo(accuracy_table(results))
    for run, res in results.items():
        _warn_result(res, f"{run}: ")


@cli.command()
@click.argument("run", type=click.Path(), required=False)
@click.option("--onnx", "onnx_path", type=click.Path(), help="Verify this ONNX network (with --vnnlib) instead of a run.")
@click.option("--vnnlib", "vnnlib_path", type=click.Path(), help="VNN-LIB property for --onnx.")
@click.option("--instances", "instances_csv", type=click.Path(),
              help="A VNN-COMP instances.csv (onnx,vnnlib,timeout rows): verify the whole benchmark (resumable).")
@click.option("--root", type=click.Path(), help="With --instances: folder the CSV's paths are relative to "
                                                "(default: the CSV's folder).")
@click.option("--eps", type=EPS, help="Radius in pixel units, e.g. 0.1 or 2/255 (default: the run's training ε).")
@click.option("--timeout", type=float, help="Seconds, a positive finite number: a RUN's per-sample budget of the "
              "complete stage (default 60); with --onnx the whole instance's budget (default 60); with --instances "
              "the budget of every instance, reading its files included, replacing each CSV row's timeout "
              "(default: the CSV's).")
@click.option("--limit", type=int, help="Verify N test points, a fixed class-stratified subset (default: all).")
@click.option("--workers", type=int, default=1, show_default=True, help="Processes (one per GPU when present).")
@click.option("--engine", type=ENGINE, default="bab", show_default=True,
              help="Complete stage: branch and bound, an exact MILP, or none.")
@click.option("--restarts", type=int, default=1, show_default=True, help="PGD restarts.")
@click.option("--alpha-iterations", type=int, default=20, show_default=True, help="α-CROWN iterations (0: off).")
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float32", show_default=True,
              help="Precision of the attack and the IBP/CROWN bounds (concrete points are always re-checked in float32).")
@click.option("--strict-rounding", is_flag=True, help="Certify only when every certified margin clears twice the bound "
              "on floating-point rounding, so that it holds for the network as run (a RUN's model as torch evaluates it, "
              "an ONNX network as onnxruntime does, in any order; docs/verify_onnx.md §5); closer margins answer unknown.")
@click.option("--out", "out_dir", type=click.Path(), help="Where to write verification.json/.jsonl (default: the run); "
              "with --onnx the result file; with --instances the results CSV (default results.csv).")
@click.option("--resume", is_flag=True, help="Continue an interrupted verification of the same weights and settings "
              "(--instances always resumes: instances already in the results CSV are skipped).")
@click.option("--retry-errors", is_flag=True, help="With --instances: verify again the instances the results CSV "
              "records as error (a rerun skips them otherwise), e.g. after fixing their files.")
@click.option("--force", is_flag=True, help="Replace an existing verification in the output folder.")
@click.option("--data-dir", type=click.Path(), help="Dataset directory (default: the run's).")
@click.option("--device", default="auto", show_default=True)
@click.option("--quiet", is_flag=True, help="No progress bar (none either when stderr is not a terminal).")
@THREADS_OPTION
def verify(run: Optional[str], onnx_path: Optional[str], vnnlib_path: Optional[str], instances_csv: Optional[str],
           root: Optional[str], eps: Optional[float], timeout: Optional[float], limit: Optional[int], workers: int,
           engine: str, restarts: int, alpha_iterations: int, dtype: str, strict_rounding: bool,
           out_dir: Optional[str], resume: bool,
           retry_errors: bool, force: bool, data_dir: Optional[str], device: str, quiet: bool,
           threads: Optional[int] = None) -> None:
    """Verified robust accuracy of a run: clean → PGD → IBP → CROWN → α-CROWN → branch-and-bound
    (docs/method.md §10);
    or any ONNX network against a VNN-LIB property (--onnx/--vnnlib), or a whole benchmark (--instances)."""
    from certkd.checkpoints import checkpoint_eps, load_model
    from certkd.verification.pipeline import VerifyConfig, verify_run

    _apply_threads(threads)
    modes = [m for m, v in (("RUN", run), ("--onnx", onnx_path), ("--instances", instances_csv)) if v]
    if len(modes) != 1 or bool(onnx_path) != bool(vnnlib_path):
        raise CertkdError("give one of: RUN, --onnx MODEL.onnx --vnnlib PROP.vnnlib, or --instances instances.csv")
    if retry_errors and not instances_csv:
        raise CertkdError("--retry-errors is for --instances (it verifies the error rows of a results CSV again); "
                          "drop it")
    if timeout is not None and not run:  # a RUN's timeout is checked with its other settings (VerifyConfig)
        from certkd.verification.instances import positive_seconds

        timeout = positive_seconds(timeout, "--timeout", "pass e.g. --timeout 60")
    if onnx_path:
        from certkd.verification.instances import check_output_file
        from certkd.verification.api import verify_instance

        if out_dir:  # refused before the verification, not after it
            check_output_file(out_dir, example="result.txt")
        res = verify_instance(onnx_path, vnnlib_path, timeout=60.0 if timeout is None else timeout,
                              strict_rounding=strict_rounding)
        text = res.text()
        if out_dir:
            from certkd.checkpoints import atomic_write_text

            atomic_write_text(out_dir, text)
        click.echo(text, nl=False)
        if res.note and res.status != "sat":
            click.echo(f"({res.stage}: {res.note})", err=True)
        if res.status == "unsat":
            click.echo(f"(unsat at {res.stage}; rounding bound {res.rounding_bound:.3g}: "
                       + ("holds for onnxruntime's floating-point evaluation in any order)" if res.float_proof else
                          "proved in exact arithmetic; a margin is within twice the rounding bound, see "
                          "--strict-rounding)"), err=True)
        return
    if instances_csv:
        from certkd.verification.instances import run_instances

        run_instances(instances_csv, root=root, out=out_dir, workers=workers, log=click.echo, limit=limit,
                      timeout=timeout, retry_errors=retry_errors, strict_rounding=strict_rounding)
        return
    if timeout is None:
        timeout = 60.0
    if eps is None:
        eps = checkpoint_eps(load_model(run).certkd_meta, run)
    cfg = VerifyConfig(eps=eps, timeout=timeout, engine=engine, attack_restarts=restarts,
                       alpha_iterations=alpha_iterations, dtype=dtype, strict_rounding=strict_rounding)
    try:
        s = verify_run(run, cfg, limit=limit, out_dir=out_dir, workers=workers, resume=resume, force=force,
                       data_dir=data_dir, device=device, progress=_show_progress(quiet))
    except KeyboardInterrupt:
        from certkd.verification.pipeline import _default_out, _saved_rows

        where = Path(out_dir) if out_dir is not None else _default_out(run)
        n = _saved_rows(where) if where is not None and where.is_dir() else 0
        if n:
            raise _Interrupted(f"interrupted; the {n} points verified so far are kept in {where}: rerun the same "
                               "command with --resume to continue") from None
        raise _Interrupted("interrupted before any point was verified, so nothing was kept; rerun the same command "
                           "(without --resume) to start again") from None
    rows = [("clean", s["clean_accuracy"]), ("PGD", s["pgd_accuracy"]), ("IBP-verified", s["ibp_verified_accuracy"]),
            ("CROWN-verified", s["crown_verified_accuracy"]), ("α-CROWN-verified", s["alpha_crown_verified_accuracy"]),
            (f"verified ({engine})", s["verified_accuracy"]),
            ("not falsified (upper bound)", s["empirical_robust_accuracy"])]
    click.echo(f"eps={s['eps']:g}, n={s['n']} ({s['certifies']['points']}), timeout={timeout:g}s, "
               f"median time/point {s['median_time_s']:.3f}s")
    _warn_result(s)
    width = max(len(r[0]) for r in rows)
    for name, val in rows:
        click.echo(f"  {name.ljust(width)}  {100 * val:5.1f}%")
    click.echo("  counts: " + ", ".join(f"{k}={v}" for k, v in s["counts"].items() if v))
    n_verified = round(s["verified_accuracy"] * s["n"])
    if n_verified:
        click.echo(f"  float proofs: {s['verified_float_proof']} of the {n_verified} verified points clear twice the "
                   "rounding bound of the network as run" + ("" if strict_rounding else " (see --strict-rounding)"))


@cli.command("export")
@click.argument("run", type=click.Path())
@click.option("--onnx", "onnx_path", required=True, type=click.Path(),
              help="ONNX file to write: the whole model, normalisation included (input in pixel units [0, 1]).")
@click.option("--vnnlib-dir", required=True, type=click.Path(),
              help="Folder for prop_{i}.vnnlib and instances.csv (created if missing).")
@click.option("--eps", type=EPS, help="L∞ radius in pixel units, e.g. 0.1 or 2/255 (default: the run's training ε).")
@click.option("--limit", type=int, default=100, show_default=True,
              help="Export N test points: the fixed-seed, class-stratified subset that verify --limit N checks "
                   "(prop_{i}.vnnlib is test index i).")
@click.option("--data-dir", type=click.Path(), help="Dataset directory (default: the run's).")
@click.option("--timeout", type=float, default=60.0, show_default=True,
              help="Per-instance timeout in seconds, written to instances.csv.")
def export_cmd(run: str, onnx_path: str, vnnlib_dir: str, eps: Optional[float], limit: int,
               data_dir: Optional[str], timeout: float) -> None:
    """Export a run for external verifiers: ONNX model + VNN-LIB robustness properties (VNN-COMP layout)."""
    from certkd.export import export_run

    s = export_run(run, onnx_path, vnnlib_dir, eps=eps, limit=limit, data_dir=data_dir, timeout=timeout)
    shape = "×".join(str(d) for d in s["input_shape"])
    click.echo(f"model: {s['onnx']} (input {shape}, pixel units [0, 1]; output {s['num_classes']} logits)")
    click.echo(f"properties: {s['n']} at eps={s['eps']:g} in {s['vnnlib_dir']}; {s['correct']}/{s['n']} points are "
               "classified correctly (the others are violated trivially)")
    click.echo(f"points: {s['points']['points']} (the points of certkd verify --limit {s['n']})")
    click.echo(f"instances: {s['instances']}")


@cli.command()
@click.argument("runs", nargs=-1, type=click.Path())
@click.option("--out", "out_dir", default="report", show_default=True, type=click.Path(),
              help="Folder for report.md, results.csv, runs.csv, pareto.png and curves/.")
def report(runs: Sequence[str], out_dir: str) -> None:
    """One-page report of runs (or folders of runs): accuracy table (mean ± std over seeds), Pareto plot,
    training curves and the exact commands. Does not evaluate: runs without evaluation.json are listed.
    Of a certkd tune folder: Optuna's history and importance plots and the best configuration as a preset."""
    import shlex

    from certkd.reporting import write_report
    from certkd.reporting.tune import is_tune_dir, write_tune_report

    if len(runs) == 1 and is_tune_dir(runs[0]):  # a certkd tune folder: its study's report
        t = write_tune_report(runs[0], out_dir)
        click.echo(f"tune report: {t['report']}; best configuration: {', '.join(t['best'])}")
        for note in t["notes"]:
            click.echo(f"  note: {note}")
        return

    command = " ".join(["certkd", "report"] + [shlex.quote(r) for r in runs] + ["--out", shlex.quote(out_dir)])
    s = write_report(runs, out_dir, command=command)
    click.echo(f"{s['runs']} runs in {len(s['groups'])} configurations: {s['report']}")
    for w in s["warnings"]:
        click.echo(f"  note: {w.replace('`', '')}")


@cli.command()
@click.argument("run", type=click.Path())
@click.option("--out", "out_path", type=click.Path(), help="Card to write (default: RUN/MODEL_CARD.md).")
@click.option("--release", "release_dir", type=click.Path(),
              help="Also write a release folder (weights, meta.json, card, config, results) for certkd.load_model.")
def card(run: str, out_path: Optional[str], release_dir: Optional[str]) -> None:
    """Markdown model card of a trained run: architecture, data, ε, method, teacher, metrics, commands."""
    from certkd.reporting import make_release, write_card
    from certkd.reporting.records import load_run

    click.echo(f"model card written to {write_card(run, out_path)}")
    for w in load_run(run).warnings:  # also in the card's caveats; said here so that they are not missed
        click.echo(f"warning: {w}", err=True)
    if release_dir:
        make_release(run, release_dir)
        click.echo(f"release folder written to {release_dir}; load it with certkd.load_model({release_dir!r})")


@cli.command()
def presets() -> None:
    """List the available presets, each with a one-line description."""
    from certkd.config import list_presets, preset_description

    names = list_presets()
    width = max((len(n) for n in names), default=0)
    for name in names:
        click.echo(f"{name.ljust(width)}  {preset_description(name)}".rstrip())


@cli.command()
def models() -> None:
    """List the registered architectures, each with a one-line description."""
    from certkd.models import describe_model, list_models

    names = list_models()
    width = max(len(n) for n in names)
    for name in names:
        click.echo(f"{name.ljust(width)}  {describe_model(name)}".rstrip())


DEMO_BETA = 0.003
DEMO_VERIFY_LIMIT, DEMO_VERIFY_TIMEOUT = 200, 5.0


@cli.command()
@click.option("--out", default="runs/demo", show_default=True, type=click.Path())
@click.option("--epochs", type=int, help="Override the epochs of the demo presets.")
@click.option("--verify-limit", type=int, default=DEMO_VERIFY_LIMIT, show_default=True,
              help="Test points given to the complete verifier.")
@click.option("--verify-timeout", type=float, default=DEMO_VERIFY_TIMEOUT, show_default=True,
              help="Seconds per point for the complete verifier.")
@click.option("--quiet", is_flag=True)
@THREADS_OPTION
def demo(out: str, epochs: Optional[int], verify_limit: int, verify_timeout: float, quiet: bool,
         threads: Optional[int]) -> None:
    """Teacher (PGD-AT) → CC-IBP and CC-Dist students → evaluation table, on bundled digits."""
    from certkd.config import resolve_config
    from certkd.evaluation import evaluate_run
    from certkd.reporting import accuracy_table
    from certkd.training import train as train_fn
    from certkd.verification.pipeline import VerifyConfig, verify_run

    root = Path(out)
    n_threads = _apply_threads(threads)
    quiet = not _show_progress(quiet)
    click.echo(f"(torch threads: {n_threads})")
    extra = {"epochs": epochs} if epochs else {}
    click.echo("1/4 teacher: PGD adversarial training")
    t_cfg = resolve_config("digits-small", dict(extra, method="pgd-at"), teacher=True)
    train_fn(t_cfg, root / "teacher", force=True, progress=not quiet, log=click.echo)
    click.echo("2/4 student: CC-IBP")
    train_fn(resolve_config("digits-small", dict(extra, method="cc-ibp")), root / "cc-ibp", force=True,
             progress=not quiet, log=click.echo)
    click.echo("3/4 student: CC-Dist from the teacher")
    # β and no distillation during warm-up: the best of the digits sweeps in docs/ (see README)
    train_fn(resolve_config("digits-small", dict(extra, method="cc-dist", beta=DEMO_BETA, dist_warmup=False,
                                                 teacher=str(root / "teacher"))),
             root / "cc-dist", force=True, progress=not quiet, log=click.echo)
    click.echo("4/4 verification: PGD-40 and IBP on the test set; complete verification (BaB) of the students")
    results = {name: evaluate_run(root / name) for name in ("teacher", "cc-ibp", "cc-dist")}
    first = next(iter(results.values()))
    vcfg = VerifyConfig(eps=first["eps"], timeout=verify_timeout)
    for name in ("cc-ibp", "cc-dist"):
        v = verify_run(root / name, vcfg, limit=verify_limit, progress=not quiet)
        results[name]["verified_accuracy"] = v["verified_accuracy"]
        results[name]["verified_n"] = v["n"]
    click.echo(f"\ndigits test set, eps={first['eps']:g}, n={first['n']} "
               f"(verified: complete verifier on the first {v['n']}, {verify_timeout:g} s per point)")
    click.echo(accuracy_table(results, verified=True))


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Entry point: user mistakes become one line on stderr and exit code 2."""
    try:
        cli.main(args=list(argv) if argv is not None else None, prog_name="certkd", standalone_mode=False)
    except CertkdError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.UsageError as e:
        hint = f" (see 'certkd {e.ctx.info_name} --help')" if e.ctx is not None and e.ctx.parent is not None else \
            " (see 'certkd --help')"
        click.echo(f"error: {e.format_message()}{hint}", err=True)
        sys.exit(2)
    except click.ClickException as e:
        click.echo(f"error: {e.format_message()}", err=True)
        sys.exit(e.exit_code)
    except _Interrupted as e:
        if sys.stderr.isatty():
            click.echo("", err=True)  # end the terminal's ^C echo
        click.echo(str(e), err=True)
        sys.exit(130)
    except click.Abort as e:
        interrupted = isinstance(e.__cause__ or e.__context__, KeyboardInterrupt)
        click.echo("interrupted" if interrupted else "aborted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("interrupted; rerun the same command with --resume (train, verify) to continue", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
