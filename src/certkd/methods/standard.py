"""Standard training: the clean cross-entropy."""
from __future__ import annotations

from certkd.methods.base import Batch, Method, ReferenceCase, parts, register_method


@register_method("standard")
class Standard(Method):
    category = "empirical"
    order = 0
    summary = "CE(f(x), y): clean training, no attack (docs/method.md §5.7)"

    def loss(self, b: Batch):
        P = parts()
        logits = b.model(b.x)
        loss = P.ce(logits, b.y, shard=b.shard)
        b.logs.update(ce_clean=loss.detach(), acc_clean=P.accuracy(logits, b.y))
        return loss

    @classmethod
    def reference_loss(cls, case: ReferenceCase):
        return parts().F.cross_entropy(case.fresh()(case.x), case.y)
