"""CC-IBP-KD: CC-IBP plus β times logit distillation (temperature kd_temperature) at the PGD point."""
from __future__ import annotations

from certkd.methods.base import Batch, ReferenceCase, parts, register_method
from certkd.methods.cc_ibp import CCIBP


@register_method("cc-ibp-kd")
class CCIBPKD(CCIBP):
    category = "distillation"
    order = 6
    summary = "CC-IBP + β · logit-space KD at the PGD point, a baseline (docs/method.md §7.5)"
    distils = True
    needs_teacher = True

    def distance(self, b: Batch, ctx: dict):
        return parts().D.logit_distillation_loss(ctx["adv_logits"], b.teacher.logits(ctx["x_adv"]),
                                                 self.cfg.kd_temperature, shard=b.shard)

    @classmethod
    def reference_loss(cls, case: ReferenceCase):
        P, cfg = parts(), case.cfg
        m, lb, fb, d_adv, x_adv = case.certified()
        kd = P.D.logit_distillation_loss(m.head(fb.point_output), case.teacher.logits(x_adv), cfg.kd_temperature)
        return P.L.cc_ibp_loss(lb, d_adv, cfg.alpha) + cfg.beta * kd
