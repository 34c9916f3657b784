"""The cosine distance between features and its sound upper bound over a box (docs/method.md §7.4).

Pure tensor functions, shapes ``(*batch, m)`` → ``(*batch,)``. The cosine is taken with each
norm clamped below at :data:`COS_EPS` (as ``torch.nn.functional.cosine_similarity`` does), then
clamped to ``[-1, 1]``, so ``D = 1 - cos`` lies in ``[0, 2]`` and a zero vector has ``D = 1``.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["COS_EPS", "cosine_distance", "cosine_distance_bound"]

COS_EPS = 1e-8


def _norm(squares: Tensor) -> Tensor:
    """``sqrt(sum(squares))`` over the last dimension with a zero (not NaN) gradient at 0."""
    s = squares.sum(dim=-1)
    positive = s > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, s, torch.ones_like(s))), torch.zeros_like(s))


def cosine_distance(v: Tensor, t: Tensor) -> Tensor:
    """``1 - cos(v, t)`` per sample: ``1 - v·t / (max(|v|, ε) max(|t|, ε))``, cos clamped to [-1, 1].

    Args:
        v: features, shape ``(N, m)``.
        t: targets, shape ``(N, m)``.

    Returns:
        Shape ``(N,)``, values in ``[0, 2]``.
    """
    dot = (v * t).sum(dim=-1)
    den = _norm(v * v).clamp(min=COS_EPS) * _norm(t * t).clamp(min=COS_EPS)
    return 1.0 - (dot / den).clamp(-1.0, 1.0)


def cosine_distance_bound(lower: Tensor, upper: Tensor, t: Tensor) -> Tensor:
    """An upper bound on ``max_{v in [l, u]} (1 - cos(v, t))`` (docs/method.md §7.4).

    With ``p = sum_k min(l_k t_k, u_k t_k)`` (the exact minimum of ``v·t`` over the box) and
    ``n_hi``, ``n_lo`` the largest and smallest ``|v|`` over the box, ``cos(v, t) >= p / (n_hi |t|)``
    when ``p >= 0`` and ``>= p / (n_lo |t|)`` when ``p < 0`` (norms clamped at ε as in
    :func:`cosine_distance`; the bound is then clamped to ``[-1, 1]``). For a box of zero width
    (``l = u = v``) it equals ``cosine_distance(v, t)`` bit for bit. It holds in exact arithmetic;
    float rounding of the sums can move either side by a few ulps of ``m``.

    Args:
        lower, upper: the box, shape ``(N, m)``, ``lower <= upper``.
        t: targets, shape ``(N, m)``.

    Returns:
        Shape ``(N,)``, values in ``[0, 2]``.
    """
    p = torch.minimum(lower * t, upper * t).sum(dim=-1)
    far = torch.maximum(lower.abs(), upper.abs())
    near = lower.clamp(min=0) - upper.clamp(max=0)  # distance from 0 to [l_k, u_k]: 0 when the box holds 0
    n_hi, n_lo = _norm(far * far), _norm(near * near)
    n_v = torch.where(p >= 0, n_hi, n_lo).clamp(min=COS_EPS)
    den = n_v * _norm(t * t).clamp(min=COS_EPS)
    return 1.0 - (p / den).clamp(-1.0, 1.0)
