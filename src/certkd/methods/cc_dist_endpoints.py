"""The endpoints of CC-Dist with α fixed: adv-dist (α = 0) and ibp-dist (α = 1)."""
from __future__ import annotations

from certkd.methods.base import ReferenceCase, parts, register_method
from certkd.methods.cc_dist import CCDist, cc_dist_reference


@register_method("adv-dist")
class AdvDist(CCDist):
    order = 4
    summary = "CC-Dist with α = 0: adversarial feature matching (docs/method.md §7.5)"

    def alpha(self) -> float:
        return 0.0

    @classmethod
    def reference_loss(cls, case: ReferenceCase):  # α = 0: no IBP pass, adversarial loss plus the plain distance
        P, m = parts(), case.fresh()
        x_adv = case.attacked(m)[3]
        a = m.features(x_adv)
        d_adv = P.logit_differences(m.head(a), case.y)
        return P.L.adversarial_loss(d_adv) + case.cfg.beta * P.D.feature_distance(
            a, case.teacher.targets(case.x), **case.distance).mean()


@register_method("ibp-dist")
class IBPDist(CCDist):
    order = 5
    summary = "CC-Dist with α = 1: the certified bound only (docs/method.md §7.5)"

    def alpha(self) -> float:
        return 1.0

    @classmethod
    def reference_loss(cls, case: ReferenceCase):
        return cc_dist_reference(case, 1.0)
