"""Which test points a ``--limit N`` (or ``eval_limit``) evaluates.

Taking the *first* N points is wrong for splits stored class by class (ImageFolder and
TinyImageNet test sets): the first 200 CIFAR-10 ImageFolder points are all "airplane". So a
limit selects a fixed-seed, class-stratified subset instead: each class gets its share of N in
proportion to its size (largest remainders first, ties to the smaller class index), drawn by a
seed-0 permutation of that class's points. The selection depends only on the labels and N, so
every run, seed and command (evaluate, verify, training's test evaluation) sees the same points,
and a result records which (:func:`describe_points`).
"""
from __future__ import annotations

import hashlib
from typing import Dict, Optional

import torch

SELECTION_SEED = 0


def stratified_indices(labels: torch.Tensor, limit: Optional[int], seed: int = SELECTION_SEED) -> torch.Tensor:
    """Indices of the points to evaluate, ascending.

    Args:
        labels: (N,) int64 class labels of the split.
        limit: number of points wanted; ``None`` or ``>= N`` selects every point.
        seed: permutation seed (fixed: 0 everywhere, so every command picks the same points).
    Returns:
        (min(limit, N),) int64 indices into the split, sorted ascending.
    """
    n = int(labels.shape[0])
    if limit is None or limit >= n:
        return torch.arange(n)
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    classes, counts = torch.unique(labels, return_counts=True)
    exact = counts.double() * limit / n
    quota = exact.floor().long()
    short = limit - int(quota.sum())
    # largest fractional part first; stable sort keeps the smaller class index first on ties
    order = torch.sort(-(exact - quota.double()), stable=True).indices
    quota[order[:short]] += 1
    gen = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n, generator=gen)  # one permutation of the split, filtered by class
    chosen = []
    for c, q in zip(classes.tolist(), quota.tolist()):
        members = perm[labels[perm] == c]
        chosen.append(members[:q])
    return torch.cat(chosen).sort().values


def describe_points(labels: torch.Tensor, indices: torch.Tensor) -> Dict[str, object]:
    """What a result was measured on: ``{"points": words, "n": k, "of": N, "indices_sha256": hex}``."""
    n, k = int(labels.shape[0]), int(indices.shape[0])
    words = f"all {n} test points" if k == n else f"{k} of {n} test points, class-stratified (seed {SELECTION_SEED})"
    digest = hashlib.sha256(indices.to(torch.int64).numpy().tobytes()).hexdigest()
    return {"points": words, "n": k, "of": n, "indices_sha256": digest}
