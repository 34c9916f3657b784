"""MTL-Dist: MTL-IBP plus β times the MTL feature distance (docs/method.md §7)."""
from __future__ import annotations

from certkd.methods._certified import FeatureDistillation
from certkd.methods.base import Batch, ReferenceCase, parts, register_method
from certkd.methods.mtl_ibp import MTLIBP


@register_method("mtl-dist")
class MTLDist(FeatureDistillation, MTLIBP):
    order = 1
    summary = "MTL-IBP + β · the MTL-combined feature distance to the teacher (docs/method.md §7.5)"
    always_bounds = True

    def feature_distance(self, b: Batch, a, lower, upper, target, alpha: float):
        P, cfg = parts(), self.cfg
        return b.shard.mean(P.D.mtl_dist_distance(a, lower, upper, target, alpha, self.metric,
                                                  cfg.dist_reduction))

    @classmethod
    def reference_loss(cls, case: ReferenceCase):
        P, cfg = parts(), case.cfg
        _, lb, fb, d_adv, _ = case.certified()
        dist = P.D.mtl_dist_distance(fb.point_output, fb.lower, fb.upper, case.teacher.targets(case.x), cfg.alpha,
                                     **case.distance)
        return P.L.mtl_ibp_loss(lb, d_adv, cfg.alpha) + cfg.beta * dist.mean()
