"""Complete verification by branch and bound over unstable ReLUs, in the shape of α-β-CROWN.

A sub-domain is the input box plus sign constraints on some unstable ReLUs. The search has
four separate parts:

* **Domain store** (:class:`DomainStore`): a heap of open sub-domains ordered by their parent's
  proven lower bound, the worst first (``order="fifo"`` keeps first-in-first-out, for comparison).
  Each batch of ``batch_domains`` sub-domains is popped from the top.
* **Bounding**: β-CROWN. The final backward pass of α-CROWN runs with the intermediate bounds
  of the root (CROWN ∩ IBP, computed once; docs/method.md §10.1 fixes them after the root), tightened by
  the splits: a neuron split active gets l = max(l, 0), inactive u = min(u, 0), and the bounds
  of later layers are re-intersected with IBP through ``intermediate_overrides``. The split
  constraints s·z ≥ 0 also enter the backward pass through multipliers β ≥ 0 optimised jointly
  with α (``split_signs`` of :func:`certkd.bounds.crown.alpha_crown_bounds`). **α is carried**
  from a parent to its children: a child's α-CROWN starts from the parent's optimised slopes
  (``alpha_init``) instead of the CROWN adaptive ones (``warm_alpha=False`` re-optimises from
  scratch). A sub-domain whose bounds cross is empty and is dropped. Each bound is sound on its
  sub-domain for every α ∈ [0, 1] and β ≥ 0 (so the start of the optimisation cannot make it
  unsound), and the sub-domains cover the box.
* **Attack per sub-domain**: :class:`certkd.attacks.subdomain.SubdomainAttack` from the vertex
  minimising each open sub-domain's linear lower bound; a misclassified point ends the search.
* **Branching**: a small class per heuristic (:data:`BRANCHERS`, chosen by name or passed as an
  instance): :class:`BaBSR` (default), :class:`Intercept`, :class:`FSB`.
* **Leaves**: a sub-domain still undecided after ``max_depth`` splits goes to the exact MILP
  (:mod:`certkd.verification.milp`) with its tightened pre-activation bounds as variable bounds;
  that makes the procedure complete, and the MILP returns a counterexample when one exists.
* **Early exit**: a counterexample (from the sub-domain attack or a MILP leaf, re-checked in
  float32 by the pipeline) ends the search; the per-sample timeout is checked between batches
  and passed to α/β-CROWN as a deadline.
"""
from __future__ import annotations

import heapq
import itertools
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from certkd.attacks import eval_mode
from certkd.attacks.subdomain import SubdomainAttack

Split = Tuple[int, int]              # (relu layer, flat neuron index)


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
    splits: Dict[Split, int]         # -> +1 active / −1 inactive
    bound: float = float("-inf")     # the parent's proven worst-row lower bound (heap key)
    alpha: Optional[List[Optional[Tensor]]] = field(default=None, repr=False)  # parent's α, per layer (S, *shape)


# --------------------------------------------------------------------------------------------
# Domain store
# --------------------------------------------------------------------------------------------

class DomainStore:
    """Open sub-domains; ``pop(n)`` returns the n with the lowest bound (``order="bound"``) or the
    n oldest (``order="fifo"``). Ties keep insertion order."""

    def __init__(self, order: str = "bound"):
        if order not in ("bound", "fifo"):
            raise ValueError(f"order must be 'bound' or 'fifo', got {order!r}")
        self.order = order
        self._heap: list = []
        self._count = itertools.count()

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, dom: _Domain) -> None:
        key = dom.bound if self.order == "bound" else 0.0
        heapq.heappush(self._heap, (key, next(self._count), dom))

    def pop(self, n: int) -> List[_Domain]:
        return [heapq.heappop(self._heap)[2] for _ in range(min(n, len(self._heap)))]


def _domain_bounds(root: List[Tuple[Tensor, Tensor]], domains: Sequence[_Domain]) -> Dict[int, Tuple[Tensor, Tensor]]:
    """Per ReLU layer: (N, *shape) lower/upper of the batch of sub-domains (root bounds ∩ splits)."""
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


def _split_signs(root: List[Tuple[Tensor, Tensor]], domains: Sequence[_Domain]) -> List[Optional[Tensor]]:
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


