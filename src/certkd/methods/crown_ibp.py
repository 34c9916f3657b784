"""CROWN-IBP (Zhang et al., ICLR 2020; docs/method.md §5.8): the IBP loss of a convex combination
β·(CROWN-IBP bound) + (1 − β)·(IBP bound), with β going linearly from ``crown_ibp_beta_start`` at
ε = 0 to ``crown_ibp_beta_end`` once the ε ramp reaches its target (the paper's "1 → 0" schedule by
default: pure IBP after the ramp, and no CROWN pass then). Like ``ibp``: no attack, no L1 term and
no mixed-in natural loss (the paper's κ is 0 here).
"""
from __future__ import annotations

from certkd.methods.base import Batch, ReferenceCase, parts, register_method
from certkd.methods.ibp import IBP


@register_method("crown-ibp")
class CrownIBP(IBP):
    order = 5
    summary = ("the IBP loss of β·CROWN-IBP + (1 − β)·IBP bounds, β from 1 to 0 over the ε ramp, Zhang et al. 2020 "
               "(docs/method.md §5.8)")

    def crown_weight(self, b: Batch) -> float:
        """β of this batch: from crown_ibp_beta_start (ε_s = 0) to crown_ibp_beta_end (ε_s = ε), linear in ε_s."""
        cfg = self.cfg
        frac = min(max(b.eps_sched / cfg.eps, 0.0), 1.0)
        return cfg.crown_ibp_beta_start + (cfg.crown_ibp_beta_end - cfg.crown_ibp_beta_start) * frac

    def bounds(self, b: Batch, lower, upper):
        beta = self.crown_weight(b)
        b.logs["crown_weight"] = beta
        if beta == 0.0:  # after the ramp (default schedule): IBP alone, no backward pass
            return super().bounds(b, lower, upper)
        from certkd.bounds.crown_ibp import crown_ibp_bounds

        lb_crown, lb_ibp, fb = crown_ibp_bounds(b.model, lower, upper, b.y, point=b.x)
        b.logs["acc_crown_ibp"] = (lb_crown.min(1).values > 0).float().mean().detach()
        if beta == 1.0:
            return lb_crown, fb
        return beta * lb_crown + (1.0 - beta) * lb_ibp, fb

    @classmethod
    def reference_loss(cls, case: ReferenceCase):
        # the reference step is at ε_s = ε, where β = 0: the IBP loss (β > 0 by hand: tests/bounds/test_crown_ibp.py)
        lo, hi = case.box()
        return parts().L.ibp_loss(case.bounds(case.fresh(), lo, hi, case.x)[0])
