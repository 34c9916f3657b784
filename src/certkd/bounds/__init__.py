"""Bound propagation: IBP here; CROWN-family bounds live beside it."""
from certkd.bounds.ibp import (IntervalBounds, elided_lower_bounds, ibp_logit_difference_bounds,
                               interval_bounds, interval_rule)
from certkd.bounds.spec import drop_label_column, logit_differences, other_classes, specification_matrix

__all__ = ["IntervalBounds", "drop_label_column", "elided_lower_bounds", "ibp_logit_difference_bounds",
           "interval_bounds", "interval_rule", "logit_differences", "other_classes", "specification_matrix"]
