"""Collect a study's final results and write report.md and results.json (docs/distillation_study/plan.md).

The pure part (:func:`analyse`, :func:`render`) takes per-seed summaries and returns numbers and
lines; :func:`collect` reads them from a study folder.
"""
from __future__ import annotations

import json
import statistics
from itertools import combinations
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

from study.design import (BASELINE, COMPARISONS, FAMILY_LEVEL, SELECT_METRIC, TOST_MARGIN, TOST_PAIR, Setting)
from study.stats import holm, linear_cka, paired_t_pvalue, t_interval, tost

KEYS = (("clean_accuracy", "clean"), ("pgd_accuracy", "PGD (5 restarts)"), ("ibp_verified_accuracy", "IBP"),
        ("verified_accuracy", "verified (complete)"))
PRIMARY = "verified_accuracy"

Table = Mapping[str, Mapping[int, Mapping[str, Any]]]   # arm -> seed -> test summary


def paired_diffs(table: Table, a: str, b: str, key: str = PRIMARY) -> List[float]:
    """100 * (a - b) on the seeds both arms have, in seed order (points)."""
    if a not in table or b not in table:
        return []
    return [100 * (table[a][s][key] - table[b][s][key]) for s in sorted(set(table[a]) & set(table[b]))]


def analyse(table: Table) -> Dict[str, Any]:
    """The named comparisons with intervals, p-values and Holm-adjusted p-values, and the TOST."""
    rows = []
    for a, b in COMPARISONS:
        d = paired_diffs(table, a, b)
        if not d:
            continue
        m, lo, hi = t_interval(d)
        rows.append({"a": a, "b": b, "n": len(d), "mean": m, "lo": lo, "hi": hi, "p": paired_t_pvalue(d),
                     "positive": sum(x > 0 for x in d), "diffs": d})
    for row, adj in zip(rows, holm([r["p"] for r in rows])):
        row["p_holm"] = adj
        row["significant"] = bool(adj <= FAMILY_LEVEL)
    d = paired_diffs(table, *TOST_PAIR)
    eq = tost(d, TOST_MARGIN) if len(d) else None
    return {"comparisons": rows, "tost": eq and {"pair": list(TOST_PAIR), "margin": TOST_MARGIN, **eq}}


def cka_summary(names: Sequence[str], matrix: Sequence[Sequence[float]]) -> Dict[str, List[float]]:
    """CKA values of every teacher pair, grouped "pgd-at×pgd-at", "pgd-at×standard", ... (type = name
    before "-s")."""
    out: Dict[str, List[float]] = {}
    for i, j in combinations(range(len(names)), 2):
        ti, tj = sorted((names[i].rsplit("-s", 1)[0], names[j].rsplit("-s", 1)[0]))
        out.setdefault(f"{ti}×{tj}", []).append(float(matrix[i][j]))
    return out


def cka_matrix(features: Sequence[Any]) -> List[List[float]]:
    n = len(features)
    return [[1.0 if i == j else linear_cka(features[i], features[j]) for j in range(n)] for i in range(n)]


def _fmt_p(p: float) -> str:
    return "–" if p != p else (f"{p:.4f}" if p >= 1e-4 else f"{p:.1e}")


def _ms(vals: Sequence[float]) -> str:
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{statistics.fmean(vals):.1f} ± {sd:.1f}"


