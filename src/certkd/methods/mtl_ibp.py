"""MTL-IBP: convex combination of the IBP loss and the adversarial loss."""
from __future__ import annotations

from certkd.methods._certified import CertifiedMethod
from certkd.methods.base import Batch, ReferenceCase, parts, register_method


@register_method("mtl-ibp")
class MTLIBP(CertifiedMethod):
    order = 2
    summary = "α·IBP loss + (1−α)·adversarial loss (docs/method.md §5.3)"

    def robust_loss(self, b: Batch, lb, d_adv, alpha: float):
        return parts().L.mtl_ibp_loss(lb, d_adv, alpha, b.shard)

    @classmethod
    def reference_loss(cls, case: ReferenceCase):
        _, lb, _, d_adv, _ = case.certified()
        return parts().L.mtl_ibp_loss(lb, d_adv, case.cfg.alpha)
