"""Feature- and logit-space distillation terms for certified training (docs/method.md §7).

All functions here are pure tensor functions: no modules, no state. Notation
(docs/method.md §7.1):

* ``a``  — student features at the adversarial point, shape ``(N, m)``;
* ``l``, ``u`` — IBP box on the student features, shape ``(N, m)``, ``l <= u``;
* ``t``  — teacher features on the clean input, shape ``(N, m)``;
* ``c = (u + l) / 2`` and ``r = (u - l) / 2``;
* ``alpha`` — the over-approximation coefficient in ``[0, 1]``.

Every per-sample distance is ``D(v, t) = R_k phi(|v_k - t_k|)`` where ``R`` is a
sum or a mean over the feature dimension (the last dimension) and ``phi`` is

* ``"l2sq"``: ``s**2``                      (squared Euclidean distance),
* ``"l1"``:   ``s``                         (L1 distance),
* ``"l2"``:   ``s**2``, then ``sqrt`` of the reduced value (``l2 = sqrt(l2sq)``,
  so with ``reduction="mean"`` it is the root-mean-square difference).

``"cosine"`` is not of that form: ``D(v, t) = 1 - cos(v, t)`` per sample (:mod:`certkd.losses.cosine`),
scale-free, with reduction ``"sum"`` only; its box version is a sound upper bound rather than the
exact maximum, and CC-Dist combines it with the box only (combination ``"box"``). The config's
``"standardized"`` distance is ``"l2sq"`` on features divided by the teacher's per-feature std, a
scaling the training method applies before calling these functions (docs/method.md §7.4).

Per-sample functions return shape ``(N,)`` (more generally ``(*batch,)`` for inputs
of shape ``(*batch, m)``); reducing over the batch is the caller's job, except for
:func:`exp_dist_distance` and :func:`logit_distillation_loss`, which are defined on
batch means and return scalars; their batch means are ``shard.mean`` of the explicit
``shard`` argument (:class:`certkd.distributed.Shard`: ``t.mean()`` for the default ``LOCAL``,
the global batch's mean for the shard of a multi-process step).

Gradients flow into every tensor argument, the teacher target included; pass the
teacher features computed under ``torch.no_grad()`` (or detached) when the teacher
is frozen.

Worst-case coordinates are computed as ``max(|u_k - t_k|, |l_k - t_k|)``, which is
mathematically equal to ``|c_k - t_k| + r_k`` (docs/method.md §7.2) but is the exact maximum
over the box in floating point, so the certified bound is never undercut by rounding.
At ``alpha == 0`` and ``alpha == 1`` the combined distances are computed by the
endpoint formulas themselves, so they equal :func:`feature_distance` and
:func:`worst_case_feature_distance` bit for bit (and no ``0 * inf`` can appear).
"""
from __future__ import annotations

from typing import Union

import torch
import torch.nn.functional as F
from torch import Tensor

from certkd.choices import DIST_COMBINATIONS, DIST_DISTANCES, DIST_REDUCTIONS
from certkd.losses.cosine import cosine_distance, cosine_distance_bound
from certkd.distributed import LOCAL, Shard
from certkd.errors import CertkdError

__all__ = [
    "DISTANCES",
    "REDUCTIONS",
    "COMBINATIONS",
    "DistillationError",
    "feature_distance",
    "worst_case_point",
    "worst_case_feature_distance",
    "cc_dist_distance",
    "mtl_dist_distance",
    "exp_dist_distance",
    "project_to_box",
    "logit_distillation_loss",
]

# The valid setting names: certkd.choices owns them (the CLI reads them there without torch).
# "standardized" is l2sq after a scaling the method applies (it needs the teacher's statistics): not a formula here.
DISTANCES = tuple(d for d in DIST_DISTANCES if d != "standardized")
REDUCTIONS = DIST_REDUCTIONS
COMBINATIONS = DIST_COMBINATIONS

Alpha = Union[float, int, Tensor]


class DistillationError(CertkdError, ValueError):
    """Invalid distillation setting (a ``ValueError`` and a user-facing ``CertkdError``)."""


# --------------------------------------------------------------------------- checks


def _check_alpha(alpha: Alpha) -> float:
    """Return ``alpha`` as a Python float after checking it lies in ``[0, 1]``."""
    if isinstance(alpha, Tensor):
        if alpha.numel() != 1:
            raise DistillationError(
                f"alpha must be a scalar, got a tensor of shape {tuple(alpha.shape)}"
            )
        value = float(alpha.detach().reshape(()).item())
    elif isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise DistillationError(f"alpha must be a number in [0, 1], got {alpha!r}")
    else:
        value = float(alpha)
    if not (0.0 <= value <= 1.0):  # also rejects NaN
        raise DistillationError(f"alpha must be in [0, 1], got {value}")
    return value


