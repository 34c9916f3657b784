"""STAPS-Dist: STAPS plus β times the worst-case feature distance over the IBP box of the student's
features on SABR's small box (docs/method.md §5.9, §7): taps-dist's distance on staps's box."""
from __future__ import annotations

from certkd.methods.base import register_method
from certkd.methods.staps import STAPS
from certkd.methods.taps_dist import TAPSDist


@register_method("staps-dist")
class STAPSDist(TAPSDist, STAPS):
    order = 9
