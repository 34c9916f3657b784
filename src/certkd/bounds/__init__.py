"""Bound propagation: IBP (``ibp``), CROWN and α-CROWN (``crown``), the specification C (``spec``)."""
from certkd.bounds.crown import CrownResult, activation_layer_shapes, alpha_crown_bounds, crown_bounds
from certkd.bounds.ibp import (IntervalBounds, elided_lower_bounds, ibp_logit_difference_bounds,
                               interval_bounds, interval_rule)
from certkd.bounds.spec import drop_label_column, logit_differences, other_classes, specification_matrix

__all__ = ["CrownResult", "activation_layer_shapes", "alpha_crown_bounds", "crown_bounds", "IntervalBounds", "drop_label_column", "elided_lower_bounds", "ibp_logit_difference_bounds",
           "interval_bounds", "interval_rule", "logit_differences", "other_classes", "specification_matrix"]
