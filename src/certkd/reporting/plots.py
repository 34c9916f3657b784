"""Plots of a report: the clean-vs-certified Pareto plot and per-run training curves (matplotlib,
imported only when a plot is drawn).
"""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

from certkd.checkpoints import atomic_write_bytes
from certkd.errors import CertkdError
from certkd.reporting.groups import Group
from certkd.reporting.records import FAMILIES, RunRecord

_STYLE = {"teacher": ("s", "tab:gray"), "certified": ("o", "tab:blue"), "distillation": ("^", "tab:red"),
          "other": ("D", "tab:green")}


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise CertkdError("plots need matplotlib: pip install 'certkd[report]' (or pip install matplotlib)") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save_png(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def pareto_front(points: Sequence[Tuple[float, float]]) -> List[int]:
    """Indices of the points not dominated (maximising both coordinates), sorted by x."""
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any((x2 >= x and y2 >= y) and (x2 > x or y2 > y) for j, (x2, y2) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], -points[i][1]))


def plot_pareto(groups: Sequence[Group], path, title: str = "") -> Optional[Path]:
    """Clean accuracy (x) against verified accuracy (y) per group, seeds as faint points.

    Filled markers: y from a complete verifier (verification.json); hollow: IBP-verified
    (evaluation.json), a lower bound. Error bars: sample std over seeds. The Pareto front of the
    group means is drawn as a staircase. Returns None when no group has both numbers.
    """
    plt = _pyplot()
    from matplotlib.lines import Line2D

    pts, items, extent = [], [], []  # extent: every plotted coordinate (seeds, error bars) for the limits
    for g in groups:
        x, y, complete = g.pareto()
        if x.mean is not None and y.mean is not None:
            pts.append((100 * x.mean, 100 * y.mean))
            items.append((g, x, y, complete))
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 5.0))
    for (g, x, y, complete), (px, py) in zip(items, pts):
        marker, colour = _STYLE[g.family]
        if len(g.runs) > 1:  # individual seeds
            for r in g.runs:
                rx = r.value("clean_accuracy")
                ry = r.pareto_y()[0] if complete else r.value("ibp_verified_accuracy")
                if rx is not None and ry is not None:
                    ax.scatter(100 * rx, 100 * ry, marker=marker, s=14, color=colour, alpha=0.35, linewidths=0)
                    extent.append((100 * rx, 100 * ry))
        sx, sy = 100 * (x.std or 0.0), 100 * (y.std or 0.0)
        extent += [(px - sx, py - sy), (px + sx, py + sy)]
        if x.std is not None or y.std is not None:
            ax.errorbar(px, py, xerr=None if x.std is None else 100 * x.std,
                        yerr=None if y.std is None else 100 * y.std, fmt="none", ecolor=colour, elinewidth=1,
                        capsize=3, alpha=0.8)
        ax.scatter(px, py, marker=marker, s=70, zorder=3, linewidths=1.5,
                   facecolors=colour if complete else "white", edgecolors=colour)
    front = pareto_front(pts)
    if len(front) > 1:
        ax.step([pts[i][0] for i in front], [pts[i][1] for i in front], where="pre", linestyle="--", color="black",
                linewidth=1, zorder=2)
    else:
        ax.scatter([pts[front[0]][0]], [pts[front[0]][1]], s=220, facecolors="none", edgecolors="black",
                   linestyle="--", zorder=2)
    xs, ys = [p[0] for p in pts + extent], [p[1] for p in pts + extent]
    pad_x = max(1.5, 0.08 * (max(xs) - min(xs)))
    pad_y = max(1.5, 0.08 * (max(ys) - min(ys)))
    x0, x1 = max(-1.5, min(xs) - pad_x), min(101.5, max(xs) + 2.5 * pad_x)
    y0, y1 = max(-1.5, min(ys) - pad_y), min(101.5, max(ys) + 2 * pad_y)
    x1, y1 = max(x1, x0 + 10), max(y1, y0 + 10)  # at least 10 points per axis: no magnified noise
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    ax.set_xlabel("standard (clean) accuracy [%]")
    ax.set_ylabel("verified robust accuracy [%]")
    ax.grid(True, alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    handles = [Line2D([], [], marker=_STYLE[f][0], color=_STYLE[f][1], linestyle="none", markersize=8, label=label)
               for f, label in FAMILIES if any(g.family == f for g, *_ in items)]
    handles += [Line2D([], [], color="black", linestyle="--", linewidth=1, label="Pareto front (group means)"),
                Line2D([], [], marker="o", color="0.35", linestyle="none", markersize=7,
                       label="filled: complete verifier"),
                Line2D([], [], marker="o", color="0.35", markerfacecolor="white", linestyle="none", markersize=7,
                       label="hollow: IBP-verified (lower bound)")]
    if any(len(g.runs) > 1 for g, *_ in items):
        handles.append(Line2D([], [], marker="o", color="0.35", alpha=0.35, linestyle="none", markersize=4,
                              label="single seeds; bars: ± std"))
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0,
              frameon=False)
    _place_labels(fig, ax, [(px, py, g.name) for (g, *_), (px, py) in zip(items, pts)])
    out = Path(path)
    _save_png(fig, out)
    plt.close(fig)
    return out


