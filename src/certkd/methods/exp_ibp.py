"""Exp-IBP: geometric combination of the IBP loss and the adversarial loss."""
from __future__ import annotations

from certkd.methods._certified import CertifiedMethod
from certkd.methods.base import Batch, ReferenceCase, parts, register_method


@register_method("exp-ibp")
class ExpIBP(CertifiedMethod):
    order = 3
    summary = "IBP loss^α · adversarial loss^(1−α) (docs/method.md §5.4)"

    def robust_loss(self, b: Batch, lb, d_adv, alpha: float):
        return parts().L.exp_ibp_loss(lb, d_adv, alpha, b.shard)

    @classmethod
    def reference_loss(cls, case: ReferenceCase):
        _, lb, _, d_adv, _ = case.certified()
        return parts().L.exp_ibp_loss(lb, d_adv, case.cfg.alpha)
