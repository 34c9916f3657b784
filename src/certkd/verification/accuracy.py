"""Batched accuracy of a trained model: clean, PGD (empirical) and IBP-verified (the `certkd evaluate` table).

One pass over the test set gives all three, as the training loop's test metrics and
``certkd evaluate`` report them (docs/method.md §2.1, §2.3). IBP bounds are sound but incomplete;
the attack and the certificate are cross-checked on every point (a point both IBP-verified and
attacked raises :class:`SoundnessError`). Per-point complete verification (CROWN, BaB, MILP) is
:mod:`certkd.verification.pipeline` (``certkd verify``).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

from certkd.attacks import PGD, linf_box
from certkd.bounds import ibp_logit_difference_bounds
from certkd.data import ImageDataset, iterate_batches
from certkd.data.subsets import describe_points, stratified_indices
from certkd.runs import collapse


class SoundnessError(RuntimeError):
    """A point was certified and also broken by an attack: a bug, never a result."""


def evaluate_accuracy(model: nn.Module, dataset: ImageDataset, eps: float, *, limit: Optional[int] = None,
                      batch_size: int = 256, attack_steps: int = 40, attack_step_size: float = 0.1,
                      attack_restarts: int = 1, device: torch.device | str = "cpu", seed: int = 0,
                      progress: bool = False) -> Dict[str, float]:
    """Clean accuracy, PGD accuracy and IBP-verified accuracy at radius ``eps`` (pixel units).

    The model is evaluated in eval mode (running BatchNorm statistics). Misclassified points
    count as neither robust nor verified; all fractions share the denominator ``n``.
    ``limit`` selects a fixed class-stratified subset (:mod:`certkd.data.subsets`), never the
    first N points. Raises :class:`SoundnessError` if a point is both IBP-verified and attacked.
    Returns the fractions, ``n``, ``points`` (which points, in words) and ``predictions``
    (:func:`certkd.runs.collapse` of the predicted classes).
    """
    index = stratified_indices(dataset.labels, limit)
    data = dataset if len(index) == len(dataset) else ImageDataset(dataset.images[index], dataset.labels[index])
    was_training = model.training
    model.eval()
    attack = PGD(attack_steps, attack_step_size, attack_restarts, stop_on_success=True)
    gen = torch.Generator().manual_seed(seed)
    clean = robust = verified = n = 0
    predicted = []
    batches = iterate_batches(data, batch_size, shuffle=False, device=device)
    if progress:
        from tqdm import tqdm
        batches = tqdm(batches, total=(len(data) + batch_size - 1) // batch_size, desc="evaluate", leave=False)
    try:
        for x, y in batches:
            lo, hi = linf_box(x, eps)
            with torch.no_grad():
                pred = model(x).argmax(1)
                correct = pred == y
                predicted.append(pred.cpu())
                lb, _ = ibp_logit_difference_bounds(model, lo, hi, y)
            certified = correct & (lb.min(1).values > 0)
            x_adv = attack(model, x, y, lo, hi, generator=gen)
            with torch.no_grad():
                not_broken = correct & (model(x_adv).argmax(1) == y)
            if bool((certified & ~not_broken).any()):
                raise SoundnessError("a point was IBP-verified but PGD found a counterexample; please report this bug")
            clean += int(correct.sum())
            robust += int(not_broken.sum())
            verified += int(certified.sum())
            n += y.shape[0]
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError("no test points to evaluate")
    num_classes = int(dataset.labels.max()) + 1
    return {"clean_accuracy": clean / n, "pgd_accuracy": robust / n, "ibp_verified_accuracy": verified / n,
            "eps": float(eps), "n": n, "points": describe_points(dataset.labels, index)["points"],
            "predictions": collapse(torch.cat(predicted), num_classes)}
