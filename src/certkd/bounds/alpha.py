"""α/β optimisation of α-CROWN and β-CROWN (docs/method.md §10.2).

:func:`optimise_bound` runs the projected Adam ascent of the final CROWN bound over the lower
activation parameters α (each rule's :class:`~certkd.graph.layers.Relaxation` gives their sound
range, e.g. ReLU's lower slope in [0, 1]) and, with split constraints, the multipliers β ≥ 0 (see
:func:`certkd.bounds.crown.alpha_crown_bounds` for what is optimised and why it stays sound);
the intermediate bounds and their relaxations are fixed by the caller.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from certkd.bounds.crown_backward import _backward, _concretize, _Plan
from certkd.graph.layers import Relaxation


def initial_alphas(relax: Sequence[Relaxation], alpha_init: Optional[Sequence[Optional[Tensor]]], n: int, s: int,
                   like: Tensor) -> List[Optional[Tensor]]:
    """Per activation layer the α leaf (N, S, *alpha_shape) to optimise, or None without any.

    Initialised to the relaxation's default (CROWN's), or to ``alpha_init[k]`` (broadcastable),
    projected into the sound range.
    """
    alphas: List[Optional[Tensor]] = []
    for k, rel in enumerate(relax):
        if rel.alpha_init is None:
            alphas.append(None)
            continue
        full = (n, s) + tuple(rel.alpha_init.shape[1:])
        init = rel.alpha_init.unsqueeze(1) if alpha_init is None or alpha_init[k] is None else alpha_init[k]
        alphas.append(rel.project(init.detach().to(like).expand(full)).clone().requires_grad_(True))
    return alphas


def initial_betas(split_signs: Optional[Sequence[Optional[Tensor]]], relax: Sequence[Relaxation], n: int, s: int,
                  like: Tensor) -> Tuple[Optional[List[Optional[Tensor]]], Optional[List[Optional[Tensor]]]]:
    """β-CROWN multipliers (zeros, (N, S, *neuron_shape)) and split signs (N, *neuron_shape) per
    activation layer, None for layers without a split; (None, None) without ``split_signs``."""
    if split_signs is None:
        return None, None
    if len(split_signs) != len(relax):
        raise ValueError(f"split_signs has {len(split_signs)} entries; the model has {len(relax)} activation layers")
    betas: List[Optional[Tensor]] = []
    signs: List[Optional[Tensor]] = []
    for k, sg in enumerate(split_signs):
        if sg is None or not bool((sg != 0).any()):
            betas.append(None)
            signs.append(None)
            continue
        sg = sg.to(like).expand(n, *relax[k].loose.shape[1:])
        signs.append(sg)
        betas.append(torch.zeros((n, s) + tuple(sg.shape[1:]), dtype=like.dtype, device=like.device,
                                 requires_grad=True))
    return betas, signs


class AdamAscent:
    """Adam ascent steps on a list of leaf tensors, β = (0.9, 0.999), ε = 1e-8.

    Written out because torch.optim's first step costs seconds of one-off set-up.
    """

    def __init__(self, params: Sequence[Tensor], lr: float, beta1: float = 0.9, beta2: float = 0.999,
                 eps: float = 1e-8):
        self.params, self.lr = list(params), lr
        self.beta1, self.beta2, self.eps = beta1, beta2, eps
        self.moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in self.params]

    @torch.no_grad()
    def step(self, grads: Sequence[Tensor], it: int) -> None:
        """One step along ``grads`` (an ascent direction); ``it`` counts from 0."""
        beta1, beta2 = self.beta1, self.beta2
        for p, g, (m, v) in zip(self.params, grads, self.moments):
            m.mul_(beta1).add_(g, alpha=1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            m_hat = m / (1 - beta1 ** (it + 1))
            v_hat = v / (1 - beta2 ** (it + 1))
            p.add_(self.lr * m_hat / (v_hat.sqrt() + self.eps))


@dataclass
class Optimised:
    """Outcome of :func:`optimise_bound`: the best bound (N, S) and the α that gave it; with
    ``return_intermediate`` also the minimiser and activation coefficients of the last iterate."""

    best: Tensor
    best_alpha: List[Optional[Tensor]]
    minimizer: Optional[Tensor] = None
    coefficients: Optional[List[Tensor]] = None


def optimise_bound(plan: _Plan, A0: Tensor, bias0: Tensor, relax: Sequence[Relaxation], lower: Tensor,
                   upper: Tensor, alphas: List[Optional[Tensor]], betas: Optional[List[Optional[Tensor]]],
                   signs: Optional[List[Optional[Tensor]]], *, iterations: int, lr: float,
                   deadline: Optional[float], return_intermediate: bool) -> Optimised:
    """Ascend Σ lb over α (projected onto its sound range) and β (onto β ≥ 0), keeping the best bound of each
    (sample, row) and its α. Stops after ``iterations`` steps or once past ``deadline``."""
    n, s = A0.shape[:2]
    c_in, r_in = (upper + lower) / 2, (upper - lower) / 2
    params = [a for a in alphas if a is not None] + [b for b in (betas or []) if b is not None]
    best = torch.full((n, s), -math.inf, dtype=A0.dtype, device=A0.device)
    best_alpha = [None if a is None else a.detach().clone() for a in alphas]
    out = Optimised(best, best_alpha)
    adam = AdamAscent(params, lr)
    for it in range(iterations + 1):
        with torch.enable_grad():
            # activation coefficients for BaB's branching: only the planned last iterate keeps them
            # (holding every layer's A would raise the peak memory of all the other iterations)
            captured: Optional[Dict[int, Tensor]] = \
                {} if return_intermediate and (it == iterations or not params) else None
            A, bias = _backward(plan, plan.start, A0, bias0, relax, alphas, betas, signs, captured)
            lb = _concretize(A, bias, c_in, r_in)
        improved = lb.detach() > best
        best = torch.where(improved, lb.detach(), best)
        for k, a in enumerate(alphas):
            if a is not None:
                mask = improved.view(n, s, *([1] * (a.dim() - 2)))
                best_alpha[k] = torch.where(mask, a.detach(), best_alpha[k])
        if it == iterations or not params or (deadline is not None and time.monotonic() > deadline):
            if return_intermediate:  # for BaB: the vertex minimising the weakest row's linear bound
                with torch.no_grad():
                    weakest = (torch.arange(n, device=A.device), lb.detach().argmin(1))
                    out.minimizer = (c_in - A.detach()[weakest].sign() * r_in).clamp(lower, upper)
                    out.coefficients = None if captured is None else \
                        [captured[k][weakest] for k in range(len(relax))]
            break
        grads = torch.autograd.grad(lb.sum(), params)  # ascent direction
        adam.step(grads, it)
        with torch.no_grad():
            for a, rel in zip(alphas, relax):
                if a is not None:
                    a.copy_(rel.project(a))
            for b in betas or []:
                if b is not None:
                    b.clamp_(min=0.0)  # β ≥ 0 keeps the bound sound
        del A, bias, lb
    out.best = best
    return out


__all__ = ["AdamAscent", "Optimised", "initial_alphas", "initial_betas", "optimise_bound"]
