"""CC-IBP-KD: CC-IBP plus β times logit distillation (temperature kd_temperature) at the PGD point."""
from __future__ import annotations

from certkd.methods.base import Batch, parts, register_method
from certkd.methods.cc_ibp import CCIBP


@register_method("cc-ibp-kd")
class CCIBPKD(CCIBP):
    category = "distillation"
    order = 6
    distils = True
    needs_teacher = True

    def distance(self, b: Batch, ctx: dict):
        return parts().D.logit_distillation_loss(ctx["adv_logits"], b.teacher.logits(ctx["x_adv"]),
                                                 self.cfg.kd_temperature, shard=b.shard)
