"""Exp-Dist: Exp-IBP plus β times the Exp feature distance (docs/method.md §7)."""
from __future__ import annotations

from certkd.methods._certified import FeatureDistillation
from certkd.methods.base import Batch, ReferenceCase, parts, register_method
from certkd.methods.exp_ibp import ExpIBP


@register_method("exp-dist")
class ExpDist(FeatureDistillation, ExpIBP):
    order = 2
    summary = "Exp-IBP + β · the Exp-combined feature distance to the teacher (docs/method.md §7.5)"
    always_bounds = True

    def feature_distance(self, b: Batch, a, lower, upper, target, alpha: float):
        cfg = self.cfg
        return parts().D.exp_dist_distance(a, lower, upper, target, alpha, self.metric, cfg.dist_reduction,
                                           shard=b.shard)

    @classmethod
    def reference_loss(cls, case: ReferenceCase):
        P, cfg = parts(), case.cfg
        _, lb, fb, d_adv, _ = case.certified()
        dist = P.D.exp_dist_distance(fb.point_output, fb.lower, fb.upper, case.teacher.targets(case.x), cfg.alpha,
                                     **case.distance)
        return P.L.exp_ibp_loss(lb, d_adv, cfg.alpha) + cfg.beta * dist
