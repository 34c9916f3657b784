"""The endpoints of CC-Dist with α fixed: adv-dist (α = 0) and ibp-dist (α = 1)."""
from __future__ import annotations

from certkd.methods.base import register_method
from certkd.methods.cc_dist import CCDist


@register_method("adv-dist")
class AdvDist(CCDist):
    order = 4

    def alpha(self) -> float:
        return 0.0


@register_method("ibp-dist")
class IBPDist(CCDist):
    order = 5

    def alpha(self) -> float:
        return 1.0
