"""SABR: the IBP loss of a small box (λ = cfg.alpha of the attack box) around the PGD point."""
from __future__ import annotations

from certkd.methods._certified import CertifiedMethod
from certkd.methods.base import Batch, ReferenceCase, parts, register_method


@register_method("sabr")
class SABR(CertifiedMethod):
    order = 4
    summary = "the IBP bound of a small box around the PGD point, Müller et al. 2023 (docs/method.md §5.5)"
    always_bounds = True

    def bound_box(self, b: Batch, x_adv, lo_att, hi_att, lo_tr, hi_tr):
        return parts().L.sabr_box(x_adv, lo_att, hi_att, self.cfg.alpha, b.eps_att)

    def robust_loss(self, b: Batch, lb, d_adv, alpha: float):
        return parts().L.ibp_loss(lb, b.shard)  # the small-box bound alone

    @classmethod
    def reference_loss(cls, case: ReferenceCase):
        L, m = parts().L, case.fresh()
        _, lo, hi, x_adv = case.attacked(m)
        slo, shi = L.sabr_box(x_adv, lo, hi, case.cfg.alpha, case.eps)
        return L.ibp_loss(case.bounds(m, slo, shi, x_adv)[0])
