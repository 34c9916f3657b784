"""One training batch: the per-batch procedure of docs/method.md §4 for every method.

Order matters for BatchNorm: clean forward (train mode) → attack (eval mode) → adversarial
forward in train mode, carried through the same IBP pass, so the bounds use the batch
statistics of the adversarial batch. The loss formulas themselves are the pure functions of
:mod:`certkd.losses`. Every batch mean of a loss term is :func:`certkd.distributed.batch_mean`
(the mean over the global batch in multi-process training, see :mod:`certkd.distributed`);
logged numbers are this rank's and are averaged by the training loop.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from certkd.attacks import PGD, linf_box
from certkd.bounds import ibp_logit_difference_bounds, interval_bounds, logit_differences
from certkd import distributed
from certkd.config import DISTILLATION_METHODS, TrainConfig
from certkd.distributed import batch_mean
from certkd.losses import certified as L
from certkd.losses import distillation as D
from certkd.losses.regularizers import warmup_regularizer

WARMUP_EPS = 1e-50     # below this a batch is "natural" (docs/method.md §2.4)
REG_BOX_EPS = 1e-6     # box used for the regularisers on warm-up batches

# Robust-loss family and the α used by each distillation method.
_FAMILY = {"cc-ibp": "cc", "mtl-ibp": "mtl", "exp-ibp": "exp", "sabr": "sabr", "ibp": "ibp",
           "cc-dist": "cc", "mtl-dist": "mtl", "exp-dist": "exp", "sabr-dist": "sabr",
           "adv-dist": "cc", "ibp-dist": "cc", "cc-ibp-kd": "cc"}


def effective_alpha(cfg: TrainConfig) -> float:
    """The endpoints adv-dist (α=0) and ibp-dist (α=1) fix α; other methods use cfg.alpha."""
    return {"adv-dist": 0.0, "ibp-dist": 1.0}.get(cfg.method, cfg.alpha)


@dataclass
class Teacher:
    """A frozen teacher (eval mode, no gradient) and the optional learned feature adapter.

    The adapter sits on the *student's* side: an ``nn.Linear`` from the student's features
    (m_S) to the teacher's (m_T), trained with the student. The target is always the fixed
    teacher feature t = h_T(x); the distance is taken between A(student features) and t, and
    the student's IBP feature box goes through A by the exact interval rule of a linear layer
    (:meth:`adapt`). (On the teacher's side, trained with the distance, the adapter could walk
    the target towards the student: W = 0, b = the student's mean feature is a trivial optimum.)
    """

    model: nn.Module
    adapter: Optional[nn.Linear] = None

    def targets(self, x: Tensor) -> Tensor:
        """The fixed target t = h_T(x), (N, m_T): no gradient, no adapter."""
        with torch.no_grad():
            return self.model.features(x)

    def adapt(self, features: Tensor, lower: Optional[Tensor] = None,
              upper: Optional[Tensor] = None) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        """Student features (N, m_S) and their IBP box, mapped into the teacher's feature space.

        Returns (A(features), lower', upper') with [lower', upper'] the exact interval image of
        [lower, upper] under A (centre W c + b, radius |W| r); the box is None when not given.
        Without an adapter everything is returned unchanged.
        """
        if self.adapter is None:
            return features, lower, upper
        if lower is None:
            return self.adapter(features), None, None
        box = interval_bounds(nn.Sequential(self.adapter), lower, upper, point=features)
        return box.point_output, box.lower, box.upper

    def logits(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return self.model(x)


def _input_radius(model: nn.Module, lower: Tensor, upper: Tensor) -> Tensor:
    """δ0: mean half-width of the input box in normalised space."""
    norm = model.normalize
    return batch_mean((upper - lower) / 2 / norm._view(norm.std, lower))


def _ce(logits: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy, the mean over the (global, in multi-process training) batch."""
    if distributed.active():
        return batch_mean(F.cross_entropy(logits, y, reduction="none"))
    return F.cross_entropy(logits, y)


def _accuracy(logits: Tensor, y: Tensor) -> float:
    return (logits.argmax(1) == y).float().mean().item()


def training_loss(model: nn.Module, x: Tensor, y: Tensor, cfg: TrainConfig, eps_sched: float,
                  reg_active: bool, attack: PGD, teacher: Optional[Teacher] = None) -> Tuple[Tensor, Dict[str, float]]:
    """Loss of one batch and the numbers to log.

    Args:
        model: the network being trained (train mode).
        x, y: batch in pixel space (N, C, H, W) and labels (N,).
        eps_sched: ε_s from the schedule; the IBP radius is ε_s·train_eps_mul and the
            attack radius that times attack_eps_factor (docs/method.md §2.4).
        reg_active: whether this epoch is in warm-up + ramp (regularisers on).
        attack: the training attack.
        teacher: frozen teacher for distillation methods.
    """
    method = cfg.method
    eps_tr = eps_sched * cfg.train_eps_mul
    eps_att = eps_tr * cfg.attack_eps_factor
    warmup = eps_tr < WARMUP_EPS
    logs: Dict[str, float] = {"eps": eps_tr}

    if method == "standard":
        logits = model(x)
        loss = _ce(logits, y)
        logs.update(ce_clean=loss.item(), acc_clean=_accuracy(logits, y))
        return loss, logs

    if method in ("pgd-at", "trades"):
        logits = model(x)
        ce_clean = _ce(logits, y)
        logs.update(ce_clean=ce_clean.item(), acc_clean=_accuracy(logits, y))
        if warmup:
            return ce_clean, logs
        lo, hi = linf_box(x, eps_att)
        if method == "pgd-at":
            x_adv = attack(model, x, y, lo, hi)
            adv_logits = model(x_adv)
            loss = _ce(adv_logits, y)
            logs.update(ce_adv=loss.item(), acc_adv=_accuracy(adv_logits, y))
            return loss, logs
        target = logits.detach()
        kl_attack = PGD(attack.steps, attack.step_size, loss_fn=lambda z, t: L.trades_kl(z, t))
        x_adv = kl_attack(model, x, target, lo, hi)
        kl = batch_mean(L.trades_kl(model(x_adv), logits))
        logs.update(kl=kl.item())
        return ce_clean + cfg.trades_beta * kl, logs

    return _certified_loss(model, x, y, cfg, eps_sched, eps_tr, eps_att, warmup, reg_active, attack, teacher, logs)


def _adversarial_pass(model, x_adv, y, lower, upper, project: bool):
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


def _target_space(teacher: Optional[Teacher], zero_target: bool, t: Optional[Tensor], v: Tensor,
                  lower: Optional[Tensor] = None, upper: Optional[Tensor] = None):
    """(v, lower, upper, target) in the space where the distance is taken.

    With a teacher's adapter, the student's features and box are mapped into the teacher's
    feature space (:meth:`Teacher.adapt`); with ``dist_target: zero`` the target is 0.
    """
    if teacher is not None:
        v, lower, upper = teacher.adapt(v, lower, upper)
    return v, lower, upper, (torch.zeros_like(v) if zero_target else t)


def _certified_loss(model, x, y, cfg, eps_sched, eps_tr, eps_att, warmup, reg_active, attack, teacher, logs):
    method, family, alpha = cfg.method, _FAMILY[cfg.method], effective_alpha(cfg)
    distil = method in DISTILLATION_METHODS
    feature_dist = distil and method != "cc-ibp-kd"
    zero_target = feature_dist and cfg.dist_target == "zero"   # the no-teacher control (docs/method.md §7.9)
    use_reg = reg_active and cfg.reg_lambda > 0
    t = teacher.targets(x) if (feature_dist and not zero_target and teacher is not None) else None
    reg = torch.zeros((), device=x.device)

    if warmup:
        if use_reg:
            lo, hi = linf_box(x, REG_BOX_EPS)
            _, fb = ibp_logit_difference_bounds(model, lo, hi, y, point=x)
            feats = fb.point_output
            reg = warmup_regularizer(fb.preactivations, _input_radius(model, lo, hi), cfg.reg_tol)
        else:
            feats = model.features(x)
        logits = model.head(feats)
        loss = _ce(logits, y)
        logs.update(ce_clean=loss.item(), acc_clean=_accuracy(logits, y))
        if feature_dist and cfg.dist_warmup and cfg.beta > 0 and (t is not None or zero_target):
            v, _, _, target = _target_space(teacher, zero_target, t, feats)
            dist = batch_mean(D.feature_distance(v, target, cfg.dist_distance, cfg.dist_reduction))
            loss = loss + cfg.beta * dist
            logs["dist"] = dist.item()
    else:
        lo_tr, hi_tr = linf_box(x, eps_tr)
        if family == "ibp":
            lb, fb = ibp_logit_difference_bounds(model, lo_tr, hi_tr, y, point=x)
            logits = model.head(fb.point_output)
            loss = L.ibp_loss(lb)
            logs.update(acc_clean=_accuracy(logits, y), ibp_loss=loss.item(),
                        acc_ibp=(lb.min(1).values > 0).float().mean().item())
        else:
            logits = model(x)  # clean forward: running BN statistics and clean accuracy
            logs.update(ce_clean=F.cross_entropy(logits, y).item(), acc_clean=_accuracy(logits, y))
            lo_att, hi_att = linf_box(x, eps_att)
            x_adv = attack(model, x, y, lo_att, hi_att)
            if family == "sabr":
                lo_b, hi_b = L.sabr_box(x_adv, lo_att, hi_att, cfg.alpha, eps_att)
            else:
                lo_b, hi_b = lo_tr, hi_tr
            # docs/method.md §7.6: the distillation term needs the adversarial point inside the IBP box.
            project = distil and family != "sabr" and cfg.attack_eps_factor > 1.0
            need_bounds = alpha > 0 or use_reg or family == "sabr" or (distil and family in ("mtl", "exp"))
            if need_bounds or project:
                lb, fb, a, a_dist = _adversarial_pass(model, x_adv, y, lo_b, hi_b, project)
            else:  # α = 0 without regularisers: no bound is used, skip the IBP pass
                lb, fb = None, None
                a = a_dist = model.features(x_adv)
            adv_logits = model.head(a)
            d_adv = logit_differences(adv_logits, y)
            logs.update(acc_adv=_accuracy(adv_logits, y))
            if lb is not None:
                logs["acc_ibp"] = (lb.min(1).values > 0).float().mean().item()
            if family == "cc":
                loss = L.cc_ibp_loss(lb, d_adv, alpha) if alpha > 0 else L.adversarial_loss(d_adv)
            elif family == "mtl":
                loss = L.mtl_ibp_loss(lb, d_adv, alpha)
            elif family == "exp":
                loss = L.exp_ibp_loss(lb, d_adv, alpha)
            else:  # sabr: the small-box bound alone
                loss = L.ibp_loss(lb)
            logs["robust_loss"] = loss.item()
            if distil and cfg.beta > 0:
                if method == "cc-ibp-kd":
                    dist = D.logit_distillation_loss(adv_logits, teacher.logits(x_adv), cfg.kd_temperature)
                else:
                    # student features and box in the target's space (the adapter, if any, is the student's)
                    box = (fb.lower, fb.upper) if fb is not None else (None, None)
                    a_t, l_t, u_t, t_t = _target_space(teacher, zero_target, t, a_dist, *box)
                    if family == "cc" and alpha > 0:
                        dist = batch_mean(D.cc_dist_distance(a_t, l_t, u_t, t_t, alpha, cfg.dist_combination,
                                                             cfg.dist_distance, cfg.dist_reduction))
                    elif family == "cc":
                        dist = batch_mean(D.feature_distance(a_t, t_t, cfg.dist_distance, cfg.dist_reduction))
                    elif family == "mtl":
                        dist = batch_mean(D.mtl_dist_distance(a_t, l_t, u_t, t_t, alpha, cfg.dist_distance,
                                                              cfg.dist_reduction))
                    elif family == "exp":
                        dist = D.exp_dist_distance(a_t, l_t, u_t, t_t, alpha, cfg.dist_distance, cfg.dist_reduction)
                    else:  # sabr-dist: worst case over the small-box features
                        dist = batch_mean(D.worst_case_feature_distance(l_t, u_t, t_t, cfg.dist_distance,
                                                                        cfg.dist_reduction))
                loss = loss + cfg.beta * dist
                logs["dist"] = dist.item()
            if use_reg:
                reg = warmup_regularizer(fb.preactivations, _input_radius(model, lo_b, hi_b), cfg.reg_tol)
        if family == "ibp" and use_reg:
            reg = warmup_regularizer(fb.preactivations, _input_radius(model, lo_tr, hi_tr), cfg.reg_tol)

    if use_reg:
        scale = cfg.reg_lambda * (1.0 - eps_sched / cfg.eps)
        loss = loss + scale * reg
        logs["reg"] = reg.item()
    if family != "ibp" and cfg.l1 > 0:
        loss = loss + cfg.l1 * L.l1_penalty(model)
    return loss, logs
