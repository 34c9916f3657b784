"""Warm-up regularisers of Shi et al. 2021 (docs/method.md §5.6), from IBP pre-activation bounds.

The means and sums over the batch are those of the explicit ``shard``
(:class:`certkd.distributed.Shard`: plain ``mean``/``sum`` for the default ``LOCAL``, over the
global batch for the shard of a multi-process step): the terms are ratios of batch means, which
per-rank means averaged afterwards would not reproduce.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
from torch import Tensor

from certkd.distributed import LOCAL, Shard


def _symmetrize(r: Tensor) -> Tensor:
    return torch.minimum(r, 1.0 / torch.clamp(r, min=1e-12))


def warmup_regularizer(preactivations: Sequence[Tuple[Tensor, Tensor]], input_radius: Tensor,
                       tol: float = 0.5, shard: Shard = LOCAL) -> Tensor:
    """Tightness + ReLU-balance terms, each averaged over ReLU layers, then summed.

    Args:
        preactivations: (center, radius) of the IBP box at every ReLU input, any shape (N, *).
        input_radius: δ0, the mean half-width of the input box in normalised space (scalar tensor).
        tol: τ.
        shard: whose batch the means and sums are over (:data:`certkd.distributed.LOCAL`: this one).
    Returns:
        scalar tensor (0 if there is no ReLU). The caller scales it by λ·(1 − ε_s/ε_max).
    """
    tightness: List[Tensor] = []
    balance: List[Tensor] = []
    for c, delta in preactivations:
        tightness.append(torch.relu(tol - input_radius / torch.clamp(shard.mean(delta), min=1e-12)) / tol)
        # c − δ > 0 ⇔ c > δ and c + δ < 0 ⇔ c < −δ hold exactly in IEEE arithmetic (a rounded difference
        # is 0 only for equal operands and keeps the sign): the same masks without two full-size temporaries
        active, inactive = (c > delta).to(c.dtype), (c < -delta).to(c.dtype)
        r1 = _symmetrize(shard.mean(c * active) / -shard.mean(c * inactive))
        centered = (c - shard.mean(c)) ** 2
        r2 = _symmetrize(shard.sum(centered * active) / shard.sum(centered * inactive))
        term = (torch.relu(tol - r1) + torch.relu(tol - r2)) / tol
        if bool(torch.isfinite(term)):  # docs/method.md §5.6: skipped when NaN or Inf
            balance.append(term)
    total = torch.zeros((), device=input_radius.device)
    if tightness:
        total = total + torch.stack(tightness).mean()
    if balance:  # skipped layers count as 0 in the average over all ReLU layers (Shi et al.)
        total = total + torch.stack(balance).sum() / len(preactivations)
    return total
