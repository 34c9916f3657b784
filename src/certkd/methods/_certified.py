"""Base of the certified and distillation methods: the batch procedure of docs/method.md §4.

Warm-up batches (ε below WARMUP_EPS) train on the clean cross-entropy, with the warm-up
regulariser on a tiny box; after warm-up: clean forward (train mode, BN statistics) → attack
(eval mode) → adversarial forward in train mode carried through the IBP pass. A subclass
chooses the box (:meth:`bound_box`), the robust loss (:meth:`robust_loss`) and, for
distillation, the distance (:meth:`distance`). Hooks that reduce over the batch get the batch
``b`` and take their means over ``b.shard`` (see :mod:`certkd.distributed`).
"""
from __future__ import annotations

from certkd.methods.base import Batch, Method, parts


class CertifiedMethod(Method):
    category = "certified"
    needs_bounds = True
    needs_attack = True
    distils = False          # adds β·distance after warm-up
    project_adv = True       # distillation: project x_adv into the IBP box when the attack box is larger
    always_bounds = False    # propagate the IBP box even at α = 0 without regulariser
    uses_l1 = True

    # -- hooks -------------------------------------------------------------------------------------
    def bound_box(self, b: Batch, x_adv, lo_att, hi_att, lo_tr, hi_tr):
        """The box whose IBP bound enters the loss: the training box by default."""
        return lo_tr, hi_tr

    def robust_loss(self, b: Batch, lb, d_adv, alpha: float):
        """The robust term (a batch mean over ``b.shard``) from the IBP bounds and the attack's differences."""
        raise NotImplementedError

    def distance(self, b: Batch, ctx: dict):
        """The distillation term after warm-up (methods with ``distils``)."""
        raise NotImplementedError

    def warmup_distance(self, b: Batch, feats, ctx: dict):
        """The distillation term on warm-up batches, or None."""
        return None

    def targets(self, b: Batch, ctx: dict) -> None:
        """Fill ctx with the distillation target (feature distillation only)."""

    # -- the procedure -----------------------------------------------------------------------------
    def loss(self, b: Batch):
        P = parts()
        cfg = self.cfg
        ctx = {"alpha": self.alpha(), "use_reg": b.reg_active and cfg.reg_lambda > 0}
        self.targets(b, ctx)
        reg = P.torch.zeros((), device=b.x.device)
        if b.warmup:
            loss, reg = self.warmup_loss(b, ctx, reg)
        else:
            loss, reg = self.bounded_loss(b, ctx, reg)
        if ctx["use_reg"]:
            scale = cfg.reg_lambda * (1.0 - b.eps_sched / cfg.eps)
            loss = loss + scale * reg
            b.logs["reg"] = reg.detach()
        if self.uses_l1 and cfg.l1 > 0:
            loss = loss + cfg.l1 * P.L.l1_penalty(b.model)
        return loss

    def warmup_loss(self, b: Batch, ctx: dict, reg):
        P = parts()
        model, x, y = b.model, b.x, b.y
        if ctx["use_reg"]:
            lo, hi = P.linf_box(x, P.REG_BOX_EPS)
            _, fb = P.ibp_logit_difference_bounds(model, lo, hi, y, point=x)
            feats = fb.point_output
            reg = P.warmup_regularizer(fb.preactivations, P.input_radius(model, lo, hi, shard=b.shard),
                                       self.cfg.reg_tol, shard=b.shard)
        else:
            feats = model.features(x)
        logits = model.head(feats)
        loss = P.ce(logits, y, shard=b.shard)
        b.logs.update(ce_clean=loss.detach(), acc_clean=P.accuracy(logits, y))
        dist = self.warmup_distance(b, feats, ctx)
        if dist is not None:
            loss = loss + self.cfg.beta * dist
            b.logs["dist"] = dist.detach()
        return loss, reg

    def bounded_loss(self, b: Batch, ctx: dict, reg):
        P = parts()
        cfg, model, x, y, alpha = self.cfg, b.model, b.x, b.y, ctx["alpha"]
        lo_tr, hi_tr = P.linf_box(x, b.eps_tr)
        with P.torch.no_grad():  # clean forward: BN running statistics and logged accuracy only, no graph
            logits = model(x)
        b.logs.update(ce_clean=P.F.cross_entropy(logits, y).detach(), acc_clean=P.accuracy(logits, y))
        lo_att, hi_att = P.linf_box(x, b.eps_att)
        x_adv = b.attack(model, x, y, lo_att, hi_att, shard=b.shard)
        lo_b, hi_b = self.bound_box(b, x_adv, lo_att, hi_att, lo_tr, hi_tr)
        # docs/method.md §7.6: the distillation term needs the adversarial point inside the IBP box.
        project = self.distils and self.project_adv and cfg.attack_eps_factor > 1.0
        if alpha > 0 or ctx["use_reg"] or self.always_bounds or project:
            lb, fb, a, a_dist = P.adversarial_pass(model, x_adv, y, lo_b, hi_b, project)
        else:  # α = 0 without regularisers: no bound is used, skip the IBP pass
            lb, fb = None, None
            a = a_dist = model.features(x_adv)
        adv_logits = model.head(a)
        d_adv = P.logit_differences(adv_logits, y)
        b.logs.update(acc_adv=P.accuracy(adv_logits, y))
        if lb is not None:
            b.logs["acc_ibp"] = (lb.min(1).values > 0).float().mean().detach()
        loss = self.robust_loss(b, lb, d_adv, alpha)
        b.logs["robust_loss"] = loss.detach()
        if self.distils and cfg.beta > 0:
            ctx.update(x_adv=x_adv, adv_logits=adv_logits, a_dist=a_dist, fb=fb)
            dist = self.distance(b, ctx)
            loss = loss + cfg.beta * dist
            b.logs["dist"] = dist.detach()
        if ctx["use_reg"]:
            reg = P.warmup_regularizer(fb.preactivations, P.input_radius(model, lo_b, hi_b, shard=b.shard),
                                       cfg.reg_tol, shard=b.shard)
        return loss, reg