def _place_labels(fig, ax, items: Sequence[Tuple[float, float, str]]) -> None:
    """Annotate points so that labels overlap neither each other nor the markers, where possible:
    each label takes the first free spot of a list of offsets (a leader line when far)."""
    from matplotlib.transforms import Bbox

    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    axes_box = ax.get_window_extent(renderer)
    to_px = ax.transData.transform
    blocked = [Bbox.from_extents(*(to_px((x, y)) - 7), *(to_px((x, y)) + 7)) for x, y, _ in items]
    placed: List[Any] = []
    near = [(6, 4), (6, -4), (-6, 4), (-6, -4), (0, 9), (0, -9)]
    far = [(dx, dy) for r in (18, 30, 45, 60) for dx, dy in ((r, r), (r, -r), (-r, r), (-r, -r), (0, r), (0, -r),
                                                                (r, 0), (-r, 0))]

    def area(a, b) -> float:
        w = min(a.x1, b.x1) - max(a.x0, b.x0)
        h = min(a.y1, b.y1) - max(a.y0, b.y0)
        return w * h if w > 0 and h > 0 else 0.0

    order = sorted(range(len(items)), key=lambda i: -items[i][1])
    for i in order:
        x, y, text = items[i]
        best = None
        for dx, dy in near + far:
            ha = "left" if dx > 0 else "right" if dx < 0 else "center"
            va = "bottom" if dy > 0 else "top" if dy < 0 else "center"
            t = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", ha=ha, va=va, fontsize=7.5,
                            color="0.1")
            bb = t.get_window_extent(renderer).expanded(1.04, 1.15)
            t.remove()
            outside = bb.width * bb.height - area(bb, axes_box)
            cost = sum(area(bb, o) for o in placed + [b for j, b in enumerate(blocked) if j != i]) + 3 * outside
            cost += 0.05 * (abs(dx) + abs(dy))  # prefer near spots among equally free ones
            if best is None or cost < best[0]:
                best = (cost, dx, dy, ha, va, bb)
            if cost < 1.0:
                break
        _, dx, dy, ha, va, bb = best
        arrow = dict(arrowstyle="-", color="0.5", linewidth=0.6) if (dx, dy) not in near else None
        ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", ha=ha, va=va, fontsize=7.5,
                    color="0.1", arrowprops=arrow)
        placed.append(bb)


#: Loss terms of metrics.jsonl's "train" records (epoch means), with their legend labels.
LOSS_COMPONENTS = (("ce_clean", "clean cross-entropy"), ("ce_adv", "adversarial cross-entropy"),
                   ("kl", "TRADES KL"), ("robust_loss", "certified / expressive loss"), ("ibp_loss", "IBP loss"),
                   ("reg", "warm-up regulariser (before λ)"))


