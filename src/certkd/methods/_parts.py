"""Torch-side parts shared by the training methods (docs/method.md §4).

The methods import this module inside :meth:`Method.loss` (through :func:`certkd.methods.base.parts`)
so that the registry itself stays free of torch. Every batch mean of a loss term is taken over
the batch's explicit shard, ``b.shard`` (:class:`certkd.distributed.Shard`, the global batch in
multi-process training): the helpers here require it, so that a method cannot silently reduce
over this rank's rows only.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from certkd.attacks import PGD, linf_box
from certkd.bounds import ibp_logit_difference_bounds, logit_differences
from certkd.distributed import Shard
from certkd.losses import certified as L
from certkd.losses import distillation as D
from certkd.losses.regularizers import warmup_regularizer

__all__ = ["D", "F", "L", "PGD", "REG_BOX_EPS", "WARMUP_EPS", "Shard", "accuracy", "adversarial_pass", "ce",
           "ibp_logit_difference_bounds", "input_radius", "linf_box", "logit_differences", "target_space",
           "torch", "warmup_regularizer"]

WARMUP_EPS = 1e-50     # below this a batch is "natural" (docs/method.md §2.4)
REG_BOX_EPS = 1e-6     # box used for the regularisers on warm-up batches


def input_radius(model: nn.Module, lower: Tensor, upper: Tensor, *, shard: Shard) -> Tensor:
    """δ0: mean half-width of the input box in normalised space, over ``shard``'s batch."""
    norm = model.normalize
    return shard.mean((upper - lower) / 2 / norm._view(norm.std, lower))


def ce(logits: Tensor, y: Tensor, *, shard: Shard) -> Tensor:
    """Cross-entropy, the mean over ``shard``'s batch (global in multi-process training)."""
    if shard.is_global:
        return shard.mean(F.cross_entropy(logits, y, reduction="none"))
    return F.cross_entropy(logits, y)


def accuracy(logits: Tensor, y: Tensor) -> Tensor:
    """Fraction of correct predictions, a 0-dim tensor left on the device (no read-back in the step)."""
    return (logits.argmax(1) == y).float().mean()


def adversarial_pass(model, x_adv, y, lower, upper, project: bool):
    """Train-mode pass of x_adv (its batch fixes BN statistics) carrying the IBP box.

    Returns (lb, feature bounds, h(x_adv), features for distillation). With ``project``, the
    projection of x_adv onto the box rides along as a zero-width box under the same
    statistics, so its features lie in [l, u] (docs/method.md §7.6) without a second forward.
    """
    n = x_adv.shape[0]
    if not project:
        lb, fb = ibp_logit_difference_bounds(model, lower, upper, y, point=x_adv)
        return lb, fb, fb.point_output, fb.point_output
    x_proj = D.project_to_box(x_adv, lower, upper)
    lb, fb = ibp_logit_difference_bounds(model, torch.cat([lower, x_proj]), torch.cat([upper, x_proj]),
                                         torch.cat([y, y]), point=x_adv)
    a_dist = fb.lower[n:]
    fb.lower, fb.upper = fb.lower[:n], fb.upper[:n]
    fb.preactivations = [(c[:n], r[:n]) for c, r in fb.preactivations]
    return lb[:n], fb, fb.point_output, a_dist


def target_space(teacher, zero_target: bool, t: Optional[Tensor], v: Tensor,
                 lower: Optional[Tensor] = None, upper: Optional[Tensor] = None):
    """(v, lower, upper, target) in the space where the distance is taken.

    With a teacher's adapter, the student's features and box are mapped into the teacher's
    feature space (``Teacher.adapt``); with ``dist_target: zero`` the target is 0.
    """
    if teacher is not None:
        v, lower, upper = teacher.adapt(v, lower, upper)
    return v, lower, upper, (torch.zeros_like(v) if zero_target else t)
