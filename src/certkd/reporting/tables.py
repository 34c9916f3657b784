"""Terminal and Markdown tables: ``certkd evaluate`` / ``certkd demo`` accuracy tables, the report's
results and measured-on tables, and its CSV files.
"""
from __future__ import annotations

import csv
import io
import re
from typing import Any, Dict, List, Mapping, Sequence

from certkd.reporting.groups import Group
from certkd.reporting.records import REPORT_METRICS, RunRecord, _n_text, measured_on, result_notes

ACCURACY_COLUMNS = (("clean_accuracy", "clean"), ("pgd_accuracy", "PGD"), ("ibp_verified_accuracy", "IBP-verified"))


def format_table(rows: Sequence[Mapping[str, object]], columns: Sequence[tuple], title_key: str = "name") -> str:
    """Markdown table: one row per run, accuracies as percentages with one decimal."""
    header = ["run"] + [label for _, label in columns]
    lines: List[List[str]] = []
    for row in rows:
        cells = [str(row.get(title_key, ""))]
        for key, _ in columns:
            val = row.get(key)
            cells.append(f"{100 * float(val):.1f}%" if isinstance(val, (int, float)) else "–")
        lines.append(cells)
    return _markdown_table(header, lines)


def accuracy_table(results: Dict[str, Mapping[str, object]], verified: bool = False) -> str:
    """Table of clean / PGD / IBP-verified (and with ``verified`` complete-verifier) accuracy per run,
    with the number of test points ``n`` behind them (``verified_n`` for the complete verifier) and a
    ``notes`` column, when any run needs one, for unfinished or collapsed models and short ε ramps."""
    rows = [dict(r, name=name) for name, r in results.items()]
    table = format_table(rows, ACCURACY_COLUMNS + ((("verified_accuracy", "verified"),) if verified else ()))
    lines = table.splitlines()
    extra_header = ["n"] + (["verified n"] if verified else [])
    cells = [[_n_text(r.get("n"))] + ([_n_text(r.get("verified_n"))] if verified else []) for r in rows]
    notes = [result_notes(r) for r in rows]
    if any(notes):
        extra_header.append("notes")
        cells = [c + [n] for c, n in zip(cells, notes)]
    header = [c.strip() for c in lines[0].split("|")[1:-1]] + extra_header
    body = [[c.strip() for c in line.split("|")[1:-1]] + extra for line, extra in zip(lines[2:], cells)]
    return _markdown_table(header, body)


