"""STAPS-Dist: STAPS plus β times the worst-case feature distance over the IBP box of the student's
features on SABR's small box (docs/method.md §5.9, §7): taps-dist's distance on staps's box."""
from __future__ import annotations

from certkd.methods.base import ReferenceCase, parts, register_method
from certkd.methods.staps import STAPS
from certkd.methods.taps_dist import TAPSDist


@register_method("staps-dist")
class STAPSDist(TAPSDist, STAPS):
    order = 9
    summary = "STAPS + β · the worst-case feature distance over the features' IBP box (docs/method.md §7.5)"

    @classmethod
    def reference_loss(cls, case: ReferenceCase):
        m = case.fresh()
        _, lo, hi, x_adv = case.attacked(m)
        slo, shi = parts().L.sabr_box(x_adv, lo, hi, case.cfg.alpha, case.eps)
        return cls.plus_distance(case, *cls.loss_on_box(m, case.cfg, slo, shi, x_adv, case.y))
