"""Complete verification by branch and bound over unstable ReLUs, in the shape of α-β-CROWN.

A sub-domain is the input box plus sign constraints on some unstable ReLUs. The search has
four separate parts:

* **Domain store** (:class:`~certkd.verification.bab_domains.DomainStore`, in
  :mod:`certkd.verification.bab_domains`): a heap of open sub-domains ordered by their parent's
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
  float32 by the pipeline) ends the search.
* **The clock**: one absolute ``time.monotonic()`` deadline. It is read before every step (bound,
  attack, branch, leaf), α/β-CROWN stops its iterations at it, and each MILP leaf hands HiGHS what
  is left as its time limit, so the answer comes at most one step after the deadline.

The search (:class:`_Search`) is one method per step: ``bound`` (β-CROWN on a batch), ``attack``,
``leaf`` (MILP) and ``branch`` (push the children); a step that ends the search returns the final
:class:`BabResult`, the one result type of every step.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from certkd.attacks import eval_mode
from certkd.attacks.subdomain import SubdomainAttack
from certkd.verification.bab_domains import (  # noqa: F401  (DomainStore, _Domain re-exported for callers/tests)
    DomainStore, Split, _alpha_bytes, _alpha_init, _Domain, _domain_bounds, _split_signs,
)


@dataclass
class BabResult:
    status: str                      # "verified" | "falsified" | "timeout"
    margin: Optional[float]          # verified: min over leaves of the proven bound; falsified: counterexample margin
    counterexample: Optional[Tensor]
    time_s: float
    domains: int                     # sub-domains bounded
    note: str = ""


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
        coeffs = ctx.result.coefficients
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
# The search: one step per part (bound, attack, leaf, branch); a step that ends the search
# returns the final BabResult, otherwise None
# --------------------------------------------------------------------------------------------

@dataclass
class _Bounded:
    """A bounded batch: the sub-domains, their α/β-CROWN result (a CrownResult), the worst row's
    bound per sub-domain (N,), and the indices still open (bound ≤ tolerance, not empty)."""

    domains: List[_Domain]
    result: object
    worst: Tensor
    open_: List[int]


class _Search:
    """The state of one :func:`bab_verify` call: the box, the root bounds, the domain store, the
    clock (an absolute ``time.monotonic()`` deadline) and the counters."""

    def __init__(self, model: nn.Module, x: Tensor, label: int, lower: Tensor, upper: Tensor, deadline: float, *,
                 batch_domains: int, max_depth: int, max_domains: int, alpha_iterations: int, margin_tol: float,
                 beta: bool, attack_steps: int, brancher: Brancher, order: str, warm_alpha: bool,
                 alpha_memory_mb: float):
        self.model, self.x, self.label, self.lower, self.upper = model, x, label, lower, upper
        self.lo, self.hi = lower.unsqueeze(0), upper.unsqueeze(0)
        self.y = torch.tensor([label], device=x.device)
        self.start, self.deadline = time.monotonic(), deadline
        self.batch_domains, self.max_depth, self.max_domains = batch_domains, max_depth, max_domains
        self.alpha_iterations, self.margin_tol, self.beta = alpha_iterations, margin_tol, beta
        self.attacker = SubdomainAttack(steps=max(attack_steps, 0)) if attack_steps >= 0 else None
        self.brancher, self.warm_alpha = brancher, warm_alpha
        self.alpha_budget, self.alpha_held = alpha_memory_mb * 2 ** 20, 0.0
        self.store = DomainStore(order)
        self.root_bounds: List[Tuple[Tensor, Tensor]] = []
        self.bounded, self.leaves_min = 0, float("inf")

    def result(self, status: str, margin: Optional[float] = None, cex: Optional[Tensor] = None,
               note: str = "") -> BabResult:
        return BabResult(status, margin, cex, time.monotonic() - self.start, self.bounded, note)

    def out_of_time(self) -> Optional[BabResult]:
        if time.monotonic() >= self.deadline:
            return self.result("timeout", note=f"{len(self.store)} domains open")
        return None

    def root(self, intermediate) -> Optional[BabResult]:
        """CROWN on the whole box: its intermediate bounds are every sub-domain's starting point."""
        from certkd.bounds.crown import crown_bounds

        root = crown_bounds(self.model, self.lo, self.hi, self.y, intermediate=intermediate, return_intermediate=True)
        self.root_bounds = [(l.detach(), u.detach()) for l, u in root.intermediate]
        self.bounded = 1
        worst = float(root.lower.min())
        if worst > self.margin_tol:
            return self.result("verified", worst)
        self.store.push(_Domain({}, worst))
        return None

    def bound(self, batch: List[_Domain]) -> _Bounded:
        """β-CROWN on a batch (α warm-started from the parents); closed sub-domains update the margin."""
        from certkd.bounds.crown import alpha_crown_bounds

        overrides = _domain_bounds(self.root_bounds, batch)
        n = len(batch)
        init = _alpha_init(batch, overrides) if self.warm_alpha else None
        for dom in batch:
            self.alpha_held -= _alpha_bytes(dom.alpha) / 2
            dom.alpha = None
        signs = _split_signs(self.root_bounds, batch) if self.beta else None
        lo, hi = self.lo.expand(n, *self.lo.shape[1:]), self.hi.expand(n, *self.hi.shape[1:])
        lb = alpha_crown_bounds(self.model, lo, hi, self.y.expand(n), iterations=self.alpha_iterations,
                                intermediate_overrides=overrides, alpha_init=init, return_intermediate=True,
                                deadline=self.deadline, split_signs=signs)
        self.bounded += n
        worst = lb.lower.min(1).values
        empty = lb.infeasible if lb.infeasible is not None else torch.zeros(n, dtype=torch.bool)
        open_ = []
        for d in range(n):
            if bool(empty[d]):
                continue
            if float(worst[d]) > self.margin_tol:
                self.leaves_min = min(self.leaves_min, float(worst[d]))
            else:
                open_.append(d)
        return _Bounded(batch, lb, worst, open_)

    def attack(self, b: _Bounded) -> Optional[BabResult]:
        """The sub-domain attack from each open sub-domain's bound minimiser."""
        if not b.open_ or self.attacker is None:
            return None
        cx, cm = self.attacker(self.model, b.result.minimizer[b.open_], self.label, self.lo, self.hi)
        if float(cm.min()) < 0:
            i = int(cm.argmin())
            return self.result("falsified", float(cm[i]), cx[i].detach(), note="sub-domain attack")
        return None

    def choose(self, b: _Bounded) -> Dict[int, Optional[Split]]:
        """The brancher's split per open sub-domain above ``max_depth`` splits (absent: a leaf)."""
        deep = [d for d in b.open_ if len(b.domains[d].splits) < self.max_depth]
        if not deep:
            return {}
        ctx = BranchContext(self.model, self.lo, self.hi, self.y, self.root_bounds, b.result, b.domains)
        return dict(zip(deep, self.brancher.choose(ctx, deep)))

    def leaf(self, b: _Bounded, d: int) -> Optional[BabResult]:
        """Exact MILP on sub-domain ``d`` with HiGHS given what is left of the time limit."""
        pre = [(l[d], u[d]) for l, u in b.result.intermediate]
        res = _leaf_milp(self.model, self.x, self.label, self.lower, self.upper, pre, self.deadline,
                         self.margin_tol)
        if res is None:  # split bounds ∩ interval bounds = ∅: no point here
            return None
        if res.status != "verified":
            return self.result(res.status, res.margin, res.counterexample, res.note)
        self.leaves_min = min(self.leaves_min, float(res.margin))
        return None

    def branch(self, b: _Bounded, d: int, split: Split) -> None:
        """Push both children of sub-domain ``d``, carrying its α while the memory budget allows."""
        alpha = None
        if self.warm_alpha and b.result.alpha is not None and self.alpha_held < self.alpha_budget:
            alpha = [None if a is None else a[d].detach() for a in b.result.alpha]
            self.alpha_held += _alpha_bytes(alpha)
        for sign in (+1, -1):
            self.store.push(_Domain({**b.domains[d].splits, split: sign}, float(b.worst[d]), alpha))

    def run(self, intermediate) -> BabResult:
        """Root, then batches until the store is empty, a step decides, or the clock runs out (it is
        read before every step, so the answer comes at most one step after the deadline)."""
        done = self.root(intermediate)
        while done is None and len(self.store):
            done = self.out_of_time()
            if done is None and self.bounded > self.max_domains:
                done = self.result("timeout", note="domain limit reached")
            if done is not None:
                break
            b = self.bound(self.store.pop(self.batch_domains))
            done = self.out_of_time() or self.attack(b) or self.out_of_time()
            if done is not None:
                break
            picks = self.choose(b)
            for d in b.open_:
                split = picks.get(d)
                if split is not None:
                    self.branch(b, d, split)
                    continue
                done = self.leaf(b, d)
                if done is not None:
                    break
        return done if done is not None else self.result("verified", self.leaves_min)


