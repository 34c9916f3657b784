"""Complete verification by branch-and-bound over unstable ReLUs.

A sub-domain is the input box plus sign constraints on some unstable ReLUs. For a batch of
sub-domains at once:

* **Bounding**: β-CROWN. The final backward pass of α-CROWN runs with the intermediate bounds
  of the root (CROWN ∩ IBP, computed once; SPEC §6 fixes them after the root), tightened by
  the splits: a neuron split active gets l = max(l, 0), inactive u = min(u, 0), and the bounds
  of later layers are re-intersected with IBP through ``intermediate_overrides``. The split
  constraints s·z ≥ 0 also enter the backward pass through multipliers β ≥ 0 optimised jointly
  with α (``split_signs`` of :func:`certkd.bounds.crown.alpha_crown_bounds`), so a split
  tightens the bound even where the interval bounds below it do not move. A sub-domain whose
  bounds cross is empty and is dropped. Each bound is sound on its sub-domain (for every
  α ∈ [0, 1] and β ≥ 0), and the sub-domains cover the box.
* **Attack per sub-domain**: for every undecided sub-domain, the box vertex that minimises its
  linear lower bound is a candidate counterexample; a few signed-gradient steps on the margin
  start from it (points anywhere in the input box are valid counterexamples, so nothing needs
  to respect the splits). A point the model misclassifies ends the search at once.
* **Branching** (BaBSR-style, Bunel et al. 2020): an unstable neuron whose output has a
  negative coefficient ν in the sub-domain's bound (weakest row, last α/β iterate) costs the
  bound ν·(−l·u/(u−l)) through the triangle's upper intercept; splitting it removes that
  term. The neuron with the largest |ν|·(−l·u/(u−l)) is split (earlier layers first on ties);
  with ``branching="intercept"`` the coefficient is dropped (intercept alone).
* **Leaves**: split constraints only reach the bound through intermediate bounds, so
  CROWN alone is not complete. A sub-domain that is still undecided after ``max_depth``
  splits goes to the exact MILP (:mod:`certkd.verification.milp`) with its tightened
  pre-activation bounds as variable bounds; that makes the procedure complete, and the
  MILP returns a counterexample when one exists.
* **Early exit**: a counterexample (from the sub-domain attack or the MILP leaves, re-checked
  in float32 by the pipeline) ends the search; the per-sample timeout is checked between
  batches and passed to α/β-CROWN as a deadline.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from certkd.attacks import eval_mode


@dataclass
class BabResult:
    status: str                      # "verified" | "falsified" | "timeout"
    margin: Optional[float]          # verified: min over leaves of the proven bound; falsified: counterexample margin
    counterexample: Optional[Tensor]
    time_s: float
    domains: int                     # sub-domains bounded
    note: str = ""


@dataclass
class _Domain:
    splits: Dict[Tuple[int, int], int]   # (relu layer, flat neuron index) -> +1 active / −1 inactive
    bound: float = float("-inf")


def _domain_bounds(root: List[Tuple[Tensor, Tensor]], domains: List[_Domain]) -> Dict[int, Tuple[Tensor, Tensor]]:
    """Per ReLU layer: (N, *shape) lower/upper of the batch of sub-domains."""
    out = {}
    for k, (l0, u0) in enumerate(root):
        l = l0.expand(len(domains), *l0.shape[1:]).clone()
        u = u0.expand(len(domains), *u0.shape[1:]).clone()
        lf, uf = l.view(len(domains), -1), u.view(len(domains), -1)
        for d, dom in enumerate(domains):
            for (layer, j), sign in dom.splits.items():
                if layer != k:
                    continue
                if sign > 0:
                    lf[d, j] = torch.clamp(lf[d, j], min=0.0)
                else:
                    uf[d, j] = torch.clamp(uf[d, j], max=0.0)
        out[k] = (l, u)
    return out


def _split_signs(root: List[Tuple[Tensor, Tensor]], domains: List[_Domain]) -> List[Optional[Tensor]]:
    """Per ReLU layer: (N, *shape) with +1/−1 on split neurons, 0 elsewhere (None: no split)."""
    out: List[Optional[Tensor]] = []
    for k, (l0, _) in enumerate(root):
        signs = torch.zeros(len(domains), l0[0].numel(), dtype=l0.dtype, device=l0.device)
        for d, dom in enumerate(domains):
            for (layer, j), sign in dom.splits.items():
                if layer == k:
                    signs[d, j] = float(sign)
        out.append(signs.view(len(domains), *l0.shape[1:]) if bool((signs != 0).any()) else None)
    return out


def _attack_from(model: nn.Module, starts: Tensor, label: int, lower: Tensor, upper: Tensor,
                 steps: int = 5, step_size: float = 0.25) -> Tuple[Tensor, Tensor]:
    """Signed-gradient descent on z_y − max_{j≠y} z_j from each start (N, *in) inside the box.

    Returns the best point per start and its margin (N,); a negative margin is a counterexample.
    """
    from certkd.attacks import margin_loss

    y = torch.full((starts.shape[0],), label, dtype=torch.long, device=starts.device)
    rho = (upper - lower) / 2
    xa = starts.detach()
    best_x, best_m = xa, torch.full((starts.shape[0],), float("inf"), device=starts.device)
    for it in range(steps + 1):
        xa = xa.detach().requires_grad_(True)
        with torch.enable_grad():
            margin = -margin_loss(model(xa), y)
            grad, = torch.autograd.grad(margin.sum(), xa) if it < steps else (None,)
        better = margin.detach() < best_m
        best_x = torch.where(better.view(-1, *([1] * (xa.dim() - 1))), xa.detach(), best_x)
        best_m = torch.minimum(best_m, margin.detach())
        if grad is None or bool((best_m < 0).any()):
            break
        xa = torch.max(torch.min(xa.detach() - step_size * rho * grad.sign(), upper), lower)
    return best_x, best_m


def _pick_branch(bounds: Dict[int, Tuple[Tensor, Tensor]], d: int, dom: _Domain,
                 coefficients: Optional[List[Tensor]] = None) -> Optional[Tuple[int, int]]:
    best, best_score = None, 0.0
    for k in sorted(bounds):
        l, u = bounds[k][0][d].reshape(-1), bounds[k][1][d].reshape(-1)
        unstable = (l < 0) & (u > 0)
        if not bool(unstable.any()):
            continue
        score = torch.where(unstable, -l * u / (u - l).clamp(min=1e-12), torch.zeros_like(l))
        if coefficients is not None:
            # + a tiny intercept share: neurons the bound does not pay for still get an order
            score = score * ((-coefficients[k][d].reshape(-1)).clamp(min=0) + 1e-6)
        for (layer, j) in dom.splits:
            if layer == k:
                score[j] = 0.0
        j = int(score.argmax())
        if float(score[j]) > best_score * 1.0001:
            best, best_score = (k, j), float(score[j])
    return best


def bab_verify(model: nn.Module, x: Tensor, label: int, lower: Tensor, upper: Tensor, *, timeout: float = 60.0,
               batch_domains: int = 32, max_depth: int = 12, max_domains: int = 20000, alpha_iterations: int = 10,
               intermediate="crown", margin_tol: float = 1e-6, beta: bool = True,
               attack_steps: int = 5, branching: str = "babsr") -> BabResult:
    """Decide z_y − z_j > 0 for all j ≠ y on the box [lower, upper] (pixel space, (C, H, W)).

    "verified" needs every leaf's proven bound > ``margin_tol``. ``beta=False`` drops the
    β-CROWN multipliers (splits then act through interval bounds only); ``attack_steps=0``
    only evaluates the bound minimisers, ``attack_steps < 0`` disables the sub-domain attack.
    ``branching``: "babsr" (coefficient × intercept) or "intercept".
    """
    if branching not in ("babsr", "intercept"):
        raise ValueError(f"branching must be 'babsr' or 'intercept', got {branching!r}")
    from certkd.bounds.crown import alpha_crown_bounds, crown_bounds
    from certkd.verification.milp import EmptyDomainError, milp_verify

    start = time.perf_counter()
    elapsed = lambda: time.perf_counter() - start
    lo, hi = lower.unsqueeze(0), upper.unsqueeze(0)
    y = torch.tensor([label], device=x.device)
    with eval_mode(model):
        root = crown_bounds(model, lo, hi, y, intermediate=intermediate, return_intermediate=True)
        root_bounds = [(l.detach(), u.detach()) for l, u in root.intermediate]
        if float(root.lower.min()) > margin_tol:
            return BabResult("verified", float(root.lower.min()), None, elapsed(), 1)
        queue: List[_Domain] = [_Domain({})]
        leaves_min = float("inf")
        bounded = 1
        while queue:
            if elapsed() > timeout:
                return BabResult("timeout", None, None, elapsed(), bounded, note=f"{len(queue)} domains open")
            if bounded > max_domains:
                return BabResult("timeout", None, None, elapsed(), bounded, note="domain limit reached")
            batch, queue = queue[:batch_domains], queue[batch_domains:]
            overrides = _domain_bounds(root_bounds, batch)
            n = len(batch)
            signs = _split_signs(root_bounds, batch) if beta else None
            lb = alpha_crown_bounds(model, lo.expand(n, *lo.shape[1:]), hi.expand(n, *hi.shape[1:]), y.expand(n),
                                    iterations=alpha_iterations, intermediate_overrides=overrides,
                                    return_intermediate=True, deadline=start + timeout, split_signs=signs)
            bounded += n
            worst = lb.lower.min(1).values
            open_ = [d for d in range(n) if float(worst[d]) <= margin_tol
                     and not (lb.infeasible is not None and bool(lb.infeasible[d]))]
            if open_ and attack_steps >= 0:
                cx, cm = _attack_from(model, lb.minimizer[open_], label, lo, hi, steps=attack_steps)
                if float(cm.min()) < 0:
                    i = int(cm.argmin())
                    return BabResult("falsified", float(cm[i]), cx[i].detach(), elapsed(), bounded,
                                     note="sub-domain attack")
            for d, dom in enumerate(batch):
                if lb.infeasible is not None and bool(lb.infeasible[d]):
                    continue  # empty sub-domain
                if float(worst[d]) > margin_tol:
                    leaves_min = min(leaves_min, float(worst[d]))
                    continue
                dom_bounds = {k: v for k, v in enumerate(lb.intermediate)}
                coeffs = lb.relu_coefficients if branching == "babsr" else None
                branch = _pick_branch(dom_bounds, d, dom, coeffs) if len(dom.splits) < max_depth else None
                if branch is None:  # leaf: exact MILP on this sub-domain
                    pre = [(l[d], u[d]) for l, u in lb.intermediate]
                    remaining = timeout - elapsed()
                    if remaining <= 0:
                        return BabResult("timeout", None, None, elapsed(), bounded)
                    try:
                        res = milp_verify(model, x, label, lower=lower, upper=upper, timeout=remaining,
                                          preactivation_bounds=pre, margin_tol=margin_tol)
                    except EmptyDomainError:  # split bounds ∩ interval bounds = ∅: no point here
                        continue
                    if res.status == "falsified":
                        return BabResult("falsified", res.margin, res.counterexample, elapsed(), bounded)
                    if res.status != "verified":
                        return BabResult("timeout", None, None, elapsed(), bounded, note=res.note)
                    leaves_min = min(leaves_min, float(res.margin))
                    continue
                k, j = branch
                queue.append(_Domain({**dom.splits, (k, j): +1}))
                queue.append(_Domain({**dom.splits, (k, j): -1}))
    return BabResult("verified", leaves_min, None, elapsed(), bounded)