def render(name: str, res: Mapping[str, Any]) -> List[str]:
    """Markdown lines of one setting's section."""
    sel = res.get("selection") or {}
    smoke = " — SMOKE RUN, no claim rests on it" if res.get("smoke") else ""
    md = [f"## {name}{smoke}", "", f"{res.get('note', '')}. Per-point verification time {res.get('timeout_s')} s "
          f"(pilot: {res.get('pilot_line', 'none')}); selection by mean validation {SELECT_METRIC} over the "
          f"tuning seeds; α* = {sel.get('alpha')}.", "",
          "| arm | selected | seeds | n | " + " | ".join(lbl for _, lbl in KEYS) + " | timeouts |",
          "|---|---|---|---|" + "---|" * (len(KEYS) + 1)]
    table = res["arms"]
    for arm, per_seed in table.items():
        if not per_seed:
            md.append(f"| {arm} | {sel.get('arms', {}).get(arm, '–')} | 0 | – |" + " – |" * (len(KEYS) + 1))
            continue
        ms = list(per_seed.values())
        cells = [_ms([100 * m[k] for m in ms]) for k, _ in KEYS]
        to, n = sum(m.get("timeouts", 0) for m in ms), sum(m["n"] for m in ms)
        ns = "/".join(str(x) for x in sorted({m["n"] for m in ms}))
        md.append(f"| {arm} | {sel.get('arms', {}).get(arm, '–')} | {len(ms)} | {ns} | " + " | ".join(cells)
                  + f" | {to} ({100 * to / n:.1f}%) |")
    for note in res.get("unavailable", []):
        md.append(f"\nNot run: {note}")
    an = res["analysis"]
    if an["comparisons"]:
        md += ["", f"Paired differences of test verified accuracy (points, a − b, 95% t-interval); Holm family: the "
               f"{len(an['comparisons'])} comparisons below, level {FAMILY_LEVEL}.", "",
               "| a − b | seeds | mean [95% CI] | a > b | p | p (Holm) | significant |", "|---|---|---|---|---|---|---|"]
        for c in an["comparisons"]:
            ci = f"[{c['lo']:+.2f}, {c['hi']:+.2f}]" if c["n"] > 1 else "[one seed]"
            md.append(f"| {c['a']} − {c['b']} | {c['n']} | {c['mean']:+.2f} {ci} | {c['positive']}/{c['n']} | "
                      f"{_fmt_p(c['p'])} | {_fmt_p(c['p_holm'])} | {'yes' if c['significant'] else 'no'} |")
    eq = an.get("tost")
    if eq:
        verdict = "equivalent" if eq["equivalent"] else "not shown equivalent"
        md += ["", f"Equivalence (TOST, margin ±{eq['margin']:g} points, fixed before running) of "
               f"{eq['pair'][0]} and {eq['pair'][1]}: mean {eq['mean']:+.2f}, 90% CI [{eq['lo']:+.2f}, {eq['hi']:+.2f}], "
               f"p = {_fmt_p(eq['p'])}: {verdict}."]
    teachers = res.get("teachers") or {}
    if teachers:
        md += ["", "| teacher | clean | PGD-40 | n |", "|---|---|---|---|"]
        md += [f"| {t} | {100 * m['clean_accuracy']:.1f} | {100 * m['pgd_accuracy']:.1f} | {m['n']} |"
               for t, m in teachers.items()]
    cka = res.get("cka")
    if cka:
        md += ["", f"Linear CKA of the teachers' features on {cka['points']} validation images (pairs: mean, min–max): "
               + "; ".join(f"{k} {statistics.fmean(v):.3f} ({min(v):.3f}–{max(v):.3f}, {len(v)} pairs)"
                           for k, v in cka_summary(cka["teachers"], cka["matrix"]).items())]
    md.append("")
    return md


def report_lines(results: Mapping[str, Any], command: str, commits: Mapping[str, int], mixed: bool,
                 report_state: Mapping[str, Any]) -> List[str]:
    md = ["# CC-Dist study under issue #21's protocol", "",
          f"Command: `{command}`. Protocol and the claims each outcome supports: docs/distillation_study/plan.md.", "",
          "Results made under commit(s): " + ", ".join(f"`{k}` ({n} stage events)" for k, n in commits.items())
          + f"; report written at `{report_state['commit']}`{' (dirty tree)' if report_state.get('dirty') else ''}.",
          ""]
    if mixed:
        md += ["**Mixed commits (--allow-mixed): these numbers were not made by one version of the code.**", ""]
    md += ["Accuracies in % (mean ± sd over seeds) on the test points, verified once per final run with the "
           "complete verifier; student seed k distils teacher seed k.", ""]
    for name, res in results.items():
        md += render(name, res)
    return md


def settings_table(root: Path, setting: Setting, arms: Sequence[str]) -> Dict[str, Dict[int, Dict[str, Any]]]:
    """arm -> seed -> complete test summary of the final runs found."""
    from study.execute import read_summary
    from study.planner import final_dir

    out: Dict[str, Dict[int, Dict[str, Any]]] = {}
    for a in arms:
        out[a] = {}
        for s in setting.report_seeds():
            summ = read_summary(final_dir(root, setting, a, s), "test")
            if summ is not None:
                out[a][s] = summ
    return out


def baseline_first(arms: Sequence[str]) -> List[str]:
    return [BASELINE] + [a for a in arms if a != BASELINE]


def dump(path: Path, obj: Any) -> None:
    from certkd.checkpoints import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n")


def load_json(path: Path) -> Optional[Any]:
    return json.loads(path.read_text()) if path.exists() else None
