"""The sub-domains of branch and bound (:mod:`certkd.verification.bab`): a sub-domain is the input box plus
sign constraints on some unstable ReLUs; the store orders the open ones, and the helpers turn a batch of
them into the bound engine's inputs (split bounds, β-CROWN signs, warm-start α).

Shapes: N = sub-domains in a batch, S = specification rows, neuron_shape = a ReLU layer's per-sample shape.
"""
from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

Split = Tuple[int, int]              # (relu layer, flat neuron index)


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


def _alpha_bytes(alpha: Optional[List[Optional[Tensor]]]) -> float:
    return 0.0 if alpha is None else float(sum(a.numel() * a.element_size() for a in alpha if a is not None))


__all__ = ["DomainStore", "Split"]
