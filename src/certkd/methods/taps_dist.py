"""TAPS-Dist: TAPS plus β times the worst-case feature distance over the IBP box of the student's features
(docs/method.md §5.9, §7), as sabr-dist adds it to SABR."""
from __future__ import annotations

from certkd.methods._certified import FeatureDistillation
from certkd.methods.base import Batch, parts, register_method
from certkd.methods.taps import TAPS


@register_method("taps-dist")
class TAPSDist(FeatureDistillation, TAPS):
    order = 8

    def feature_distance(self, b: Batch, a, lower, upper, target, alpha: float):
        return b.shard.mean(parts().D.worst_case_feature_distance(lower, upper, target, self.metric,
                                                                  self.cfg.dist_reduction))
