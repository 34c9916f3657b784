"""CC-Dist: CC-IBP plus β times the CC-Dist feature distance (docs/method.md §7)."""
from __future__ import annotations

from certkd.methods._certified import FeatureDistillation
from certkd.methods.base import Batch, ReferenceCase, parts, register_method
from certkd.methods.cc_ibp import CCIBP


@register_method("cc-dist")
class CCDist(FeatureDistillation, CCIBP):
    order = 0
    summary = ("CC-IBP + β · the feature distance to the teacher over the combined box (default "
               "combination `box`; docs/method.md §7)")

    def feature_distance(self, b: Batch, a, lower, upper, target, alpha: float):
        P, cfg = parts(), self.cfg
        if alpha > 0:
            return b.shard.mean(P.D.cc_dist_distance(a, lower, upper, target, alpha, cfg.dist_combination,
                                                     self.metric, cfg.dist_reduction))
        return b.shard.mean(P.D.feature_distance(a, target, self.metric, cfg.dist_reduction))

    @classmethod
    def reference_loss(cls, case: ReferenceCase):
        return cc_dist_reference(case, case.cfg.alpha)


def cc_dist_reference(case: ReferenceCase, alpha: float):
    """CC-IBP at ``alpha`` plus β times the CC-Dist distance, by hand (CC-Dist and its α = 1 end, IBP-Dist)."""
    P, cfg = parts(), case.cfg
    _, lb, fb, d_adv, _ = case.certified()
    dist = P.D.cc_dist_distance(fb.point_output, fb.lower, fb.upper, case.teacher.targets(case.x), alpha,
                                cfg.dist_combination, **case.distance)
    return P.L.cc_ibp_loss(lb, d_adv, alpha) + cfg.beta * dist.mean()
