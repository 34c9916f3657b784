"""Multi-restart PGD on a general output property (``docs/verify_onnx.md``).

The property's violation is a DNF ``OR_d AND_k g_{d,k}(f(x)) <= 0`` with linear margins
``g = A y − b`` (:class:`certkd.verification.vnnlib.Property`). A point violates disjunct d iff
``v_d(x) = max_k g_{d,k} <= 0``; the attack minimises ``v_d`` for one target disjunct per restart
(and ``min_d v_d`` for the first of each round), as α-β-CROWN's default attack does per
specification row: 100 restarts of 100 signed-gradient steps, starting from the box centre and
uniform random points, with a cosine-decaying step (from half the box's half-width to 1 %), the
best iterate of every restart kept, and an early stop at the first violation.
"""
from __future__ import annotations

import math
import time
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn


class Disjuncts:
    """A DNF's conjunct rows stacked once: rows (R, K), offsets (R,), owner (R,) the disjunct of each row,
    so that the D disjuncts' values cost one matrix product (a 20,000-way ``or`` included)."""

    def __init__(self, mats: Sequence[Tuple[Tensor, Tensor]]):
        self.rows = torch.cat([A for A, _ in mats])
        self.offsets = torch.cat([b for _, b in mats])
        self.owner = torch.cat([torch.full((len(b),), d, dtype=torch.long) for d, (_, b) in enumerate(mats)])
        self.count = len(mats)
        self.single = self.count == len(self.offsets)


def property_values(y: Tensor, mats: Union[Sequence[Tuple[Tensor, Tensor]], Disjuncts]) -> Tensor:
    """v_d = max_k (A_d y − b_d)_k for outputs y (N, K) (or (N, *out), read C-order flattened): (N, D);
    a violation iff some v_d <= 0."""
    spec = mats if isinstance(mats, Disjuncts) else Disjuncts(mats)
    y = y.reshape(y.shape[0], -1)
    g = y @ spec.rows.T - spec.offsets                                        # (N, R)
    if spec.single:  # one row per disjunct (robustness, a flat `or`): the rows are the values
        return g
    v = torch.full((y.shape[0], spec.count), -math.inf, dtype=g.dtype, device=g.device)
    return v.scatter_reduce(1, spec.owner.to(g.device).expand_as(g), g, "amax", include_self=True)


def spec_pgd(model: nn.Module, lower: Tensor, upper: Tensor,
             mats: Union[Sequence[Tuple[Tensor, Tensor]], Disjuncts], *,
             restarts: int = 100, steps: int = 100, batch: int = 50, generator: Optional[torch.Generator] = None,
             deadline: Optional[float] = None) -> Tuple[Tensor, float]:
    """Search the box for a violation of the property given by ``mats``.

    Args:
        model: maps (N, *s) inputs to (N, K) outputs (float32).
        lower, upper: (1, *s) box (inside the property's box).
        mats: per disjunct (A (m_d, K), b (m_d,)), in the model's dtype, or those stacked as :class:`Disjuncts`.
        restarts, steps: restarts (run ``batch`` at a time) and signed-gradient steps each.
        deadline: a ``time.monotonic()`` value after which no further step is taken.
    Returns:
        (x (1, *s) the best point found, its value min_d v_d: <= 0 means a candidate counterexample).
    """
    mats = mats if isinstance(mats, Disjuncts) else Disjuncts(mats)
    rho = (upper - lower) / 2
    targets = mats.count + 1
    best_x, best_v = (lower + upper) / 2, math.inf
    done = 0
    while done < restarts:
        n = min(batch, restarts - done)
        shape = (n,) + tuple(lower.shape[1:])
        x = lower + (upper - lower) * torch.rand(shape, generator=generator, dtype=lower.dtype)
        if done == 0:
            x[0] = ((lower + upper) / 2)[0]
        tgt = torch.tensor([(done + i) % targets for i in range(n)])
        for it in range(steps + 1):
            x = x.detach().requires_grad_(True)
            with torch.enable_grad():
                v = property_values(model(x), mats)                 # (n, D)
                own = v.gather(1, (tgt - 1).clamp(min=0).unsqueeze(1))[:, 0]
                loss = torch.where(tgt == 0, v.min(1).values, own)
                grad = torch.autograd.grad(loss.sum(), x)[0] if it < steps else None
            vmin = v.detach().min(1).values
            i = int(vmin.argmin())
            if float(vmin[i]) < best_v:
                best_v, best_x = float(vmin[i]), x.detach()[i:i + 1].clone()
            if best_v <= 0 or grad is None or (deadline is not None and time.monotonic() > deadline):
                break
            eta = 0.01 + 0.49 * (1 + math.cos(math.pi * it / max(steps, 1))) / 2
            x = torch.max(torch.min(x.detach() - eta * rho * grad.sign(), upper), lower)
        done += n
        if best_v <= 0 or (deadline is not None and time.monotonic() > deadline):
            break
    return best_x, best_v


__all__ = ["property_values", "spec_pgd"]
