"""PGD adversarial training (Madry et al.): cross-entropy at the PGD point."""
from __future__ import annotations

from certkd.methods._empirical import EmpiricalMethod
from certkd.methods.base import Batch, ReferenceCase, parts, register_method


@register_method("pgd-at")
class PGDAT(EmpiricalMethod):
    order = 1
    summary = "CE at the PGD point of the ε box, Madry et al. (docs/method.md §5.7)"

    def robust(self, b: Batch, logits, ce_clean, lo, hi):
        P = parts()
        x_adv = b.attack(b.model, b.x, b.y, lo, hi, shard=b.shard)
        adv_logits = b.model(x_adv)
        loss = P.ce(adv_logits, b.y, shard=b.shard)
        b.logs.update(ce_adv=loss.detach(), acc_adv=P.accuracy(adv_logits, b.y))
        return loss

    @classmethod
    def reference_loss(cls, case: ReferenceCase):
        m = case.fresh()
        x_adv = case.attacked(m)[3]
        return parts().F.cross_entropy(m(x_adv), case.y)
