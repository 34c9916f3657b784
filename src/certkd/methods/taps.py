"""TAPS (Mao et al., NeurIPS 2023; docs/method.md §5.9): IBP through the feature extractor, PGD through
the classifier head, joined by the gradient connector.

The variant is the paper's TAPS-IBP loss: L = L_TAPS · L_IBP, where L_TAPS is the loss of the
per-class worst-case margins that the latent PGD finds (one PGD per class j ≠ y, in the IBP
box of the extractor's output) and L_IBP the IBP loss of the whole network on the same box;
the gradient of L_TAPS is multiplied by ``taps_grad_scale`` (the paper's gradient expanding
factor w). The split point is ``taps_head_relus`` (top-level ReLU blocks of the features in the
classifier), the connector's slack ``taps_link_slack`` (the paper's c), the latent PGD
``taps_steps`` steps of relative size ``taps_step_size`` (constant: the paper decays it).
The latent PGD runs in eval mode (BatchNorm running statistics, as the training attack); the
final margins and bounds use the batch statistics of the clean point, as ``ibp`` does.
"""
from __future__ import annotations

from certkd.methods._certified import CertifiedMethod
from certkd.methods.base import Batch, ReferenceCase, parts, register_method


@register_method("taps")
class TAPS(CertifiedMethod):
    order = 6
    summary = ("L_TAPS · L_IBP: IBP through the feature extractor, PGD through the classifier head, Mao et al. 2023 "
               "(docs/method.md §5.9)")
    needs_attack = False

    def taps_box(self, b: Batch):
        """(lower, upper, point): the box bounded by the extractor and the point whose BN statistics apply."""
        lo, hi = parts().linf_box(b.x, b.eps_tr)
        return lo, hi, b.x

    def loss(self, b: Batch):
        from certkd.losses.taps import split_network

        split_network(b.model, self.cfg.taps_head_relus)  # a bad split fails on the first batch, not after warm-up
        return super().loss(b)

    def bounded_loss(self, b: Batch, ctx: dict, reg):
        from certkd.bounds import interval_bounds
        from certkd.losses import taps as T

        P, cfg, model, y = parts(), self.cfg, b.model, b.y
        lo, hi, point = self.taps_box(b)
        extractor, classifier = T.split_network(model, cfg.taps_head_relus)
        latent = interval_bounds(extractor, lo, hi, point)
        pts = T.pivotal_points(classifier, latent.lower, latent.upper, y, cfg.taps_steps, cfg.taps_step_size)
        pts = T.RectifiedLinearLink.apply(latent.lower, latent.upper, pts, cfg.taps_link_slack, T.LINK_TOL)
        lb, margins, fb = T.head_bounds(classifier, latent, pts, y)
        ibp_loss, taps_loss = P.L.ibp_loss(lb, b.shard), P.L.ibp_loss(margins, b.shard)
        loss = T.scale_grad(taps_loss, cfg.taps_grad_scale) * ibp_loss
        key = "acc_clean" if point is b.x else "acc_adv"
        b.logs.update({key: P.accuracy(model.head(fb.point_output), y)}, ibp_loss=ibp_loss.detach(),
                      taps_loss=taps_loss.detach(), acc_ibp=(lb.min(1).values > 0).float().mean().detach(),
                      acc_taps=(margins.min(1).values > 0).float().mean().detach())
        if self.distils and cfg.beta > 0:  # the distillation variants: the features' box is the head's IBP box
            ctx.update(fb=fb, a_dist=fb.point_output)
            dist = self.distance(b, ctx)
            loss = loss + cfg.beta * dist
            b.logs["dist"] = dist.detach()
        if ctx["use_reg"]:
            reg = P.warmup_regularizer(latent.preactivations + fb.preactivations,
                                       P.input_radius(model, lo, hi, shard=b.shard), cfg.reg_tol, shard=b.shard)
        return loss, reg

    @staticmethod
    def loss_on_box(model, cfg, lo, hi, point, y):
        """(L_TAPS · L_IBP of [lo, hi] by hand, the features' IBP box) for :meth:`reference_loss`: the same
        parts without the gradient connector, which changes no value (docs/method.md §5.9)."""
        from certkd.bounds import interval_bounds
        from certkd.losses import taps as T

        L = parts().L
        extractor, classifier = T.split_network(model, cfg.taps_head_relus)
        latent = interval_bounds(extractor, lo, hi, point)
        pts = T.pivotal_points(classifier, latent.lower, latent.upper, y, cfg.taps_steps, cfg.taps_step_size)
        lb, margins, fb = T.head_bounds(classifier, latent, pts, y)
        return L.ibp_loss(margins) * L.ibp_loss(lb), fb

    @classmethod
    def reference_loss(cls, case: ReferenceCase):
        parts().torch.manual_seed(case.seed)
        return cls.loss_on_box(case.fresh(), case.cfg, *case.box(), case.x, case.y)[0]
