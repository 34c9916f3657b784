"""The HiGHS solver wrapper of the MILP verifier (:mod:`certkd.verification.milp`).

* :func:`_highspy` imports the optional ``highspy`` dependency and, once per process, absorbs the
  copyright banner HiGHS prints to file descriptor 1 when its first instance is built;
* :func:`_run_highs` runs a solve, retrying once after resetting HiGHS's process-wide thread
  scheduler;
* :func:`_highs_lp` turns an encoding (:class:`~certkd.verification.milp_encoding._Encoding`)
  into a ``HighsLp`` model.
"""
from __future__ import annotations

from typing import Any

import numpy as np



def _highspy():
    try:
        import highspy
    except ImportError as err:  # optional dependency (extra "verify")
        raise ImportError("MILP verification needs highspy: pip install 'certkd[verify]' (or highspy)") from err
    if not getattr(highspy, "_certkd_banner_done", False):
        _absorb_banner(highspy)
    return highspy


def _absorb_banner(highspy) -> None:
    """HiGHS prints a copyright banner to file descriptor 1 when the first instance is built.

    It would corrupt ``certkd verify``'s table (and any JSON a user pipes from stdout), and
    ``silent()`` can only be called after construction, so the first instance is built with
    fd 1 pointed at /dev/null.
    """
    import os
    import sys

    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)
    highspy._certkd_banner_done = True


def _run_highs(h) -> None:
    """``h.run()``; HiGHS's thread scheduler is process-wide and fixed by the first solve, so a solve
    asking for another thread count fails: then the scheduler is reset once and the solve retried."""
    highspy = _highspy()

    status = h.run()
    if status == highspy.HighsStatus.kError and h.getModelStatus() == highspy.HighsModelStatus.kNotset:
        highspy.Highs.resetGlobalScheduler(True)
        status = h.run()
    if status == highspy.HighsStatus.kError:
        raise RuntimeError(f"HiGHS failed: {h.modelStatusToString(h.getModelStatus())}")


def _highs_lp(enc: Any, cost: np.ndarray, offset: float, relax: bool = False):
    highspy = _highspy()

    lp = highspy.HighsLp()
    lp.num_col_ = enc.num_col
    lp.num_row_ = enc.rows.shape[0]
    lp.col_cost_ = cost
    lp.col_lower_ = enc.col_lower
    lp.col_upper_ = enc.col_upper
    lp.row_lower_ = enc.row_lower
    lp.row_upper_ = enc.row_upper
    lp.offset_ = float(offset)
    lp.a_matrix_.format_ = highspy.MatrixFormat.kRowwise
    lp.a_matrix_.start_ = enc.rows.indptr.astype(np.int32)
    lp.a_matrix_.index_ = enc.rows.indices.astype(np.int32)
    lp.a_matrix_.value_ = enc.rows.data
    lp.a_matrix_.num_col_ = enc.num_col
    lp.a_matrix_.num_row_ = enc.rows.shape[0]
    if enc.integer.any() and not relax:
        lp.integrality_ = [highspy.HighsVarType.kInteger if i else highspy.HighsVarType.kContinuous
                           for i in enc.integer]
    return lp