def _check_names(distance: str, reduction: str) -> None:
    if distance not in DISTANCES:
        raise DistillationError(
            f"unknown distance {distance!r}; expected one of {', '.join(DISTANCES)}"
        )
    if reduction not in REDUCTIONS:
        raise DistillationError(
            f"unknown reduction {reduction!r}; expected one of {', '.join(REDUCTIONS)}"
        )
    if distance == "cosine" and reduction != "sum":
        raise DistillationError("the cosine distance is one number per sample, reduced over no feature: "
                                "use reduction 'sum' (the default) with it")


def _check_combination(combination: str) -> None:
    if combination not in COMBINATIONS:
        raise DistillationError(
            f"unknown combination {combination!r}; expected one of {', '.join(COMBINATIONS)}"
        )


def _check_teacher(student: Tensor, target: Tensor, what: str = "student features") -> None:
    """Student/teacher feature shapes must agree: ``(*batch, m)`` on both sides."""
    if student.dim() == 0 or target.dim() == 0:
        raise DistillationError(
            "features must have at least one dimension (shape (N, m)), got shapes "
            f"{tuple(student.shape)} and {tuple(target.shape)}"
        )
    ms, mt = student.shape[-1], target.shape[-1]
    if ms != mt:
        raise DistillationError(
            f"{what} have {ms} dimensions but teacher features have {mt}; "
            "use --feature-adapter linear or a teacher with matching features"
        )
    if student.shape != target.shape:
        raise DistillationError(
            f"{what} have shape {tuple(student.shape)} but teacher features have shape "
            f"{tuple(target.shape)}; they must come from the same batch"
        )


def _check_box(lower: Tensor, upper: Tensor, like: Tensor, like_name: str) -> None:
    if lower.shape != upper.shape:
        raise DistillationError(
            f"feature box lower bound has shape {tuple(lower.shape)} but upper bound has "
            f"shape {tuple(upper.shape)}"
        )
    if lower.shape != like.shape:
        raise DistillationError(
            f"feature box has shape {tuple(lower.shape)} but {like_name} have shape "
            f"{tuple(like.shape)}"
        )


# --------------------------------------------------------------------------- reductions


def _reduce(delta: Tensor, distance: str, reduction: str) -> Tensor:
    """Reduce non-negative per-coordinate gaps ``delta`` (*, m) to ``(*,)``."""
    if distance == "l1":
        phi = delta
    else:
        phi = delta * delta
    red = phi.sum(dim=-1) if reduction == "sum" else phi.mean(dim=-1)
    if distance == "l2":
        # sqrt with a zero (sub)gradient at 0 instead of inf/NaN.
        positive = red > 0
        safe = torch.where(positive, red, torch.ones_like(red))
        red = torch.where(positive, torch.sqrt(safe), torch.zeros_like(red))
    return red


def _worst_gap(lower: Tensor, upper: Tensor, target: Tensor) -> Tensor:
    """``max(|u - t|, |l - t|)`` per coordinate (= ``|c - t| + r``), shape (*, m)."""
    return torch.maximum((upper - target).abs(), (lower - target).abs())


# --------------------------------------------------------------------------- public API


def feature_distance(
    v: Tensor, t: Tensor, distance: str = "l2sq", reduction: str = "sum"
) -> Tensor:
    """Per-sample distance between features ``v`` and targets ``t``.

    Args:
        v: features, shape ``(N, m)``.
        t: teacher features, shape ``(N, m)``.
        distance: one of :data:`DISTANCES`.
        reduction: ``"sum"`` or ``"mean"`` over the feature dimension.

    Returns:
        Shape ``(N,)``; e.g. ``||v - t||_2^2`` for the defaults.
    """
    _check_names(distance, reduction)
    _check_teacher(v, t)
    if distance == "cosine":
        return cosine_distance(v, t)
    return _reduce((v - t).abs(), distance, reduction)


def worst_case_point(lower: Tensor, upper: Tensor, target: Tensor) -> Tensor:
    """The box point farthest from ``target``: ĥ (docs/method.md §7.2).

    Per coordinate ĥ_k = u_k if |u_k - t_k| >= |l_k - t_k| (equivalently t_k <= c_k),
    else l_k. Gradients flow through the selected endpoint only.

    Args:
        lower, upper: IBP feature box, shape ``(N, m)``, ``lower <= upper``.
        target: teacher features, shape ``(N, m)``.

    Returns:
        ĥ, shape ``(N, m)``.
    """
    _check_teacher(lower, target, "student feature bounds")
    _check_box(lower, upper, target, "teacher features")
    pick_upper = (upper - target).abs() >= (lower - target).abs()
    return torch.where(pick_upper, upper, lower)