def bab_verify(model: nn.Module, x: Tensor, label: int, lower: Tensor, upper: Tensor, *, timeout: float = 60.0,
               batch_domains: int = 32, max_depth: int = 12, max_domains: int = 20000, alpha_iterations: int = 10,
               intermediate="crown", margin_tol: float = 1e-6, beta: bool = True,
               attack_steps: int = 5, branching: Union[str, Brancher] = "babsr", order: str = "bound",
               warm_alpha: bool = True, alpha_memory_mb: float = 1024.0,
               deadline: Optional[float] = None) -> BabResult:
    """Decide z_y − z_j > 0 for all j ≠ y on the box [lower, upper] (pixel space, (C, H, W)).

    "verified" needs every leaf's proven bound > ``margin_tol``. ``beta=False`` drops the
    β-CROWN multipliers (splits then act through interval bounds only); ``attack_steps=0``
    only evaluates the bound minimisers, ``attack_steps < 0`` disables the sub-domain attack.
    ``branching``: "babsr" (coefficient × intercept), "intercept", "fsb", or a :class:`Brancher`.
    ``order``: "bound" (worst lower bound first) or "fifo". ``warm_alpha``: children start their
    α-CROWN from the parent's α; the open domains hold at most ``alpha_memory_mb`` of them (beyond
    that, children start from CROWN's slopes). ``deadline``: an absolute ``time.monotonic()`` time
    that ends the search earlier than ``timeout`` seconds from now; every α/β iteration, batch, attack
    and MILP leaf stops at it (docs/verify_onnx.md).
    """
    end = time.monotonic() + float(timeout)
    search = _Search(model, x, label, lower, upper, end if deadline is None else min(end, deadline),
                     batch_domains=batch_domains, max_depth=max_depth, max_domains=max_domains,
                     alpha_iterations=alpha_iterations, margin_tol=margin_tol, beta=beta, attack_steps=attack_steps,
                     brancher=make_brancher(branching), order=order, warm_alpha=warm_alpha,
                     alpha_memory_mb=alpha_memory_mb)
    with eval_mode(model):
        return search.run(intermediate)


