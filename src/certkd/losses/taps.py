"""TAPS (Mao et al., NeurIPS 2023): IBP through a feature extractor, PGD through the classifier head
(docs/method.md §5.9).

The network is split after its features' ``head_relus``-th last top-level ReLU block
(:func:`split_network`): the extractor's latent box [l, u] comes from IBP; in it, one PGD per
class j ≠ y searches the point that minimises the margin z_y − z_j of the classifier
(:func:`pivotal_points`), whose margins estimate the worst case over the latent box. The points
are found without gradient; the *gradient connector* (:class:`RectifiedLinearLink`, the paper's
rectified linear link) then lets the loss reach the box bounds: a point coordinate within
``c·(u − l)`` of a bound passes its gradient to that bound, linearly weighted by how close it is.
:func:`scale_grad` is the paper's gradient expanding factor.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor, nn

from certkd.attacks.pgd import PGD
from certkd.bounds.ibp import IntervalBounds, ibp_logit_difference_bounds
from certkd.bounds.spec import other_classes
from certkd.errors import CertkdError

#: the connector's floor on the slack c·(u − l) (the paper's tolerance): a flat coordinate passes no gradient
LINK_TOL = 1e-5


class Classifier(nn.Module):
    """The classifier head of a split network: ``features`` (the tail of the model's features) then ``head``.

    Shares the model's modules (no copy), so it is never registered on the model itself.
    """

    def __init__(self, features: nn.Sequential, head: nn.Linear):
        super().__init__()
        self.features, self.head = features, head

    def forward(self, z: Tensor) -> Tensor:
        return self.head(self.features(z))


def split_network(model: nn.Module, head_relus: int) -> Tuple[nn.Sequential, Classifier]:
    """(extractor, classifier) with the last ``head_relus`` top-level ReLU blocks of ``model.features``
    and ``model.head`` in the classifier; the extractor keeps everything before (at least Normalize).

    Raises a one-line :class:`CertkdError` when the features have fewer top-level ReLUs.
    """
    relus = [i for i, m in enumerate(model.features) if isinstance(m, nn.ReLU)]
    if not 1 <= head_relus <= len(relus):
        raise CertkdError(f"taps_head_relus={head_relus}, but the model's features have {len(relus)} top-level "
                          f"ReLU layers; pass --set taps_head_relus=N with 1 <= N <= {len(relus)}")
    cut = relus[-head_relus - 1] + 1 if head_relus < len(relus) else 1
    # the parts wrap the model's own modules (no copy): building them per step costs microseconds
    return nn.Sequential(*model.features[:cut]), Classifier(nn.Sequential(*model.features[cut:]), model.head)


def _targeted_margin(logits: Tensor, pairs: Tensor) -> Tensor:
    """z_j − z_y per row for pairs (M, 2) of (y, j): what the latent PGD maximises."""
    return logits.gather(1, pairs[:, 1:]).squeeze(1) - logits.gather(1, pairs[:, :1]).squeeze(1)


def pivotal_points(classifier: nn.Module, lower: Tensor, upper: Tensor, y: Tensor, steps: int,
                   step_size: float, restarts: int = 1) -> Tensor:
    """One PGD per class j ≠ y in the latent box minimising the classifier's margin z_y − z_j.

    Args:
        classifier: latent (N, *latent) -> logits (N, K); attacked in eval mode (as the training attack).
        lower, upper: (N, *latent) latent box.
        y: (N,) labels.
        steps, step_size, restarts: of :class:`certkd.attacks.PGD` (step relative to the half-width).
    Returns:
        (N, K−1, *latent) points, detached; row i targets class ``other_classes(y, K)[:, i]``.
    """
    n, k = y.shape[0], classifier.head.out_features
    targets = other_classes(y, k)                                  # (N, K−1)
    rep = lambda t: t.detach().unsqueeze(1).expand(n, k - 1, *t.shape[1:]).reshape(n * (k - 1), *t.shape[1:])
    pairs = torch.stack([y.unsqueeze(1).expand(n, k - 1).reshape(-1), targets.reshape(-1)], 1)
    lo, hi = rep(lower), rep(upper)
    attack = PGD(steps, step_size, restarts, loss_fn=_targeted_margin)
    pts = attack(classifier, (lo + hi) / 2, pairs, lo, hi)
    return pts.reshape(n, k - 1, *lower.shape[1:])


class RectifiedLinearLink(torch.autograd.Function):
    """The gradient connector: forward returns the points; backward sends their gradient to the bounds.

    With slack s = c·(u − l) (floored at tol), a coordinate x of a point gets to u the weight
    max(x − (u − s), tol/2)/s where x ≥ u − s (1 at x = u, 0 at distance s) and to l the
    mirror weight where x ≤ l + s; summed over the K−1 points of a sample. The points themselves
    (found by PGD) get no gradient.
    """

    @staticmethod
    def forward(ctx, lower: Tensor, upper: Tensor, pts: Tensor, c: float, tol: float) -> Tensor:
        ctx.save_for_backward(lower, upper, pts)
        ctx.c, ctx.tol = c, tol
        return pts.clone()

    @staticmethod
    def backward(ctx, grad):
        lower, upper, pts = ctx.saved_tensors
        lower, upper = lower.unsqueeze(1), upper.unsqueeze(1)
        slack = ctx.c * (upper - lower)
        denom = slack.clamp(min=ctx.tol)
        thr = upper - slack
        g_up = ((pts >= thr) * grad * (pts - thr).clamp(min=0.5 * ctx.tol) / denom).sum(1)
        thr = lower + slack
        g_lo = ((pts <= thr) * grad * (thr - pts).clamp(min=0.5 * ctx.tol) / denom).sum(1)
        return g_lo, g_up, None, None, None


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t: Tensor, factor: float) -> Tensor:
        ctx.factor = factor
        return t.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def scale_grad(t: Tensor, factor: float) -> Tensor:
    """t in the forward pass, its gradient times ``factor`` in the backward pass (the paper's w)."""
    return _ScaleGrad.apply(t, factor)


def head_bounds(classifier: Classifier, latent: IntervalBounds, pts: Tensor,
                y: Tensor) -> Tuple[Tensor, Tensor, IntervalBounds]:
    """IBP bounds of the classifier on the latent box and its margins at the pivotal points, one pass.

    The points ride along as zero-width boxes, so with train-mode BatchNorm they are normalised
    by the same batch statistics (those of ``latent.point_output``) as the box.

    Args:
        latent: the extractor's IBP bounds (N, *latent), with ``point_output``.
        pts: (N, K−1, *latent) pivotal points (through :class:`RectifiedLinearLink`).
    Returns:
        (IBP bounds (N, K−1), TAPS margins (N, K−1): column i the margin z_y − z_j of point i at its
        own target j, the classifier's bounds (box rows only)).
    """
    n, k1 = pts.shape[:2]
    flat = pts.reshape(n * k1, *pts.shape[2:])
    lo = torch.cat([latent.lower, flat])
    hi = torch.cat([latent.upper, flat])
    labels = torch.cat([y, y.repeat_interleave(k1)])
    lb, fb = ibp_logit_difference_bounds(classifier, lo, hi, labels, point=latent.point_output)
    margins = lb[n:].reshape(n, k1, k1).diagonal(dim1=1, dim2=2)
    fb.lower, fb.upper = fb.lower[:n], fb.upper[:n]
    fb.preactivations = [(c[:n], r[:n]) for c, r in fb.preactivations]
    return lb[:n], margins, fb


__all__ = ["LINK_TOL", "Classifier", "RectifiedLinearLink", "head_bounds", "pivotal_points", "scale_grad",
           "split_network"]
