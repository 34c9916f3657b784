"""CC-IBP: cross-entropy of the convex combination of IBP and adversarial logit differences."""
from __future__ import annotations

from certkd.methods._certified import CertifiedMethod
from certkd.methods.base import Batch, ReferenceCase, parts, register_method


@register_method("cc-ibp")
class CCIBP(CertifiedMethod):
    order = 1
    summary = "the loss of α·IBP bound + (1−α)·adversarial logit differences (docs/method.md §5.2)"

    def robust_loss(self, b: Batch, lb, d_adv, alpha: float):
        L = parts().L
        return L.cc_ibp_loss(lb, d_adv, alpha, b.shard) if alpha > 0 else L.adversarial_loss(d_adv, b.shard)

    @classmethod
    def reference_loss(cls, case: ReferenceCase):
        _, lb, _, d_adv, _ = case.certified()
        return parts().L.cc_ibp_loss(lb, d_adv, case.cfg.alpha)
