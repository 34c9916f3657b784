"""Statistics of a teacher's features over the training set (docs/method.md §7.4, §7.10).

Computed once when the teacher is loaded, on the clean, un-augmented training points (the
``train_limit`` subset when one is set), for the ``standardized`` distance (the per-feature std)
and the ``class-mean`` target (the mean feature of each class).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from certkd.data import iterate_batches

__all__ = ["FeatureStats", "feature_stats", "teacher_feature_stats", "DEAD_STD"]

#: A feature whose std is at most this fraction of the largest std is constant up to rounding: left out.
DEAD_STD = 1e-6


@dataclass
class FeatureStats:
    """Per-feature statistics of teacher features ``(N, m)`` with labels in ``[0, K)``.

    mean, std: shape ``(m,)``, over all N points (std: population, ``1/N``).
    scale: shape ``(m,)``, ``1/std``, and 0 for a feature left out (std <= DEAD_STD · max std).
    class_means: shape ``(K, m)``; a class without points gets the overall mean (no training batch
        holds that label, so it is never a target).
    class_counts: shape ``(K,)``, points per class.
    """

    mean: Tensor
    std: Tensor
    scale: Tensor
    class_means: Tensor
    class_counts: Tensor

    def to(self, device) -> "FeatureStats":
        return FeatureStats(*(getattr(self, f).to(device) for f in
                              ("mean", "std", "scale", "class_means", "class_counts")))


def feature_stats(features: Tensor, labels: Tensor, num_classes: int) -> FeatureStats:
    """:class:`FeatureStats` of ``features`` (N, m) with ``labels`` (N,), accumulated in float64.

    Returns float32 tensors (counts: int64) on the features' device.
    """
    f = features.detach().to(torch.float64)
    n = f.shape[0]
    mean = f.mean(0)
    std = ((f - mean) ** 2).mean(0).sqrt()  # two passes: a constant feature gets std 0 up to rounding
    keep = std > DEAD_STD * std.max() if n > 0 else torch.zeros_like(std, dtype=torch.bool)
    scale = torch.where(keep, 1.0 / torch.where(keep, std, torch.ones_like(std)), torch.zeros_like(std))
    counts = torch.bincount(labels.long(), minlength=num_classes)
    sums = torch.zeros(num_classes, f.shape[1], dtype=torch.float64, device=f.device).index_add_(0, labels.long(), f)
    class_means = torch.where((counts > 0)[:, None], sums / counts.clamp(min=1)[:, None].to(f.dtype), mean)
    return FeatureStats(mean.float(), std.float(), scale.float(), class_means.float(), counts)


def teacher_feature_stats(model: nn.Module, train_set, num_classes: int, device: torch.device,
                          batch_size: int = 512) -> FeatureStats:
    """The teacher's :class:`FeatureStats` over ``train_set`` (its clean points, in order, no augmentation).

    Args:
        model: the frozen teacher (eval mode); ``model.features(x)`` gives ``(B, m)``.
        train_set: the training :class:`certkd.data.ImageDataset`.
    """
    feats, labels = [], []
    with torch.no_grad():
        for x, y in iterate_batches(train_set, batch_size, shuffle=False, device=device):
            feats.append(model.features(x))
            labels.append(y)
    return feature_stats(torch.cat(feats), torch.cat(labels), num_classes)
