"""SABR-Dist: SABR plus β times the worst-case feature distance over the small box (docs/method.md §7)."""
from __future__ import annotations

from certkd.methods._certified import FeatureDistillation
from certkd.methods.base import Batch, parts, register_method
from certkd.methods.sabr import SABR


@register_method("sabr-dist")
class SABRDist(FeatureDistillation, SABR):
    order = 3
    project_adv = False   # the small box already contains x_adv

    def feature_distance(self, b: Batch, a, lower, upper, target, alpha: float):
        P, cfg = parts(), self.cfg
        return b.shard.mean(P.D.worst_case_feature_distance(lower, upper, target, self.metric,
                                                            cfg.dist_reduction))
