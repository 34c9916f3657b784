"""SABR-Dist: SABR plus β times the worst-case feature distance over the small box (docs/method.md §7)."""
from __future__ import annotations

from certkd.methods._certified import FeatureDistillation
from certkd.methods.base import Batch, ReferenceCase, parts, register_method
from certkd.methods.sabr import SABR


@register_method("sabr-dist")
class SABRDist(FeatureDistillation, SABR):
    order = 3
    summary = "SABR + β · the worst-case feature distance over the small box (docs/method.md §7.5)"
    project_adv = False   # the small box already contains x_adv

    def feature_distance(self, b: Batch, a, lower, upper, target, alpha: float):
        P, cfg = parts(), self.cfg
        return b.shard.mean(P.D.worst_case_feature_distance(lower, upper, target, self.metric,
                                                            cfg.dist_reduction))

    @classmethod
    def reference_loss(cls, case: ReferenceCase):
        P, cfg, m = parts(), case.cfg, case.fresh()
        _, lo, hi, x_adv = case.attacked(m)
        lb, fb, _ = case.bounds(m, *P.L.sabr_box(x_adv, lo, hi, cfg.alpha, case.eps), x_adv)
        t = case.teacher.targets(case.x)
        return P.L.ibp_loss(lb) + cfg.beta * P.D.worst_case_feature_distance(fb.lower, fb.upper, t,
                                                                             **case.distance).mean()
