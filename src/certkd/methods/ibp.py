"""IBP training (Gowal et al.): the loss of the IBP bound on the full training box, no attack."""
from __future__ import annotations

from certkd.methods._certified import CertifiedMethod
from certkd.methods.base import Batch, ReferenceCase, parts, register_method


@register_method("ibp")
class IBP(CertifiedMethod):
    order = 0
    summary = "the IBP bound of the full ε box, Gowal et al. (docs/method.md §5.1)"
    needs_attack = False
    uses_l1 = False

    def bounds(self, b: Batch, lower, upper):
        """(lower bounds (N, K−1) that enter the loss, IBP feature bounds carrying the clean point)."""
        return parts().ibp_logit_difference_bounds(b.model, lower, upper, b.y, point=b.x)

    def bounded_loss(self, b: Batch, ctx: dict, reg):
        P = parts()
        model, x, y = b.model, b.x, b.y
        lo_tr, hi_tr = P.linf_box(x, b.eps_tr)
        lb, fb = self.bounds(b, lo_tr, hi_tr)
        logits = model.head(fb.point_output)
        loss = P.L.ibp_loss(lb, b.shard)
        b.logs.update(acc_clean=P.accuracy(logits, y), ibp_loss=loss.detach(),
                      acc_ibp=(lb.min(1).values > 0).float().mean().detach())
        if ctx["use_reg"]:
            reg = P.warmup_regularizer(fb.preactivations, P.input_radius(model, lo_tr, hi_tr, shard=b.shard),
                                       self.cfg.reg_tol, shard=b.shard)
        return loss, reg

    @classmethod
    def reference_loss(cls, case: ReferenceCase):
        lo, hi = case.box()
        return parts().L.ibp_loss(case.bounds(case.fresh(), lo, hi, case.x)[0])
