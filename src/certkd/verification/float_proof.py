"""Whether a certificate of a certkd model also holds for the network as torch runs it (docs/verify_onnx.md §5).

IBP, CROWN, BaB and the MILP certify the margins ``z_y − z_j`` of the network in exact arithmetic on its
stored weights (and compute them in floating point themselves). :func:`margin_rounding` bounds how far
the floating-point forward pass, in the model's own dtype and any evaluation order, can move each margin
on the ε box (:func:`certkd.bounds.rounding.rounding_error_bound` on the model's graph). A certified
margin above twice that bound (once for the deployed forward pass, once for the verifier's own
arithmetic in the same precision) is a *float proof*: the point is robust for the network as run.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from certkd.bounds.rounding import margin_tolerance, rounding_error_bound
from certkd.bounds.spec import specification_matrix
from certkd.graph.convert import from_module
from certkd.precision import network_dtype


def margin_rounding(model: nn.Module, lower: Tensor, upper: Tensor, label: int) -> np.ndarray:
    """Bound on the rounding error of every margin ``z_y − z_j`` (j ≠ y, increasing j) over the box.

    Args:
        model: the network as it is run, in its own dtype (:func:`certkd.precision.network_dtype`), eval mode.
        lower, upper: (1, C, H, W) (or (1, d)) pixel-space box.
        label: the true class y.
    Returns:
        (K−1,) float64, in the order of :func:`certkd.bounds.spec.specification_matrix`; ``inf`` where a
        layer has no rounding rule.
    """
    shape = tuple(lower.shape[1:])
    err = rounding_error_bound(from_module(model), lower[0], upper[0], network_dtype(model), shape)
    rows = specification_matrix(torch.tensor([int(label)]), err.shape[0])[0].double().numpy()
    return margin_tolerance(err, rows)


def float_proof(margins: Union[Tensor, float], tolerance: np.ndarray) -> bool:
    """Whether certified margins clear twice their rounding bound: per row when ``margins`` has one entry
    per row of ``tolerance`` (K−1,), else (a scalar: the least margin) against the largest bound."""
    m = torch.as_tensor(margins).detach().double().cpu().reshape(-1).numpy()
    if m.size == tolerance.size:
        return bool(np.all(m > 2 * tolerance))
    return bool(m.size > 0 and m.min() > 2 * float(np.max(tolerance)))


class FloatCheck:
    """The float proofs of one point's certificates (``certkd verify RUN``; see the module docstring).

    The margins' rounding bounds are computed on the first certificate (points that are never
    certified pay nothing). ``strict``: a certificate without float proof is held back
    (:meth:`accept` returns None) and remembered for :meth:`unknown`.
    """

    def __init__(self, model: nn.Module, lower: Tensor, upper: Tensor, label: int, strict: bool):
        self.model, self.lower, self.upper, self.label, self.strict = model, lower, upper, int(label), strict
        self._tol: Optional[np.ndarray] = None
        self._exact: Optional[Tuple[str, float]] = None  # the first certificate held back (stage, margin)

    @property
    def tolerance(self) -> np.ndarray:
        """(K−1,) bounds on the rounding error of the margins (:func:`margin_rounding`)."""
        if self._tol is None:
            self._tol = margin_rounding(self.model, self.lower, self.upper, self.label)
        return self._tol

    def accept(self, status: str, margins: Union[Tensor, float, None]) -> Optional[Tuple[float, Dict[str, Any]]]:
        """(least margin, the row's ``rounding_bound``/``float_proof``) of a certificate with margins
        (1, K−1) per row or the least one; None if it certifies nothing or is held back."""
        margin = float(torch.as_tensor(margins).min()) if margins is not None else math.nan
        if not margin > 0:
            return None
        ok = float_proof(margins, self.tolerance)
        if self.strict and not ok:
            self._exact = self._exact or (status, margin)
            return None
        return margin, {"rounding_bound": float(np.max(self.tolerance)), "float_proof": ok}

    def complete_tolerance(self) -> Dict[str, float]:
        """Keyword arguments of BaB and the MILP: under ``strict``, prove the margin above twice the bound."""
        return {"margin_tol": max(1e-6, 2 * float(np.max(self.tolerance)))} if self.strict else {}

    def unknown(self) -> Optional[Tuple[float, Dict[str, Any]]]:
        """(margin, fields) of the ``unknown`` row of a point certified in exact arithmetic only; None if none was."""
        if self._exact is None:
            return None
        status, margin = self._exact
        bound = float(np.max(self.tolerance))
        return margin, {"rounding_bound": bound, "float_proof": False,
                        "note": f"{status} in exact arithmetic (margin {margin:.3g}), not above twice the rounding "
                                f"bound {bound:.3g} of the network as run (strict_rounding)"}


__all__ = ["FloatCheck", "float_proof", "margin_rounding"]
