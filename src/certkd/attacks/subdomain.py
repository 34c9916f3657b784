"""The attack branch and bound runs from every open sub-domain (α-β-CROWN's "BaB attack").

Each undecided sub-domain proposes a start: the box vertex minimising its linear lower bound
(:attr:`certkd.bounds.crown.CrownResult.minimizer`). A few signed-gradient steps on the margin
``z_y − max_{j≠y} z_j`` run from every start at once; points anywhere in the input box are valid
counterexamples, so the steps need not respect the sub-domain's splits. It is :class:`PGD` with
the margin as its loss and given starts instead of random ones, and it stops the whole batch at
the first misclassified iterate (one counterexample ends the search).
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor, nn

from certkd.attacks.pgd import PGD, _expand, margin_loss


class SubdomainAttack(PGD):
    """``attack(model, starts, label, lower, upper) -> (best x (N, *in), its margin (N,))``.

    Args:
        steps: signed-gradient steps (0: only evaluate the starts).
        step_size: relative step; each step moves ``step_size · ρ`` per coordinate, ρ the box's
            half-width (as :class:`PGD`).

    A negative margin is a counterexample. The model is used as it is (BaB holds it in eval mode).
    """

    def __init__(self, steps: int = 5, step_size: float = 0.25):
        super().__init__(steps=steps, step_size=step_size, restarts=1, random_start=False,
                         loss_fn=margin_loss, stop_on_success=False, eval_model=False)

    def __repr__(self) -> str:
        return f"SubdomainAttack(steps={self.steps}, step_size={self.step_size})"

    def __call__(self, model: nn.Module, starts: Tensor, label: int, lower: Tensor,
                 upper: Tensor) -> Tuple[Tensor, Tensor]:
        n = starts.shape[0]
        y = torch.full((n,), int(label), dtype=torch.long, device=starts.device)
        rho = (upper - lower) / 2
        xa = starts.detach()
        best_x, best_m = xa, torch.full((n,), float("inf"), dtype=starts.dtype, device=starts.device)
        for it in range(self.steps + 1):
            xa = xa.detach().requires_grad_(True)
            with torch.enable_grad():
                _, loss = self._score(model, xa, y)        # loss = −margin
                margin = -loss
                grad = torch.autograd.grad(loss.sum(), xa)[0] if it < self.steps else None
            better = margin.detach() < best_m
            best_x = torch.where(_expand(better, xa), xa.detach(), best_x)
            best_m = torch.minimum(best_m, margin.detach())
            if grad is None or bool((best_m < 0).any()):
                break
            xa = torch.max(torch.min(xa.detach() + self.step_size * rho * grad.sign(), upper), lower)
        return best_x, best_m


__all__ = ["SubdomainAttack"]
