"""IBP training (Gowal et al.): the loss of the IBP bound on the full training box, no attack."""
from __future__ import annotations

from certkd.methods._certified import CertifiedMethod
from certkd.methods.base import Batch, parts, register_method


@register_method("ibp")
class IBP(CertifiedMethod):
    order = 0
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
        b.logs.update(acc_clean=P.accuracy(logits, y), ibp_loss=loss.item(),
                      acc_ibp=(lb.min(1).values > 0).float().mean().item())
        if ctx["use_reg"]:
            reg = P.warmup_regularizer(fb.preactivations, P.input_radius(model, lo_tr, hi_tr, shard=b.shard),
                                       self.cfg.reg_tol, shard=b.shard)
        return loss, reg