#: a MILP leaf with at least this many unstable neurons runs in a forked child stopped at the deadline
#: (HiGHS can overrun its own time limit by seconds on large MILPs; below this the fork's 0.1 s dominates)
FORK_UNSTABLE = 64


def _leaf_milp(model: nn.Module, x: Tensor, label: int, lower: Tensor, upper: Tensor, pre: list,
               deadline: float, margin_tol: float) -> Optional[BabResult]:
    """Exact MILP on a leaf sub-domain given its pre-activation bounds ``pre``, HiGHS getting what is left
    until ``deadline`` (``time.monotonic()``): 'verified' (margin), 'falsified' (margin, counterexample)
    or 'timeout' (note); None when the sub-domain is empty. A leaf with ``FORK_UNSTABLE`` or more unstable
    neurons is solved in a forked child, killed if it is still running at the deadline."""
    from certkd.verification.forked import call_before
    from certkd.verification.milp import EmptyDomainError, MilpResult, milp_verify

    remaining = deadline - time.monotonic()
    if remaining <= 0:
        return BabResult("timeout", None, None, 0.0, 0, note="time limit reached before a MILP leaf")
    solve = lambda: milp_verify(model, x, label, lower=lower, upper=upper, timeout=remaining,
                                preactivation_bounds=pre, margin_tol=margin_tol)
    unstable = sum(int(((l < 0) & (u > 0)).sum()) for l, u in pre)
    on_cpu = x.device.type == "cpu" and all(p.device.type == "cpu" for p in model.parameters())
    try:
        if unstable >= FORK_UNSTABLE and on_cpu:  # a forked child cannot use the parent's CUDA context
            finished, fields = call_before(lambda: _fresh_highs() or _plain(solve()), deadline,
                                           errors=(EmptyDomainError,))
            if not finished:
                return BabResult("timeout", None, None, remaining, 0, note="time limit reached in a MILP leaf")
            res = MilpResult(**fields)
        else:
            res = solve()
    except EmptyDomainError:
        return None
    if res.status == "falsified":
        return BabResult("falsified", res.margin, res.counterexample, res.time_s, 0, note=res.note)
    if res.status != "verified":
        return BabResult("timeout", None, None, res.time_s, 0, note=res.note)
    return BabResult("verified", res.margin, None, res.time_s, 0)


def _plain(res) -> dict:
    """A MilpResult's fields as plain Python numbers, strings and tensors (what a forked child may send)."""
    import dataclasses

    import numpy as np

    return {k: v.item() if isinstance(v, np.generic) else v for k, v in dataclasses.asdict(res).items()}


def _fresh_highs() -> None:
    """In a forked child: HiGHS's process-wide thread scheduler is the parent's, whose worker threads
    were not copied; start a new one."""
    from certkd.verification.highs import _highspy

    _highspy().Highs.resetGlobalScheduler(True)


__all__ = ["BRANCHERS", "BaBSR", "BabResult", "Brancher", "BranchContext", "DomainStore", "FSB", "Intercept",
           "bab_verify", "make_brancher"]