def _stats(b: Batch):
    """The teacher's feature statistics (:class:`certkd.training.teacher_stats.FeatureStats`)."""
    if b.teacher.stats is None:
        from certkd.errors import CertkdError
        raise CertkdError("dist_target class-mean and dist_distance standardized need the teacher's feature statistics: "
                          "set Teacher.stats = certkd.training.teacher_stats.teacher_feature_stats(...) "
                          "(certkd train does it when it loads the teacher)")
    return b.teacher.stats


class FeatureDistillation(CertifiedMethod):
    """A certified loss plus β times a distance between student and teacher features (docs/method.md §7).

    The target is the teacher's clean feature t = h_T(x), 0 with ``dist_target: zero`` (the
    no-teacher control, docs/method.md §7.9), or the teacher's mean feature of the sample's class
    with ``dist_target: class-mean`` (§7.10); a feature adapter maps the student's side. With
    ``dist_distance: standardized`` both sides are divided by the teacher's per-feature std
    before the l2sq distance (§7.4).
    """

    category = "distillation"
    distils = True
    needs_teacher = True

    @property
    def metric(self) -> str:
        """The distance the loss functions compute: ``standardized`` is l2sq on rescaled features."""
        d = self.cfg.dist_distance
        return "l2sq" if d == "standardized" else d

    def targets(self, b: Batch, ctx: dict) -> None:
        target = self.cfg.dist_target
        ctx["zero_target"] = target == "zero"
        if target == "zero" or b.teacher is None:
            ctx["t"] = None
        elif target == "class-mean":
            ctx["t"] = _stats(b).class_means[b.y]
        else:
            ctx["t"] = b.teacher.targets(b.x)

    def space(self, b: Batch, ctx: dict, v, lower=None, upper=None):
        """(v, lower, upper, target) where the distance is taken: the target's space (adapter), then,
        for ``standardized``, every side times the teacher's 1/std (exact on boxes: the factors are >= 0)."""
        P = parts()
        v, lower, upper, t = P.target_space(b.teacher, ctx["zero_target"], ctx["t"], v, lower, upper)
        if self.cfg.dist_distance == "standardized":
            s = _stats(b).scale
            v, t = v * s, t * s
            if lower is not None:
                lower, upper = lower * s, upper * s
        return v, lower, upper, t

    def warmup_distance(self, b: Batch, feats, ctx: dict):
        cfg = self.cfg
        if not (cfg.dist_warmup and cfg.beta > 0 and (ctx["t"] is not None or ctx["zero_target"])):
            return None
        P = parts()
        v, _, _, target = self.space(b, ctx, feats)
        return b.shard.mean(P.D.feature_distance(v, target, self.metric, cfg.dist_reduction))

    def distance(self, b: Batch, ctx: dict):
        fb = ctx["fb"]
        # student features and box in the target's space (the adapter, if any, is the student's)
        box = (fb.lower, fb.upper) if fb is not None else (None, None)
        a_t, l_t, u_t, t_t = self.space(b, ctx, ctx["a_dist"], *box)
        return self.feature_distance(b, a_t, l_t, u_t, t_t, ctx["alpha"])

    def feature_distance(self, b: Batch, a, lower, upper, target, alpha: float):
        """The distance (:attr:`metric`) between the student's features (point a, box [lower, upper]) and
        the target, a batch mean over ``b.shard``."""
        raise NotImplementedError