def worst_case_feature_distance(
    lower: Tensor,
    upper: Tensor,
    target: Tensor,
    distance: str = "l2sq",
    reduction: str = "sum",
) -> Tensor:
    """Certified upper bound ``max_{v in [l, u]} D(v, t)`` (docs/method.md §7.2).

    Equals ``R_k phi(|c_k - t_k| + r_k)`` = ``D(ĥ, t)``; since every ``phi`` is
    non-decreasing in ``|v_k - t_k|`` and the problem is separable, this is the exact
    maximum over the box for l2sq, l1 and l2 and both :data:`REDUCTIONS`. For ``"cosine"``
    it is the sound upper bound :func:`certkd.losses.cosine.cosine_distance_bound`.

    Args:
        lower, upper: IBP feature box, shape ``(N, m)``, ``lower <= upper``.
        target: teacher features, shape ``(N, m)``.
        distance, reduction: see :func:`feature_distance`.

    Returns:
        Shape ``(N,)``.
    """
    _check_names(distance, reduction)
    _check_teacher(lower, target, "student feature bounds")
    _check_box(lower, upper, target, "teacher features")
    if distance == "cosine":
        return cosine_distance_bound(lower, upper, target)
    return _reduce(_worst_gap(lower, upper, target), distance, reduction)


def cc_dist_distance(
    adv_features: Tensor,
    lower: Tensor,
    upper: Tensor,
    target: Tensor,
    alpha: Alpha,
    combination: str = "box",
    distance: str = "l2sq",
    reduction: str = "sum",
) -> Tensor:
    """CC-Dist distance ``D_alpha`` between student and teacher features (docs/method.md §7.3).

    Combinations (phi and the reduction as in :func:`feature_distance`):

    * ``"literal"`` (D^A, §10.3): ``z = alpha * ĥ + (1 - alpha) * a``, ``D = D(z, t)``.
      Not monotone in alpha in general.
    * ``"box"`` (D^B, §10.4, default): ``delta_k = |(1-alpha) a_k + alpha c_k - t_k| +
      alpha r_k``, i.e. the max of ``D(., t)`` over the box ``(1-alpha) a + alpha [l, u]``.
      Non-decreasing in alpha when ``a`` lies in ``[l, u]``.
    * ``"distance"`` (D^C): ``delta_k = alpha (|c_k - t_k| + r_k) + (1-alpha) |a_k - t_k|``.

    All three equal ``feature_distance(a, t)`` at ``alpha == 0`` and
    ``worst_case_feature_distance(l, u, t)`` at ``alpha == 1`` exactly; for ``a`` in the
    box, D^A <= D^B <= D^C. The ``"cosine"`` distance takes the ``"box"`` combination only
    (its bound over ``B_alpha``); the other two are refused.

    Args:
        adv_features: student features ``a`` at the adversarial point, shape ``(N, m)``.
        lower, upper: IBP feature box, shape ``(N, m)``, ``lower <= upper``.
        target: teacher clean features ``t``, shape ``(N, m)``.
        alpha: float in ``[0, 1]`` (a one-element tensor is read as a constant).
        combination: one of :data:`COMBINATIONS`.
        distance, reduction: see :func:`feature_distance`.

    Returns:
        Shape ``(N,)``.
    """
    a_ = _check_alpha(alpha)
    _check_combination(combination)
    _check_names(distance, reduction)
    if distance == "cosine" and combination != "box":
        raise DistillationError(f"the cosine distance has no {combination!r} combination (it has no worst-case "
                                "point per coordinate): use combination 'box'")
    _check_teacher(adv_features, target)
    _check_box(lower, upper, adv_features, "student features")
    if a_ == 0.0:
        return feature_distance(adv_features, target, distance, reduction)
    if a_ == 1.0:
        return worst_case_feature_distance(lower, upper, target, distance, reduction)
    b_ = 1.0 - a_
    if combination == "literal":
        h_hat = worst_case_point(lower, upper, target)
        delta = (a_ * h_hat + b_ * adv_features - target).abs()
    elif combination == "box":
        base = b_ * adv_features
        # Endpoints of B_alpha = (1-alpha) a + alpha [l, u]; the farther one from t gives
        # |(1-alpha) a + alpha c - t| + alpha r.
        if distance == "cosine":
            return cosine_distance_bound(base + a_ * lower, base + a_ * upper, target)
        delta = _worst_gap(base + a_ * lower, base + a_ * upper, target)
    else:  # "distance"
        delta = a_ * _worst_gap(lower, upper, target) + b_ * (adv_features - target).abs()
    return _reduce(delta, distance, reduction)


