"""Base of the empirical (teacher) methods: a clean forward, then the method's adversarial term."""
from __future__ import annotations

from types import MappingProxyType

from certkd.methods.base import Batch, Method, parts


class EmpiricalMethod(Method):
    """Clean cross-entropy on warm-up batches; :meth:`robust` after warm-up."""

    category = "empirical"
    needs_attack = True
    # Madry PGD in the target ε box (docs/method.md §5.7): 10 steps of 0.25 × its half-width, total travel 2.5·ε
    attack = MappingProxyType({"attack_steps": 10, "attack_step_size": 0.25, "attack_eps_factor": 1.0})

    def loss(self, b: Batch):
        P = parts()
        logits = b.model(b.x)
        ce_clean = P.ce(logits, b.y, shard=b.shard)
        b.logs.update(ce_clean=ce_clean.detach(), acc_clean=P.accuracy(logits, b.y))
        if b.warmup:
            return ce_clean
        lo, hi = P.linf_box(b.x, b.eps_att)
        return self.robust(b, logits, ce_clean, lo, hi)

    def robust(self, b: Batch, logits, ce_clean, lo, hi):
        raise NotImplementedError
