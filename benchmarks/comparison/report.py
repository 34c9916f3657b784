"""The comparison's results: mean and 95% t-interval over seeds per metric, as JSON and a markdown table.

Pure functions of per-seed numbers (:func:`summarise`, :func:`markdown`); the study's t-interval
(study.stats.t_interval) gives the intervals.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence

from study.stats import t_interval

#: (key in a final run's metrics, column title). verified_accuracy is the complete verifier's.
METRICS = (("clean_accuracy", "clean"), ("pgd40_accuracy", "PGD-40 (evaluate)"),
           ("pgd_accuracy", "PGD (verify, 5 restarts)"), ("ibp_verified_accuracy", "IBP-verified"),
           ("verified_accuracy", "complete-verified"))


def metric_stats(values: Sequence[float]) -> Dict[str, Any]:
    """Mean and two-sided 95% t-interval of per-seed fractions, in percent.

    Returns mean, lo, hi, half (the interval's half width; NaN bounds for fewer than 2 seeds), n and
    the per-seed values (percent)."""
    pct = [100.0 * v for v in values]
    m, lo, hi = t_interval(pct)
    return {"mean": m, "lo": lo, "hi": hi, "half": hi - m, "n": len(pct), "values": pct}


def summarise(table: Mapping[str, Mapping[int, Mapping[str, Any]]]) -> Dict[str, Dict[str, Any]]:
    """method -> {metric: metric_stats, seeds, points, timeouts, timeout_fraction} over the seeds found."""
    out: Dict[str, Dict[str, Any]] = {}
    for method, per_seed in table.items():
        seeds = sorted(per_seed)
        row: Dict[str, Any] = {"seeds": seeds}
        if seeds:
            runs = [per_seed[s] for s in seeds]
            row.update({k: metric_stats([r[k] for r in runs]) for k, _ in METRICS})
            points = sum(int(r["n"]) for r in runs)
            timeouts = sum(int(r.get("timeouts", 0)) for r in runs)
            row.update(points=points, timeouts=timeouts, timeout_fraction=timeouts / points if points else 0.0)
        out[method] = row
    return out


def cell(s: Optional[Mapping[str, Any]]) -> str:
    """"mean ± half" (one decimal, percent); "mean (1 seed)" without an interval; "–" without data."""
    if not s:
        return "–"
    if s["n"] < 2:
        return f"{s['mean']:.1f} (1 seed)"
    return f"{s['mean']:.1f} ± {s['half']:.1f}"


def markdown(summary: Mapping[str, Mapping[str, Any]], selection: Optional[Mapping[str, Any]],
             header: Sequence[str]) -> List[str]:
    """The report: ``header`` lines, then one row per method (selected key and value, seeds, metrics,
    timeouts), then each method's validation scores per grid value."""
    sel = (selection or {}).get("arms", {})
    keys = (selection or {}).get("keys", {})
    md = list(header) + ["", "| method | tuned key = selected | seeds | " + " | ".join(t for _, t in METRICS)
                         + " | timeouts |", "|---|---|---|" + "---|" * (len(METRICS) + 1)]
    for method, row in summary.items():
        chosen = f"{keys.get(method, '?')} = {sel[method]:g}" if method in sel else "–"
        seeds = len(row.get("seeds", []))
        cells = [cell(row.get(k)) for k, _ in METRICS]
        to = f"{row['timeouts']}/{row['points']} ({100 * row['timeout_fraction']:.1f}%)" if seeds else "–"
        md.append(f"| {method} | {chosen} | {seeds} | " + " | ".join(cells) + f" | {to} |")
    scores = (selection or {}).get("scores", {})
    if scores:
        md += ["", f"Validation {selection.get('metric')} (%) per grid value, tuning seed(s) "
               f"(selection frozen before any test point was verified):", ""]
        for method in [m for m in summary if m in scores] + [m for m in scores if m not in summary]:
            per_value = sorted(scores[method].items(), key=lambda kv: float(kv[0]))  # JSON sorts "25" before "5"
            vals = ", ".join(f"{v}: " + "/".join(f"{100 * x:.1f}" for x in xs) for v, xs in per_value)
            md.append(f"- {method} ({keys.get(method, '?')}): {vals}")
    return md