def _markdown_table(header: Sequence[str], lines: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in lines)) if lines else len(h) for i, h in enumerate(header)]
    fmt = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    out = [fmt(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [fmt(r) for r in lines]
    return "\n".join(out)


def results_rows(groups: Sequence[Group]) -> List[Dict[str, Any]]:
    """One dict per group: name, method, family, eps, seeds, runs, and mean/std/n of every metric."""
    rows = []
    for g in groups:
        row: Dict[str, Any] = {"group": g.name, "method": g.method, "family": g.family, "eps": g.config["eps"],
                               "n_runs": len(g.runs), "seeds": " ".join(str(s) for s in g.seeds),
                               "runs": " ".join(r.name for r in g.runs)}
        for key, _ in REPORT_METRICS:
            st = g.stats(key)
            row[f"{key}_mean"], row[f"{key}_std"], row[f"{key}_n"] = st.mean, st.std, st.n
            row[f"{key}_points"] = _points_text(g, (key,), empty="")
        row["notes"] = group_notes(g)
        rows.append(row)
    return rows


#: Metrics of the results table measured by ``certkd evaluate`` (else verify) and by the complete verifier.
_EVAL_KEYS = ("clean_accuracy", "pgd_accuracy", "ibp_verified_accuracy")
_VERIFIER_KEYS = ("crown_verified_accuracy", "verified_accuracy")


def _points_text(g: Group, keys: Sequence[str], empty: str = "–") -> str:
    """The number(s) of test points behind ``keys`` over a group's runs: "360", or "300/500" when they differ."""
    ns = sorted({n for r in g.runs for k in keys for n in [r.points(k)] if n is not None})
    return "/".join(str(n) for n in ns) if ns else empty


def group_notes(g: Group) -> str:
    """The runs' :meth:`RunRecord.notes`; in a group of several seeds each with "(k/N runs)"."""
    if len(g.runs) == 1:
        return "; ".join(g.runs[0].notes())
    counts: Dict[str, int] = {}
    for r in g.runs:
        for note in r.notes():
            key = re.sub(r" \(epoch \d+/\d+\)", "", note)
            counts[key] = counts.get(key, 0) + 1
    return "; ".join(f"{note} ({c}/{len(g.runs)} runs)" for note, c in counts.items())


def results_table(groups: Sequence[Group]) -> str:
    """Markdown table of the groups: accuracies in % as mean ± std over seeds, the number of test points
    ``n`` behind each block of columns, and notes (unfinished, collapsed, IBP and verified on other points)."""
    header = (["configuration", "ε", "seeds"] + [label for k, label in REPORT_METRICS if k in _EVAL_KEYS] + ["n"]
              + [label for k, label in REPORT_METRICS if k in _VERIFIER_KEYS] + ["n verified", "notes"])
    lines = []
    for g in groups:
        lines.append([g.name.replace("|", "\\|"), f"{g.config['eps']:g}", ",".join(str(s) for s in g.seeds)]
                     + [g.stats(key).format() for key, _ in REPORT_METRICS if key in _EVAL_KEYS]
                     + [_points_text(g, _EVAL_KEYS)]
                     + [g.stats(key).format() for key, _ in REPORT_METRICS if key in _VERIFIER_KEYS]
                     + [_points_text(g, _VERIFIER_KEYS), group_notes(g).replace("|", "\\|") or "–"])
    return _markdown_table(header, lines)


def _csv_text(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: ("" if row.get(c) is None else (repr(row[c]) if isinstance(row[c], float) else row[c]))
                         for c in columns})
    return buf.getvalue()


def measured_table(runs: Sequence[RunRecord]) -> str:
    """Markdown table: per run, the checkpoint and the points behind evaluation.json and verification.json."""
    lines = []
    for r in runs:
        ev, ver = r.evaluation, r.verification
        same = "–"
        if ev and ver:
            a, b = (ev.get("certifies") or {}).get("indices_sha256"), (ver.get("certifies") or {}).get("indices_sha256")
            same = "yes" if a and a == b else "no: IBP and verified are on different points"
        ckpt = f"{r.checkpoint.name} (sha256 {r.weights_sha256[:12]})" if r.checkpoint and r.weights_sha256 else "–"
        state = "; ".join(n for n in r.notes() if "different points" not in n) or "–"
        lines.append([r.name.replace("|", "\\|"), ckpt, measured_on(ev), measured_on(ver), same,
                      state.replace("|", "\\|")])
    return _markdown_table(["run", "latest checkpoint", "evaluation.json (clean, PGD, IBP)",
                            "verification.json (CROWN, verified)", "same points", "notes"], lines)


def results_csv(groups: Sequence[Group]) -> str:
    """CSV with one row per group; accuracies as fractions in [0, 1], std empty for a single seed."""
    cols = ["group", "method", "family", "eps", "n_runs", "seeds", "runs"]
    cols += [f"{k}_{s}" for k, _ in REPORT_METRICS for s in ("mean", "std", "n", "points")] + ["notes"]
    return _csv_text(results_rows(groups), cols)


def runs_csv(groups: Sequence[Group]) -> str:
    """CSV with one row per run (fractions in [0, 1]; empty where not measured)."""
    cols = ["run", "path", "group", "method", "seed", "eps", "epoch", "epochs", "weights_sha256", "evaluation_n",
            "evaluation_points", "verification_n", "verification_points"] + [k for k, _ in REPORT_METRICS] + ["notes"]
    rows = []
    for g in groups:
        for r in g.runs:
            ev, ver = r.evaluation or {}, r.verification or {}
            row = {"run": r.name, "path": str(r.path), "group": g.name, "method": r.method, "seed": r.config.seed,
                   "eps": r.config.eps, "epoch": r.epoch, "epochs": r.config.epochs,
                   "weights_sha256": r.weights_sha256, "evaluation_n": ev.get("n"),
                   "evaluation_points": ev and measured_on(ev), "verification_n": ver.get("n"),
                   "verification_points": ver and measured_on(ver)}
            row.update({k: r.value(k) for k, _ in REPORT_METRICS})
            row["notes"] = "; ".join(r.notes())
            rows.append(row)
    return _csv_text(rows, cols)


