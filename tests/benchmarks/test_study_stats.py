"""Pure statistics of the distillation study (benchmarks/study/stats.py) against exact values.

Closed forms used: Student's t with 2 degrees of freedom has CDF F(t) = 1/2 + t / (2 sqrt(2 + t^2)).
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sstats

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from study import stats  # noqa: E402

T975_2 = 0.95 * math.sqrt(2 / (4 * 0.975 * 0.025))  # t(0.975, df=2) = 4.3026527...


def F2(t: float) -> float:
    return 0.5 + t / (2 * math.sqrt(2 + t * t))


def test_t_interval_mean_and_half_width():
    m, lo, hi = stats.t_interval([1.0, 2.0, 3.0])
    half = T975_2 / math.sqrt(3)  # sd 1
    assert half == pytest.approx(2.4841377, abs=1e-6)
    assert (m, lo, hi) == (2.0, pytest.approx(2 - half, rel=1e-12), pytest.approx(2 + half, rel=1e-12))
    d = [0.5, -1.0, 2.0, 3.5, 1.0]
    ref = sstats.t.interval(0.95, 4, loc=1.2, scale=sstats.sem(d))
    assert stats.t_interval(d)[1:] == (pytest.approx(ref[0], rel=1e-10), pytest.approx(ref[1], rel=1e-10))


def test_t_interval_of_one_difference_has_no_width():
    m, lo, hi = stats.t_interval([4.0])
    assert m == 4.0 and math.isnan(lo) and math.isnan(hi)


def test_paired_t_pvalue_closed_form_df2():
    # t = 2 / (1 / sqrt 3) = 2 sqrt 3; two-sided p = 2 (1 - F(t)) = 1 - 2 sqrt(3/14)
    assert stats.paired_t_pvalue([1.0, 2.0, 3.0]) == pytest.approx(1 - 2 * math.sqrt(3 / 14), rel=1e-9)
    assert 1 - 2 * math.sqrt(3 / 14) == pytest.approx(0.0741799, abs=1e-7)
    assert stats.paired_t_pvalue([-1.0, -2.0, -3.0]) == pytest.approx(0.0741799, abs=1e-7)  # symmetric
    assert stats.paired_t_pvalue([2.0, 2.0, 2.0]) == 0.0 and stats.paired_t_pvalue([0.0, 0.0]) == 1.0
    assert math.isnan(stats.paired_t_pvalue([1.0]))


def test_holm_adjusted_pvalues_by_hand():
    # sorted 0.005 (x4 = 0.02), 0.01 (x3 = 0.03), 0.03 (x2 = 0.06), 0.04 (x1 = 0.04 -> running max 0.06)
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02], rel=1e-12)
    assert stats.holm([0.5, 0.9]) == [1.0, 1.0]                    # capped at 1
    assert stats.holm([0.02]) == [0.02]                            # a family of one: unadjusted
    out = stats.holm([0.01, float("nan"), 0.02])                   # NaN: not counted in m
    assert out[0] == pytest.approx(0.02) and math.isnan(out[1]) and out[2] == pytest.approx(0.02)
    assert stats.holm([]) == []


def test_tost_not_equivalent_when_the_mean_sits_on_the_margin():
    r = stats.tost([1.0, 2.0, 3.0], margin=2.0)
    assert r["p_upper"] == pytest.approx(0.5, abs=1e-12)                        # t = 0
    assert r["p_lower"] == pytest.approx(0.5 - 0.4 * math.sqrt(1.5), rel=1e-9)  # t = 4 sqrt 3
    assert r["p"] == pytest.approx(0.5) and r["equivalent"] == 0.0


def test_tost_equivalent_inside_the_margin_and_matches_the_90_interval():
    d = [0.0, 0.5, -0.5]  # mean 0, se 0.5 / sqrt 3, t = -/+ 4 sqrt 3 for both one-sided tests
    r = stats.tost(d, margin=2.0)
    assert r["p"] == pytest.approx(0.5 - 0.4 * math.sqrt(1.5), rel=1e-9) and r["equivalent"] == 1.0
    half = sstats.t.ppf(0.95, 2) * 0.5 / math.sqrt(3)
    assert (r["lo"], r["hi"]) == (pytest.approx(-half), pytest.approx(half))
    assert -2 < r["lo"] and r["hi"] < 2  # the same decision as the 90% interval inside the margin
    assert stats.tost(d, margin=0.5)["equivalent"] == 0.0


def test_linear_cka_by_hand_and_invariances():
    x = np.array([[1.0], [2.0], [3.0]])
    y = np.array([[1.0], [0.0], [2.0]])
    # centred x = (-1, 0, 1), y = (0, -1, 1): (x.y)^2 / (|x|^2 |y|^2) = 1 / (2 * 2)
    assert stats.linear_cka(x, y) == pytest.approx(0.25, rel=1e-12)
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(50, 6)), rng.normal(size=(50, 4))
    assert stats.linear_cka(a, a) == pytest.approx(1.0, rel=1e-12)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    ref = stats.linear_cka(a, b)
    assert 0 < ref < 1
    assert stats.linear_cka(a @ q, b) == pytest.approx(ref, rel=1e-10)       # orthogonal map
    assert stats.linear_cka(3.7 * a, b) == pytest.approx(ref, rel=1e-10)     # isotropic scaling
    assert stats.linear_cka(a + 5.0, b) == pytest.approx(ref, rel=1e-10)     # a shift (centring)
    assert stats.linear_cka(a, b) == pytest.approx(stats.linear_cka(b, a), rel=1e-12)
    scaled = a * np.array([1, 1, 1, 1, 1, 10.0])                             # anisotropic: not invariant
    assert stats.linear_cka(scaled, b) != pytest.approx(ref, rel=1e-3)
    with pytest.raises(ValueError):
        stats.linear_cka(a, b[:10])


def _rows(extra_decided: int):
    rows = [{"status": "verified-ibp", "time_s": 0.1}] * (17 + extra_decided)
    rows += [{"status": "verified-bab", "time_s": 1.5}, {"status": "attacked", "stage": "bab", "time_s": 4.0},
             {"status": "timeout", "time_s": 30.0}]
    return rows


def test_choose_timeout_fractions_and_choice():
    rows = _rows(0) + [{"status": "misclassified", "time_s": 99.0}]  # decided before BaB whatever its time
    rows[0] = {"status": "attacked", "stage": "pgd", "time_s": 50.0}    # PGD: decided before BaB
    chosen, fr = stats.choose_timeout(rows, [5.0, 1.0, 2.0])
    assert fr == {1.0: 3 / 21, 2.0: 2 / 21, 5.0: 1 / 21}
    assert chosen == 5.0  # 1/21 = 4.8% < 5%
    chosen, fr = stats.choose_timeout(_rows(0), [1.0, 2.0, 5.0])
    assert fr[5.0] == 0.05 and chosen is None  # 1/20 is not fewer than 5%
    chosen, fr = stats.choose_timeout(_rows(20), [1.0, 2.0, 5.0])
    assert fr == {1.0: 3 / 40, 2.0: 2 / 40, 5.0: 1 / 40} and chosen == 5.0


def test_select_highest_mean_ties_to_the_earlier_grid_value():
    grid = (0.1, 0.3, 0.5)
    assert stats.select({0.1: [0.5, 0.7], 0.3: [0.6, 0.61], 0.5: [0.2]}, grid) == 0.3
    assert stats.select({0.5: [0.6], 0.1: [0.4, 0.8]}, grid) == 0.1  # equal means: grid order decides
    assert stats.select({}, grid) is None
    assert stats.select({0.9: [1.0]}, grid) is None                  # a value outside the grid is no candidate