def _alpha_init(domains: Sequence[_Domain], overrides: Dict[int, Tuple[Tensor, Tensor]]) -> Optional[List[Optional[Tensor]]]:
    """Per ReLU layer, the batch's starting α (N, S, *shape) from the parents' slopes; a domain
    without a parent α for a layer starts at the CROWN adaptive slope of its own bounds."""
    if all(dom.alpha is None for dom in domains):
        return None
    out: List[Optional[Tensor]] = []
    for k in range(len(overrides)):
        have = [None if dom.alpha is None else dom.alpha[k] for dom in domains]
        ref = next((a for a in have if a is not None), None)
        if ref is None:
            out.append(None)
            continue
        l, u = overrides[k]
        out.append(torch.stack([a if a is not None else (u[d] >= -l[d]).to(ref).unsqueeze(0).expand_as(ref)
                                for d, a in enumerate(have)]))
    return out


# --------------------------------------------------------------------------------------------
# Branching heuristics
# --------------------------------------------------------------------------------------------

@dataclass
class BranchContext:
    """What a heuristic may read about one bounded batch (``result``: its CrownResult)."""

    model: nn.Module
    lower: Tensor                    # (1, *in) box
    upper: Tensor
    labels: Tensor                   # (1,)
    root_bounds: List[Tuple[Tensor, Tensor]]
    result: object
    domains: Sequence[_Domain]


class Brancher:
    """Picks one unstable neuron to split per open sub-domain: ``choose(ctx, open_) -> [split or None]``
    (None: nothing left to split, the sub-domain becomes a MILP leaf)."""

    name = "base"

    def scores(self, ctx: BranchContext) -> List[Tensor]:  # pragma: no cover - interface
        """Per ReLU layer a (N, m) score (0 = not a candidate)."""
        raise NotImplementedError

    def _masked_scores(self, ctx: BranchContext) -> List[Tensor]:
        out = []
        splittable = getattr(ctx.result, "splittable", None)
        for k, s in enumerate(self.scores(ctx)):
            l, u = (t.reshape(t.shape[0], -1) for t in ctx.result.intermediate[k])
            s = torch.where((l < 0) & (u > 0), s, torch.zeros_like(s))
            if splittable is not None and not splittable[k]:  # the rule may not be split (no MILP leaf either)
                s = torch.zeros_like(s)
            for d, dom in enumerate(ctx.domains):
                for (layer, j) in dom.splits:
                    if layer == k:
                        s[d, j] = 0.0
            out.append(s)
        return out

    def choose(self, ctx: BranchContext, open_: Sequence[int]) -> List[Optional[Split]]:
        """The best-scoring neuron per sub-domain, earlier layers first on (near) ties."""
        scores = self._masked_scores(ctx)
        picks: List[Optional[Split]] = []
        for d in open_:
            best, best_score = None, 0.0
            for k, s in enumerate(scores):
                j = int(s[d].argmax())
                if float(s[d, j]) > best_score * 1.0001:
                    best, best_score = (k, j), float(s[d, j])
            picks.append(best)
        return picks


def _intercepts(ctx: BranchContext) -> List[Tensor]:
    out = []
    for l, u in ctx.result.intermediate:
        l, u = l.reshape(l.shape[0], -1), u.reshape(u.shape[0], -1)
        out.append((-l * u / (u - l).clamp(min=1e-12)).clamp(min=0))
    return out


class Intercept(Brancher):
    """The triangle's upper intercept −l·u/(u−l) alone."""

    name = "intercept"

    def scores(self, ctx: BranchContext) -> List[Tensor]:
        return _intercepts(ctx)


class BaBSR(Brancher):
    """BaBSR (Bunel et al. 2020): an unstable neuron whose output has a negative coefficient ν in
    the sub-domain's bound (weakest row, last α/β iterate) costs the bound ν·(−l·u/(u−l)) through
    the triangle's upper intercept; the neuron with the largest |ν|·intercept is split. Falls back
    to the intercept when the optimisation stopped early (no coefficients)."""

    name = "babsr"

    def scores(self, ctx: BranchContext) -> List[Tensor]:
        coeffs = ctx.result.relu_coefficients
        icp = _intercepts(ctx)
        if coeffs is None:
            return icp
        # + a tiny intercept share: neurons the bound does not pay for still get an order
        return [s * ((-c.reshape(c.shape[0], -1)).clamp(min=0) + 1e-6) for s, c in zip(icp, coeffs)]


