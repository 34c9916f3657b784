"""TAPS-Dist: TAPS plus β times the worst-case feature distance over the IBP box of the student's features
(docs/method.md §5.9, §7), as sabr-dist adds it to SABR."""
from __future__ import annotations

from certkd.methods._certified import FeatureDistillation
from certkd.methods.base import Batch, ReferenceCase, parts, register_method
from certkd.methods.taps import TAPS


@register_method("taps-dist")
class TAPSDist(FeatureDistillation, TAPS):
    order = 8
    summary = "TAPS + β · the worst-case feature distance over the features' IBP box (docs/method.md §7.5)"

    def feature_distance(self, b: Batch, a, lower, upper, target, alpha: float):
        return b.shard.mean(parts().D.worst_case_feature_distance(lower, upper, target, self.metric,
                                                                  self.cfg.dist_reduction))

    @classmethod
    def reference_loss(cls, case: ReferenceCase):
        parts().torch.manual_seed(case.seed)
        return cls.plus_distance(case, *TAPS.loss_on_box(case.fresh(), case.cfg, *case.box(), case.x, case.y))

    @staticmethod
    def plus_distance(case: ReferenceCase, loss, fb):
        """``loss`` + β · the worst-case feature distance over the features' box ``fb``, by hand."""
        t = case.teacher.targets(case.x)
        return loss + case.cfg.beta * parts().D.worst_case_feature_distance(fb.lower, fb.upper, t,
                                                                            **case.distance).mean()
