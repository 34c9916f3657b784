"""Training objectives as pure functions of tensors.

* :mod:`certkd.losses.certified`: IBP, CC-IBP, MTL-IBP, Exp-IBP, SABR, TRADES, L1 (docs/method.md §5).
* :mod:`certkd.losses.regularizers`: warm-up regularisers of Shi et al. (docs/method.md §5.6).
* :mod:`certkd.losses.distillation`: CC-Dist and its variants (docs/method.md §7).
"""
from certkd.losses.certified import (adversarial_loss, cc_ibp_loss, difference_loss, exp_ibp_loss, ibp_loss,
                                     l1_penalty, mtl_ibp_loss, sabr_box, trades_kl)
from certkd.losses.distillation import (cc_dist_distance, exp_dist_distance, feature_distance,
                                        logit_distillation_loss, mtl_dist_distance, project_to_box,
                                        worst_case_feature_distance, worst_case_point)
from certkd.losses.regularizers import warmup_regularizer

__all__ = ["adversarial_loss", "cc_dist_distance", "cc_ibp_loss", "difference_loss", "exp_dist_distance",
           "exp_ibp_loss", "feature_distance", "ibp_loss", "l1_penalty", "logit_distillation_loss",
           "mtl_dist_distance", "mtl_ibp_loss", "project_to_box", "sabr_box", "trades_kl",
           "warmup_regularizer", "worst_case_feature_distance", "worst_case_point"]