class FSB(BaBSR):
    """Filtered smart branching (De Palma et al. 2021): the ``candidates`` best BaBSR neurons of
    each sub-domain are each split both ways, both children are bounded cheaply (one CROWN pass
    with the parent's α, all children of the batch at once), and the neuron whose worse child has
    the highest bound is split."""

    name = "fsb"

    def __init__(self, candidates: int = 3):
        self.candidates = candidates

    def choose(self, ctx: BranchContext, open_: Sequence[int]) -> List[Optional[Split]]:
        from certkd.bounds.crown import alpha_crown_bounds

        scores = self._masked_scores(ctx)
        sizes = [s.shape[1] for s in scores]
        offsets = [0] + list(itertools.accumulate(sizes))
        flat = torch.cat(scores, 1)
        picks: List[Optional[Split]] = []
        children, owners = [], []
        for d in open_:
            top = flat[d].topk(min(self.candidates, flat.shape[1]))
            cands = []
            for v, g in zip(top.values.tolist(), top.indices.tolist()):
                if v <= 0:
                    break
                k = max(i for i in range(len(sizes)) if offsets[i] <= g)
                cands.append((k, g - offsets[k]))
            picks.append(cands)
            for c in cands:
                for sign in (+1, -1):
                    children.append(_Domain({**ctx.domains[d].splits, c: sign}))
                    owners.append(d)
        if not children:
            return [None] * len(open_)
        alpha = ctx.result.alpha
        owner = torch.tensor(owners)
        init = [None if a is None else a[owner] for a in alpha] if alpha is not None else None
        over = _domain_bounds(ctx.root_bounds, children)
        n = len(children)
        res = alpha_crown_bounds(ctx.model, ctx.lower.expand(n, *ctx.lower.shape[1:]),
                                 ctx.upper.expand(n, *ctx.upper.shape[1:]), ctx.labels.expand(n), iterations=0,
                                 intermediate_overrides=over, alpha_init=init, return_intermediate=True)
        worst = res.lower.min(1).values.masked_fill(res.infeasible, float("inf")).view(-1, 2).min(1).values
        out, i = [], 0
        for cands in picks:
            if not cands:
                out.append(None)
                continue
            w = worst[i:i + len(cands)]
            out.append(cands[int(w.argmax())])  # argmax: the first (best BaBSR) on ties
            i += len(cands)
        return out


BRANCHERS = {"babsr": BaBSR, "intercept": Intercept, "fsb": FSB}


def make_brancher(branching: Union[str, Brancher]) -> Brancher:
    if isinstance(branching, Brancher):
        return branching
    if branching not in BRANCHERS:
        raise ValueError(f"branching must be one of {sorted(BRANCHERS)} or a Brancher, got {branching!r}")
    return BRANCHERS[branching]()


# --------------------------------------------------------------------------------------------
# The search
# --------------------------------------------------------------------------------------------

