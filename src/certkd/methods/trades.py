"""TRADES: clean cross-entropy plus β·KL(clean ‖ adversarial), the attack maximising the KL."""
from __future__ import annotations

from certkd.methods._empirical import EmpiricalMethod
from certkd.methods.base import Batch, ReferenceCase, parts, register_method


@register_method("trades")
class TRADES(EmpiricalMethod):
    order = 2
    summary = "CE(f(x), y) + β_T · KL(clean ‖ adversarial), Zhang et al. 2019 (docs/method.md §5.7)"

    def robust(self, b: Batch, logits, ce_clean, lo, hi):
        P = parts()
        target = logits.detach()
        kl_attack = P.PGD(b.attack.steps, b.attack.step_size, loss_fn=lambda z, t: P.L.trades_kl(z, t))
        x_adv = kl_attack(b.model, b.x, target, lo, hi, shard=b.shard)
        kl = b.shard.mean(P.L.trades_kl(b.model(x_adv), logits))
        b.logs.update(kl=kl.detach())
        return ce_clean + self.cfg.trades_beta * kl

    @classmethod
    def reference_loss(cls, case: ReferenceCase):
        P, m = parts(), case.fresh()
        P.torch.manual_seed(case.seed)
        logits = m(case.x)
        lo, hi = case.box()
        x_adv = P.PGD(case.cfg.attack_steps, case.cfg.attack_step_size, loss_fn=P.L.trades_kl)(
            m, case.x, logits.detach(), lo, hi)
        return P.F.cross_entropy(logits, case.y) + case.cfg.trades_beta * P.L.trades_kl(m(x_adv), logits).mean()
