"""Tables for the terminal and for papers (Markdown)."""
from __future__ import annotations

from typing import Dict, List, Mapping, Sequence

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
    widths = [max(len(h), *(len(r[i]) for r in lines)) if lines else len(h) for i, h in enumerate(header)]
    fmt = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    out = [fmt(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [fmt(r) for r in lines]
    return "\n".join(out)


def accuracy_table(results: Dict[str, Mapping[str, object]]) -> str:
    """Table of clean / PGD / IBP-verified accuracy for named evaluation results."""
    rows = [dict(r, name=name) for name, r in results.items()]
    return format_table(rows, ACCURACY_COLUMNS)
