"""STAPS (Mao et al., NeurIPS 2023; docs/method.md §5.9): TAPS on SABR's small box.

The training attack finds x_adv in the attack box, SABR's box of radius λ·ε (λ = cfg.alpha,
:func:`certkd.losses.certified.sabr_box`, as method ``sabr``) is placed around it, and the TAPS-IBP
loss of method ``taps`` is taken on that box, with the adversarial batch's BN statistics (as ``sabr``).
"""
from __future__ import annotations

from certkd.methods.base import Batch, ReferenceCase, parts, register_method
from certkd.methods.taps import TAPS


@register_method("staps")
class STAPS(TAPS):
    order = 7
    summary = "TAPS on SABR's small box around the PGD point, Mao et al. 2023 (docs/method.md §5.9)"
    needs_attack = True

    def taps_box(self, b: Batch):
        P, model, x, y = parts(), b.model, b.x, b.y
        with P.torch.no_grad():  # clean forward: BN running statistics and the logged accuracy, as sabr
            b.logs["acc_clean"] = P.accuracy(model(x), y)
        lo_att, hi_att = P.linf_box(x, b.eps_att)
        x_adv = b.attack(model, x, y, lo_att, hi_att, shard=b.shard)
        lo, hi = P.L.sabr_box(x_adv, lo_att, hi_att, self.cfg.alpha, b.eps_att)
        return lo, hi, x_adv

    @classmethod
    def reference_loss(cls, case: ReferenceCase):
        m = case.fresh()
        _, lo, hi, x_adv = case.attacked(m)
        slo, shi = parts().L.sabr_box(x_adv, lo, hi, case.cfg.alpha, case.eps)
        return cls.loss_on_box(m, case.cfg, slo, shi, x_adv, case.y)[0]
