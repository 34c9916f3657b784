"""Base of the empirical (teacher) methods: a clean forward, then the method's adversarial term."""
from __future__ import annotations

from certkd.methods.base import Batch, Method, parts


class EmpiricalMethod(Method):
    """Clean cross-entropy on warm-up batches; :meth:`robust` after warm-up."""

    category = "empirical"
    needs_attack = True

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
