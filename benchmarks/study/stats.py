"""Pure statistics of the distillation study (docs/distillation_study/plan.md).

Everything here takes plain numbers and returns plain numbers: paired differences in points with
95% t-intervals, two-sided paired t-test p-values, Holm's step-down correction, the two one-sided
tests (TOST) of equivalence, linear CKA between two feature matrices, the choice of a per-point
verification time from a pilot, and the selection rule of a tuning grid.
"""
from __future__ import annotations

import math
import statistics
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np


def _t():
    from scipy import stats  # scipy ships with scikit-learn, which certkd's digits need

    return stats.t


def t_interval(diffs: Sequence[float], level: float = 0.95) -> Tuple[float, float, float]:
    """Mean and two-sided ``level`` t-interval of paired differences (NaN bounds for fewer than 2)."""
    m = statistics.fmean(diffs)
    if len(diffs) < 2:
        return m, float("nan"), float("nan")
    half = _t().ppf(0.5 + level / 2, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return m, m - half, m + half


def paired_t_pvalue(diffs: Sequence[float]) -> float:
    """Two-sided p-value of the paired t-test of mean difference 0 (NaN for < 2 differences;
    0 or 1 when every difference is equal: a non-zero constant is certain, zeros show nothing)."""
    if len(diffs) < 2:
        return float("nan")
    m, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    if sd == 0:
        return 1.0 if m == 0 else 0.0
    t = abs(m) / (sd / math.sqrt(len(diffs)))
    return float(2 * _t().sf(t, len(diffs) - 1))


def holm(pvalues: Sequence[float]) -> List[float]:
    """Holm's step-down adjusted p-values, in the input order.

    Sorted ascending p_(1) <= ... <= p_(m): adjusted p_(i) = max_{j <= i} min(1, (m - j + 1) p_(j)).
    A comparison is significant at family-wise level a when its adjusted p-value is <= a.
    NaN p-values (a comparison without data) stay NaN and do not count in m.
    """
    idx = [i for i, p in enumerate(pvalues) if not math.isnan(p)]
    order = sorted(idx, key=lambda i: pvalues[i])
    m = len(order)
    out = [float("nan")] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        out[i] = running
    return out


def tost(diffs: Sequence[float], margin: float, alpha: float = 0.05) -> Dict[str, float]:
    """Two one-sided paired t-tests of equivalence: is the mean difference inside (-margin, +margin)?

    H0a: mean <= -margin (p_lower), H0b: mean >= +margin (p_upper); p = max of the two, and
    ``equivalent`` when p < alpha, the same as the (1 - 2 alpha) t-interval lying inside the margin.
    Returns mean, p_lower, p_upper, p, the (1 - 2 alpha) interval and equivalent (1.0 or 0.0).
    """
    n = len(diffs)
    m = statistics.fmean(diffs)
    if n < 2:
        nan = float("nan")
        return {"mean": m, "p_lower": nan, "p_upper": nan, "p": nan, "lo": nan, "hi": nan, "equivalent": 0.0}
    se = statistics.stdev(diffs) / math.sqrt(n)
    t = _t()
    if se == 0:
        p_lower = 0.0 if m > -margin else 1.0
        p_upper = 0.0 if m < margin else 1.0
    else:
        p_lower = float(t.sf((m + margin) / se, n - 1))
        p_upper = float(t.cdf((m - margin) / se, n - 1))
    _, lo, hi = t_interval(diffs, 1 - 2 * alpha)
    p = max(p_lower, p_upper)
    return {"mean": m, "p_lower": p_lower, "p_upper": p_upper, "p": p, "lo": lo, "hi": hi,
            "equivalent": float(p < alpha)}


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA (Kornblith et al. 2019) of two feature matrices of the same points.

    Args:
        x: (n, p) features of n points; y: (n, q) features of the same n points.
    Returns:
        ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F) with columns centred: 1 for the same
        features, invariant to orthogonal maps and isotropic scaling of either side.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"need (n, p) and (n, q) matrices of the same n, got {x.shape} and {y.shape}")
    xc, yc = x - x.mean(0), y - y.mean(0)
    num = np.linalg.norm(yc.T @ xc) ** 2
    den = np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc)
    return float(num / den) if den > 0 else float("nan")


#: Statuses decided before branch and bound, whatever the per-point time (certkd.verification.pipeline).
DECIDED_BEFORE_BAB = ("misclassified", "verified-ibp", "verified-crown", "verified-alpha-crown")


def would_time_out(row: Mapping[str, object], limit: float) -> bool:
    """Would this pilot row (verified with a longer time) time out at ``limit`` seconds per point?"""
    status = row["status"]
    if status == "timeout":
        return True
    if status in DECIDED_BEFORE_BAB or (status == "attacked" and row.get("stage", "pgd") == "pgd"):
        return False
    return float(row["time_s"]) > limit  # decided by BaB/MILP: only within the time it took


def choose_timeout(rows: Sequence[Mapping[str, object]], candidates: Iterable[float],
                   max_fraction: float = 0.05) -> Tuple[Optional[float], Dict[float, float]]:
    """The smallest candidate per-point time at which fewer than ``max_fraction`` of the pilot's
    points time out (None if none does), and the timed-out fraction at every candidate."""
    fractions = {}
    for c in sorted(candidates):
        fractions[c] = sum(would_time_out(r, c) for r in rows) / len(rows) if rows else float("nan")
    chosen = next((c for c, f in fractions.items() if f < max_fraction), None)
    return chosen, fractions


def select(scores: Mapping[float, Sequence[float]], grid: Sequence[float]) -> Optional[float]:
    """The grid value with the highest mean score; ties go to the earlier grid value.

    Args:
        scores: grid value -> per-seed validation scores (values missing from it are not candidates).
        grid: the arm's grid in its stated order.
    """
    best, best_mean = None, -math.inf
    for v in grid:
        vals = scores.get(v)
        if vals:
            m = statistics.fmean(vals)
            if m > best_mean:
                best, best_mean = v, m
    return best