def mtl_dist_distance(
    adv_features: Tensor,
    lower: Tensor,
    upper: Tensor,
    target: Tensor,
    alpha: Alpha,
    distance: str = "l2sq",
    reduction: str = "sum",
) -> Tensor:
    """MTL-style distance ``alpha * D1 + (1 - alpha) * D0`` per sample (docs/method.md §7.5).

    ``D1 = worst_case_feature_distance(l, u, t)``, ``D0 = feature_distance(a, t)``.
    At ``alpha`` 0 or 1 only the corresponding term is computed.

    Args:
        adv_features: ``a``, shape ``(N, m)``.
        lower, upper: IBP feature box, shape ``(N, m)``.
        target: ``t``, shape ``(N, m)``.
        alpha: float in ``[0, 1]``.
        distance, reduction: see :func:`feature_distance`.

    Returns:
        Shape ``(N,)``.
    """
    a_ = _check_alpha(alpha)
    _check_names(distance, reduction)
    _check_teacher(adv_features, target)
    _check_box(lower, upper, adv_features, "student features")
    if a_ == 0.0:
        return feature_distance(adv_features, target, distance, reduction)
    d1 = worst_case_feature_distance(lower, upper, target, distance, reduction)
    if a_ == 1.0:
        return d1
    d0 = feature_distance(adv_features, target, distance, reduction)
    return a_ * d1 + (1.0 - a_) * d0


def exp_dist_distance(
    adv_features: Tensor,
    lower: Tensor,
    upper: Tensor,
    target: Tensor,
    alpha: Alpha,
    distance: str = "l2sq",
    reduction: str = "sum",
    shard: Shard = LOCAL,
) -> Tensor:
    """Exp-style distance ``mean(D1) ** alpha * mean(D0) ** (1 - alpha)`` (docs/method.md §7.5).

    Both factors are batch means (as in Exp-IBP), so this is not a per-sample
    geometric mean. At ``alpha`` 0 or 1 only the corresponding mean is returned.
    For ``0 < alpha < 1`` the gradient is infinite where a batch mean is exactly 0.

    Args:
        adv_features: ``a``, shape ``(N, m)``.
        lower, upper: IBP feature box, shape ``(N, m)``.
        target: ``t``, shape ``(N, m)``.
        alpha: float in ``[0, 1]``.
        distance, reduction: see :func:`feature_distance`.
        shard: whose batch the two means are over (default ``LOCAL``: this one).

    Returns:
        Scalar tensor (shape ``()``).
    """
    a_ = _check_alpha(alpha)
    _check_names(distance, reduction)
    _check_teacher(adv_features, target)
    _check_box(lower, upper, adv_features, "student features")
    if a_ == 0.0:
        return shard.mean(feature_distance(adv_features, target, distance, reduction))
    d1 = shard.mean(worst_case_feature_distance(lower, upper, target, distance, reduction))
    if a_ == 1.0:
        return d1
    d0 = shard.mean(feature_distance(adv_features, target, distance, reduction))
    return d1.pow(a_) * d0.pow(1.0 - a_)


def project_to_box(points: Tensor, lower: Tensor, upper: Tensor) -> Tensor:
    """Clamp ``points`` elementwise into ``[lower, upper]`` (docs/method.md §7.6).

    Used to keep ``x_adv`` inside the IBP input box so that ``a`` lies in ``[l, u]``.

    Args:
        points: shape ``(N, *)``.
        lower, upper: shape ``(N, *)`` (or broadcastable to it), ``lower <= upper``.

    Returns:
        Shape ``(N, *)``; the gradient passes to ``points`` where it was not clamped.
    """
    return torch.clamp(points, min=lower, max=upper)


def logit_distillation_loss(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0, shard: Shard = LOCAL
) -> Tensor:
    """Hinton knowledge distillation: ``tau^2 * KL(softmax(t/tau) || softmax(s/tau))``.

    Args:
        student_logits: shape ``(N, K)``.
        teacher_logits: shape ``(N, K)``.
        temperature: ``tau > 0``.
        shard: whose batch the mean is over (default ``LOCAL``: this one).

    Returns:
        Scalar: the KL divergence summed over classes and averaged over the batch,
        times ``tau^2``.
    """
    tau = float(temperature)
    if not tau > 0.0:
        raise DistillationError(f"temperature must be positive, got {temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise DistillationError(
            f"student logits have shape {tuple(student_logits.shape)} but teacher logits "
            f"have shape {tuple(teacher_logits.shape)}; student and teacher must predict "
            "the same classes on the same batch"
        )
    if student_logits.dim() != 2:
        raise DistillationError(
            f"logits must have shape (N, K), got {tuple(student_logits.shape)}"
        )
    log_p_s = F.log_softmax(student_logits / tau, dim=-1)
    log_p_t = F.log_softmax(teacher_logits / tau, dim=-1)
    if shard.is_global:  # mean over the global batch in multi-process training
        kl = shard.mean(F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(-1))
    else:
        kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
    return kl * (tau * tau)