def bab_verify(model: nn.Module, x: Tensor, label: int, lower: Tensor, upper: Tensor, *, timeout: float = 60.0,
               batch_domains: int = 32, max_depth: int = 12, max_domains: int = 20000, alpha_iterations: int = 10,
               intermediate="crown", margin_tol: float = 1e-6, beta: bool = True,
               attack_steps: int = 5, branching: Union[str, Brancher] = "babsr", order: str = "bound",
               warm_alpha: bool = True, alpha_memory_mb: float = 1024.0) -> BabResult:
    """Decide z_y − z_j > 0 for all j ≠ y on the box [lower, upper] (pixel space, (C, H, W)).

    "verified" needs every leaf's proven bound > ``margin_tol``. ``beta=False`` drops the
    β-CROWN multipliers (splits then act through interval bounds only); ``attack_steps=0``
    only evaluates the bound minimisers, ``attack_steps < 0`` disables the sub-domain attack.
    ``branching``: "babsr" (coefficient × intercept), "intercept", "fsb", or a :class:`Brancher`.
    ``order``: "bound" (worst lower bound first) or "fifo". ``warm_alpha``: children start their
    α-CROWN from the parent's α; the open domains hold at most ``alpha_memory_mb`` of them (beyond
    that, children start from CROWN's slopes).
    """
    brancher = make_brancher(branching)
    attack = SubdomainAttack(steps=max(attack_steps, 0)) if attack_steps >= 0 else None
    from certkd.bounds.crown import alpha_crown_bounds, crown_bounds

    start = time.perf_counter()
    elapsed = lambda: time.perf_counter() - start
    lo, hi = lower.unsqueeze(0), upper.unsqueeze(0)
    y = torch.tensor([label], device=x.device)
    alpha_budget, alpha_held = alpha_memory_mb * 2 ** 20, 0.0
    with eval_mode(model):
        root = crown_bounds(model, lo, hi, y, intermediate=intermediate, return_intermediate=True)
        root_bounds = [(l.detach(), u.detach()) for l, u in root.intermediate]
        if float(root.lower.min()) > margin_tol:
            return BabResult("verified", float(root.lower.min()), None, elapsed(), 1)
        store = DomainStore(order)
        store.push(_Domain({}, float(root.lower.min())))
        leaves_min = float("inf")
        bounded = 1
        while len(store):
            if elapsed() > timeout:
                return BabResult("timeout", None, None, elapsed(), bounded, note=f"{len(store)} domains open")
            if bounded > max_domains:
                return BabResult("timeout", None, None, elapsed(), bounded, note="domain limit reached")
            batch = store.pop(batch_domains)
            overrides = _domain_bounds(root_bounds, batch)
            n = len(batch)
            init = _alpha_init(batch, overrides) if warm_alpha else None
            for dom in batch:
                alpha_held -= _alpha_bytes(dom.alpha) / 2
                dom.alpha = None
            signs = _split_signs(root_bounds, batch) if beta else None
            lb = alpha_crown_bounds(model, lo.expand(n, *lo.shape[1:]), hi.expand(n, *hi.shape[1:]), y.expand(n),
                                    iterations=alpha_iterations, intermediate_overrides=overrides, alpha_init=init,
                                    return_intermediate=True, deadline=start + timeout, split_signs=signs)
            del init
            bounded += n
            worst = lb.lower.min(1).values
            empty = lb.infeasible if lb.infeasible is not None else torch.zeros(n, dtype=torch.bool)
            open_ = [d for d in range(n) if float(worst[d]) <= margin_tol and not bool(empty[d])]
            if open_ and attack is not None:
                cx, cm = attack(model, lb.minimizer[open_], label, lo, hi)
                if float(cm.min()) < 0:
                    i = int(cm.argmin())
                    return BabResult("falsified", float(cm[i]), cx[i].detach(), elapsed(), bounded,
                                     note="sub-domain attack")
            for d in range(n):
                if not bool(empty[d]) and float(worst[d]) > margin_tol:
                    leaves_min = min(leaves_min, float(worst[d]))
            deep = [d for d in open_ if len(batch[d].splits) < max_depth]
            ctx = BranchContext(model, lo, hi, y, root_bounds, lb, batch)
            picks = dict(zip(deep, brancher.choose(ctx, deep))) if deep else {}
            for d in open_:
                branch = picks.get(d)
                if branch is None:  # leaf: exact MILP on this sub-domain
                    res = _leaf_milp(model, x, label, lower, upper, [(l[d], u[d]) for l, u in lb.intermediate],
                                     timeout - elapsed(), margin_tol)
                    if res is None:  # split bounds ∩ interval bounds = ∅: no point here
                        continue
                    if res.status != "verified":
                        return BabResult(res.status, res.margin, res.counterexample, elapsed(), bounded,
                                         note=res.note)
                    leaves_min = min(leaves_min, float(res.margin))
                    continue
                alpha = None
                if warm_alpha and lb.alpha is not None and alpha_held < alpha_budget:
                    alpha = [None if a is None else a[d].detach() for a in lb.alpha]
                    alpha_held += _alpha_bytes(alpha)
                for sign in (+1, -1):
                    store.push(_Domain({**batch[d].splits, branch: sign}, float(worst[d]), alpha))
    return BabResult("verified", leaves_min, None, elapsed(), bounded)


def _leaf_milp(model: nn.Module, x: Tensor, label: int, lower: Tensor, upper: Tensor, pre: list,
               remaining: float, margin_tol: float):
    """Exact MILP on a leaf sub-domain given its pre-activation bounds ``pre``: a result with status
    'verified', 'falsified' (margin, counterexample) or 'timeout' (note); None when the sub-domain is empty."""
    from certkd.verification.milp import EmptyDomainError, milp_verify

    if remaining <= 0:
        return BabResult("timeout", None, None, 0.0, 0)
    try:
        res = milp_verify(model, x, label, lower=lower, upper=upper, timeout=remaining,
                          preactivation_bounds=pre, margin_tol=margin_tol)
    except EmptyDomainError:
        return None
    if res.status == "falsified":
        return BabResult("falsified", res.margin, res.counterexample, 0.0, 0)
    if res.status != "verified":
        return BabResult("timeout", None, None, 0.0, 0, note=res.note)
    return res


def _alpha_bytes(alpha: Optional[List[Optional[Tensor]]]) -> float:
    return 0.0 if alpha is None else float(sum(a.numel() * a.element_size() for a in alpha if a is not None))


__all__ = ["BRANCHERS", "BaBSR", "BabResult", "Brancher", "BranchContext", "DomainStore", "FSB", "Intercept",
           "bab_verify", "make_brancher"]
