"""Allowed values of config keys and command-line options, without torch.

The registries that own these names import torch (datasets, models, distillation losses, the
verification pipeline), but ``certkd train --help`` and tab completion must not; they read the
names here, and ``tests/test_options.py`` checks that every registry holds exactly these. This
module imports nothing from certkd, so a registry may take its names from here.
"""
from __future__ import annotations

from typing import Any, Tuple

DATASETS: Tuple[str, ...] = ("digits", "mnist", "fashion-mnist", "cifar10", "imagefolder", "tinyimagenet",
                             "imagenet64")
MODELS: Tuple[str, ...] = ("cnn-small", "cnn7", "cnn7-imagenet", "cnn7-w16", "cnn7-w32", "mlp")  # built-in, sorted
ENGINES: Tuple[str, ...] = ("bab", "milp", "none")  # complete stage of ``certkd verify``
DIST_COMBINATIONS: Tuple[str, ...] = ("literal", "box", "distance")
# l2sq/l1/l2/cosine are formulas of certkd.losses.distillation; standardized is l2sq on features divided by the
# teacher's per-feature std (the method applies the scaling: certkd.methods._certified)
DIST_DISTANCES: Tuple[str, ...] = ("l2sq", "l1", "l2", "cosine", "standardized")
DIST_REDUCTIONS: Tuple[str, ...] = ("sum", "mean")
# what the distillation term pulls the student's features to: the teacher's features of the sample, 0 (no teacher),
# or the mean teacher feature of the sample's class over the training set (labels only)
DIST_TARGETS: Tuple[str, ...] = ("teacher", "zero", "class-mean")
FEATURE_ADAPTERS: Tuple[str, ...] = ("none", "linear")
OPTIMIZERS: Tuple[str, ...] = ("adam", "sgd")


def eps_error(eps: Any) -> str:
    """The one message for a radius outside (0, 1], in training, evaluation, verification and export."""
    return (f"eps must be in (0, 1] (pixel units), got {eps}; pass --eps in pixel units of [0, 1] images, "
            "e.g. --eps 0.1 (MNIST) or --eps 0.00784 (2/255)")