def plot_curves(run: RunRecord, path) -> Optional[Path]:
    """Training curves of one run from metrics.jsonl, per (integer) epoch: the total training loss, its
    components, the distillation term on its own (distillation methods), the ε schedule, the test
    accuracies and the training-batch accuracies."""
    if not run.metrics:
        return None
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    recs = sorted(run.metrics, key=lambda m: m["epoch"])
    ep = [m["epoch"] for m in recs]
    train = [m.get("train", {}) for m in recs]
    nan = float("nan")
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.6))
    ax_loss, ax_comp, ax_dist, ax_eps, ax_test, ax_acc = axes.flat
    ax_loss.plot(ep, [t.get("loss", nan) for t in train], marker="o", markersize=3, color="tab:purple")
    ax_loss.set_title("training loss (total)")
    shown = 0
    for key, label in LOSS_COMPONENTS:
        values = [t.get(key, nan) for t in train]
        if any(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            ax_comp.plot(ep, values, marker="o", markersize=3, label=label)
            shown += 1
    ax_comp.set_title("loss components (unweighted)")
    if shown:
        ax_comp.legend(fontsize=7)
    dist = [t.get("dist", nan) for t in train]
    if any(isinstance(v, (int, float)) and math.isfinite(v) for v in dist):
        ax_dist.plot(ep, dist, marker="o", markersize=3, color="tab:red", label="D (unweighted)")
        ax_dist.set_title(f"distillation term D (the loss adds β·D, β={run.config.beta:g})", fontsize=9)
        ax_dist.legend(fontsize=7)
    else:
        ax_dist.set_title("distillation term", fontsize=9)
        ax_dist.text(0.5, 0.5, "none: not a distillation run", ha="center", va="center", transform=ax_dist.transAxes,
                     color="0.4")
        ax_dist.set_yticks([])
    ax_eps.plot(ep, [t.get("eps", nan) for t in train], marker="o", markersize=3, color="tab:orange",
                label="mean training ε")
    target = run.config.eps * run.config.train_eps_mul
    ax_eps.axhline(target, linestyle="--", color="0.4", linewidth=1, label=f"target training ε={target:g}")
    ax_eps.set_title("ε schedule")
    ax_eps.legend(fontsize=7)
    tests = [m for m in recs if isinstance(m.get("test"), dict)]
    for key, label, colour in (("clean_accuracy", "clean", "tab:green"), ("pgd_accuracy", "PGD", "tab:red"),
                               ("ibp_verified_accuracy", "IBP-verified", "tab:blue")):
        ax_test.plot([m["epoch"] for m in tests], [100 * m["test"].get(key, nan) for m in tests],
                     marker="o", markersize=4, label=label, color=colour)
    n = tests[-1]["test"].get("n") if tests else None
    ax_test.set_title("test accuracy [%]" + (f" (n={n})" if n else ""))
    ax_test.set_ylim(-2, 102)
    if tests:
        ax_test.legend(fontsize=7)
    for key, label in (("acc_clean", "clean"), ("acc_adv", "adversarial"), ("acc_ibp", "IBP-verified")):
        values = [100 * t[key] if isinstance(t.get(key), (int, float)) else nan for t in train]
        if any(math.isfinite(v) for v in values):
            ax_acc.plot(ep, values, marker="o", markersize=3, label=label)
    ax_acc.set_title("training-batch accuracy [%] (at the training ε)", fontsize=9)
    ax_acc.set_ylim(-2, 102)
    if ax_acc.lines:
        ax_acc.legend(fontsize=7)
    lo, hi = min(ep), max(ep)
    pad = max(0.3, 0.04 * (hi - lo))
    for ax in axes.flat:  # one epoch axis for all panels, whole epochs only
        ax.set_xlabel("epoch")
        ax.set_xlim(lo - pad, hi + pad)
        if hi - lo <= 12:
            ax.set_xticks(list(range(lo, hi + 1)))
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
    notes = run.notes()
    fig.suptitle(f"{run.name} ({run.method})" + (f": {'; '.join(notes)}" if notes else ""), fontsize=10)
    fig.tight_layout()
    out = Path(path)
    _save_png(fig, out)
    plt.close(fig)
    return out


