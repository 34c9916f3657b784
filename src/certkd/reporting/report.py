""":func:`write_report` (``certkd report``): ``report.md``, ``results.csv``, ``runs.csv``,
``pareto.png`` and ``curves/<run>.png`` for a set of run directories.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

from certkd.checkpoints import atomic_write_text
from certkd.errors import CertkdError
from certkd.reporting.commands import _join, reproduce_commands
from certkd.reporting.groups import group_runs
from certkd.reporting.plots import plot_curves, plot_pareto
from certkd.reporting.records import collect_runs
from certkd.reporting.tables import measured_table, results_csv, results_table, runs_csv
from certkd.runs import checkpoints_dir, is_run_dir

def _safe_filename(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=+-]+", "_", name.replace("/", "__")).strip("_") or "run"


def write_report(paths: Iterable, out_dir, command: Optional[str] = None) -> Dict[str, Any]:
    """Collect runs and write report.md, results.csv, runs.csv, pareto.png and curves/ into ``out_dir``.

    Returns a summary: ``runs``, ``groups``, ``missing`` (run names without any evaluation),
    ``warnings`` (one line each) and ``files`` (paths written).
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CertkdError(f"--out {out} exists and is not a directory; choose another --out")
    if is_run_dir(out) or checkpoints_dir(out).is_dir():
        raise CertkdError(f"--out {out} is a run directory; write the report elsewhere (e.g. report/)")
    # `certkd report runs/* --out runs/report` run twice: the glob then names the report itself
    paths_given = [Path(p) for p in paths if not (Path(p).exists() and Path(p).resolve() == out.resolve())]
    runs = collect_runs(paths_given)
    groups = group_runs(runs)
    files: List[Path] = []

    atomic_write_text(out / "results.csv", results_csv(groups))
    atomic_write_text(out / "runs.csv", runs_csv(groups))
    files += [out / "results.csv", out / "runs.csv"]

    datasets = sorted({r.config.dataset for r in runs})
    eps_values = sorted({r.config.eps for r in runs})
    title = f"{', '.join(datasets)}, ε = {', '.join(f'{e:g}' for e in eps_values)}"
    pareto = plot_pareto(groups, out / "pareto.png", title=title)
    if pareto is not None:
        files.append(pareto)
    curves: Dict[str, Path] = {}
    for r in runs:
        p = plot_curves(r, out / "curves" / f"{_safe_filename(r.name)}.png")
        if p is not None:
            curves[r.name] = p
            files.append(p)

    warnings = [f"`{r.name}`: {w}" for r in runs for w in r.warnings]
    not_evaluated = [r for r in runs if r.needs_evaluation]
    if not_evaluated:
        names = ", ".join(f"`{r.name}`" for r in not_evaluated)
        warnings.insert(0, f"not evaluated ({len(not_evaluated)} runs: {names}); `certkd report` does not evaluate, "
                           f"run `{_join(['certkd', 'evaluate'] + [str(r.path) for r in not_evaluated])}` and "
                           "report again")
    if len(eps_values) > 1:
        warnings.append(f"runs use different ε ({', '.join(f'{e:g}' for e in eps_values)}); compare points of the "
                        "Pareto plot at equal ε only")
    missing = [r.name for r in not_evaluated]

    md = [f"# certkd report: {title}", ""]
    md.append(f"{len(runs)} runs in {len(groups)} configurations. Accuracies in % on the test set, "
              "mean ± sample standard deviation over seeds; (k/N): only k of the N seeds have the number.")
    md.append("clean, PGD, IBP: `evaluation.json` (PGD-40; else `verification.json`), on the `n` test points of "
              "that column; CROWN and verified: `verification.json` (complete verifier, incl. its timeouts), on "
              "`n verified` points (a/b: runs measured on different numbers of points); – : not measured. Notes mark "
              "unfinished and collapsed runs, runs trained to a smaller ε than they are evaluated at, and IBP and "
              "verified numbers that come from different test points (then they cannot be compared).")
    md += ["", results_table(groups), ""]
    if pareto is not None:
        md += ["![Clean vs verified accuracy with the Pareto front](pareto.png)", "",
               "*Verified accuracy: complete verifier where `verification.json` exists (filled markers), "
               "else IBP-verified (hollow, a lower bound).* Data: `results.csv` (per configuration), "
               "`runs.csv` (per run).", ""]
    md += ["## What each run's numbers were measured on", "", measured_table(runs), ""]
    if warnings:
        md += ["## Missing and warnings", ""] + [f"- {w}" for w in warnings] + [""]
    if curves:
        links = [f"[{name}](<curves/{p.name}>)" for name, p in curves.items()]
        md += ["## Training curves", "", " · ".join(links), ""]
    md += ["## Commands", "", "Each `certkd train` / `certkd teacher` line resolves to its run's `config.yaml` "
           "exactly (checked when this report was written); teachers come first. Data folders are written relative "
           "to the folder `certkd report` ran in.", "", "```bash"]
    md += reproduce_commands(groups)
    md += ["# this report", command or _join(["certkd", "report"] + [str(p) for p in paths_given] + ["--out", str(out)])]
    md += ["```", ""]
    atomic_write_text(out / "report.md", "\n".join(md))
    files.insert(0, out / "report.md")
    return {"runs": len(runs), "groups": [g.name for g in groups], "missing": missing, "warnings": warnings,
            "files": [str(f) for f in files], "report": str(out / "report.md")}


