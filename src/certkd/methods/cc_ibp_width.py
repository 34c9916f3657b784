"""CC-IBP-Width: CC-IBP plus β times the size of the student's IBP feature box, no teacher (docs/method.md §7.11).

The penalty is ``D(u, l)``, the chosen distance between the box's two corners (``--dist-distance l1``:
the summed widths ``sum_k (u_k - l_k)``; the default l2sq: ``sum_k (u_k - l_k)**2``), over the
training box of the robust loss: a generic penalty that carries no teacher's information.
"""
from __future__ import annotations

from certkd.methods.base import Batch, ReferenceCase, parts, register_method
from certkd.methods.cc_ibp import CCIBP


@register_method("cc-ibp-width")
class CCIBPWidth(CCIBP):
    category = "distillation"
    order = 7
    summary = "CC-IBP + β · the size of the student's IBP feature box, no teacher (docs/method.md §7.11)"
    distils = True
    always_bounds = True   # the penalty needs the box at α = 0 too
    project_adv = False    # it does not use the adversarial point

    def distance(self, b: Batch, ctx: dict):
        cfg, fb = self.cfg, ctx["fb"]
        return b.shard.mean(parts().D.feature_distance(fb.upper, fb.lower, cfg.dist_distance, cfg.dist_reduction))

    @classmethod
    def reference_loss(cls, case: ReferenceCase):  # docs/method.md §7.11: the distance between the box's corners
        P, cfg = parts(), case.cfg
        _, lb, fb, d_adv, _ = case.certified()
        return P.L.cc_ibp_loss(lb, d_adv, cfg.alpha) + cfg.beta * P.D.feature_distance(fb.upper, fb.lower,
                                                                                        **case.distance).mean()
