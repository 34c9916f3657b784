"""Whether a certificate of a certkd model also holds for the network as torch runs it (docs/verify_onnx.md §5).

IBP, CROWN, BaB and the MILP certify the margins ``z_y − z_j`` of the network in exact arithmetic on its
stored weights (and compute them in floating point themselves). :func:`margin_rounding` bounds how far
the floating-point forward pass, in the model's own dtype and any evaluation order, can move each margin
on the ε box (:func:`certkd.bounds.rounding.rounding_error_bound` on the model's graph). A certified
margin above twice that bound (once for the deployed forward pass, once for the verifier's own
arithmetic in the same precision) is a *float proof*: the point is robust for the network as run.
"""
from __future__ import annotations

from typing import Union

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


__all__ = ["float_proof", "margin_rounding"]
