"""CC-IBP: cross-entropy of the convex combination of IBP and adversarial logit differences."""
from __future__ import annotations

from certkd.methods._certified import CertifiedMethod
from certkd.methods.base import parts, register_method


@register_method("cc-ibp")
class CCIBP(CertifiedMethod):
    order = 1

    def robust_loss(self, lb, d_adv, alpha: float):
        L = parts().L
        return L.cc_ibp_loss(lb, d_adv, alpha) if alpha > 0 else L.adversarial_loss(d_adv)
