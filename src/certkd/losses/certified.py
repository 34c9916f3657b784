"""Certified and expressive training losses (docs/method.md §5) as pure functions of tensors.

All inputs are logit-difference vectors d (N, K−1) with entries z_y − z_j: ``lb`` are IBP
lower bounds on a box, ``d_adv`` the differences at an adversarial point. Each loss returns
the batch mean (a scalar), except :func:`difference_loss`, which is per sample. Batch means
are ``shard.mean`` of the explicit ``shard`` argument (:class:`certkd.distributed.Shard`):
``t.mean()`` for the default :data:`~certkd.distributed.LOCAL`, the mean over the global batch
for the shard of a multi-process training step.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from certkd.distributed import LOCAL, Shard


def difference_loss(d: Tensor) -> Tensor:
    """ℒ(d) = log(1 + Σ_j exp(−d_j)) per sample: (N, K−1) -> (N,).

    Equals the cross-entropy of logits (0, −d_1, …, −d_{K−1}) with label 0, hence CE(z, y) for d = C z.
    """
    zeros = torch.zeros_like(d[:, :1])
    return torch.logsumexp(torch.cat([zeros, -d], dim=1), dim=1)


def ibp_loss(lb: Tensor, shard: Shard = LOCAL) -> Tensor:
    """L_IBP = mean ℒ(lb)."""
    return shard.mean(difference_loss(lb))


def adversarial_loss(d_adv: Tensor, shard: Shard = LOCAL) -> Tensor:
    """L_adv = mean ℒ(C z_adv) = CE(z_adv, y)."""
    return shard.mean(difference_loss(d_adv))


def _check_alpha(alpha: float) -> None:
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")


def cc_ibp_loss(lb: Tensor, d_adv: Tensor, alpha: float, shard: Shard = LOCAL) -> Tensor:
    """CC-IBP: ℒ(α·lb + (1−α)·d_adv), combined per sample and per logit difference."""
    _check_alpha(alpha)
    if alpha == 0.0:  # exact endpoints (no 0·x rounding)
        return adversarial_loss(d_adv, shard)
    if alpha == 1.0:
        return ibp_loss(lb, shard)
    return shard.mean(difference_loss(alpha * lb + (1.0 - alpha) * d_adv))


def mtl_ibp_loss(lb: Tensor, d_adv: Tensor, alpha: float, shard: Shard = LOCAL) -> Tensor:
    """MTL-IBP: α·L_IBP + (1−α)·L_adv (batch means)."""
    _check_alpha(alpha)
    return alpha * ibp_loss(lb, shard) + (1.0 - alpha) * adversarial_loss(d_adv, shard)


def exp_ibp_loss(lb: Tensor, d_adv: Tensor, alpha: float, shard: Shard = LOCAL) -> Tensor:
    """Exp-IBP: L_IBP^α · L_adv^(1−α) of the batch means (not a per-sample geometric mean).

    Not a mean of per-sample terms, so with a multi-process ``shard`` the global means must be
    taken before the powers (averaging per-rank losses afterwards would differ).
    """
    _check_alpha(alpha)
    return ibp_loss(lb, shard) ** alpha * adversarial_loss(d_adv, shard) ** (1.0 - alpha)


def sabr_box(x_adv: Tensor, lower: Tensor, upper: Tensor, lam: float, eps: float) -> tuple:
    """SABR's small box of radius λ·ε around the adversarial point, moved inside [lower, upper].

    Center c = clamp(x_adv, lower + ρ, upper − ρ) with ρ = λ·ε (pixel units); the box is
    [c − ρ, c + ρ] intersected with [lower, upper], so it never leaves the large box.
    """
    rho = lam * eps
    lo_c, hi_c = lower + rho, upper - rho
    center = torch.minimum(torch.maximum(x_adv, lo_c), hi_c)
    return torch.maximum(center - rho, lower), torch.minimum(center + rho, upper)


def trades_kl(adv_logits: Tensor, clean_logits: Tensor) -> Tensor:
    """Per-sample KL(softmax(clean) ‖ softmax(adv)) of TRADES: (N, K) x2 -> (N,)."""
    return F.kl_div(F.log_softmax(adv_logits, 1), F.log_softmax(clean_logits, 1), reduction="none",
                    log_target=True).sum(1)


def l1_penalty(model: nn.Module) -> Tensor:
    """Σ|W| over every Conv2d and Linear weight (biases and BatchNorm excluded)."""
    terms = [m.weight.abs().sum() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return torch.stack(terms).sum()
