"""In-memory image datasets and their metadata.

Every certkd dataset lives in memory as uint8 (TinyImageNet's 100k 64×64 RGB
training images take 1.2 GB, ImageNet64's 1.28M take 15.7 GB), so a dataset is just two
tensors; batching, shuffling and augmentation live in :mod:`certkd.data.batches`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset that models and the trainer need (docs/method.md §9).

    ``mean``/``std`` are per-channel values for the model's ``Normalize`` layer;
    inputs themselves always stay in pixel units [0, 1].
    """

    name: str                 # "digits", "mnist", "fashion-mnist", "cifar10", "imagefolder", "tinyimagenet", "imagenet64"
    num_classes: int
    in_channels: int
    input_size: int           # H == W
    mean: tuple[float, ...]   # per channel, docs/method.md §9
    std: tuple[float, ...]
    augmentation: str         # "none" | "crop-flip"
    crop_padding: int         # 0, 2 (CIFAR) or 4 (TinyImageNet/ImageNet64)
    class_names: tuple[str, ...] = ()


class ImageDataset:
    """In-memory images with integer labels.

    Attributes:
        images: (N, C, H, W), either uint8 in 0..255 or float32 already in [0, 1].
            uint8 storage is 4× smaller; it is converted to float only per batch.
        labels: (N,) int64 class indices.
    """

    images: torch.Tensor
    labels: torch.Tensor

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        if images.dim() != 4:
            raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
        if images.dtype not in (torch.uint8, torch.float32):
            raise ValueError(f"images must be uint8 or float32, got {images.dtype}")
        if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(
                f"labels must be (N,) with N={images.shape[0]}, got shape {tuple(labels.shape)}")
        self.images = images
        self.labels = labels.to(torch.int64)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __repr__(self) -> str:
        n, c, h, w = self.images.shape
        return f"ImageDataset(n={n}, shape=({c}, {h}, {w}), dtype={self.images.dtype})"

    @property
    def num_channels(self) -> int:
        return int(self.images.shape[1])

    def get(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather a batch by index.

        Args:
            index: (B,) int64 indices (anything torch indexing accepts also works).
        Returns:
            x: (B, C, H, W) float32 in [0, 1]; y: (B,) int64.
        """
        return to_unit_float(self.images[index]), self.labels[index]

    def subset(self, n: int) -> "ImageDataset":
        """The first ``n`` points (no copy); ``n`` larger than the dataset keeps all of it."""
        return self.take(0, n)

    def sample(self, n: int, seed: int = 0) -> "ImageDataset":
        """``n`` points drawn without replacement by a fixed-seed permutation, kept in stored order.

        Deterministic: the same ``(n, seed)`` always gives the same points, and a smaller ``n``
        gives a subset of a larger one's points. ``n >= len(self)`` returns ``self`` unchanged.
        Used for ``train_limit`` (a quick run on part of the training set). Copies the chosen points.
        """
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if n >= len(self):
            return self
        perm = torch.randperm(len(self), generator=torch.Generator().manual_seed(int(seed)))
        index = perm[:n].sort().values
        return ImageDataset(self.images[index], self.labels[index])

    def take(self, start: int, stop: int | None = None) -> "ImageDataset":
        """Points ``start:stop`` in stored order (no copy), e.g. the unshuffled
        80/20 train/validation split of docs/method.md §9 is ``take(0, k)`` / ``take(k)``."""
        return ImageDataset(self.images[start:stop], self.labels[start:stop])

    def split_validation(self, fraction: float) -> "tuple[ImageDataset, ImageDataset]":
        """``(train, val)``: the first and the last points in stored order, the last ``fraction`` of them
        (rounded, at least 1) validating: docs/method.md §9's split (``fraction`` 0.2: 80/20). No copy.

        Raises:
            ValueError: ``fraction`` outside (0, 1), or a split that leaves either side empty.
        """
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"fraction must be in (0, 1), got {fraction}")
        n_val = max(1, round(len(self) * fraction))
        if n_val >= len(self):
            raise ValueError(f"a validation fraction of {fraction} leaves no training point of {len(self)}")
        return self.take(0, len(self) - n_val), self.take(len(self) - n_val)


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 -> float32 /255; float input is returned as float32 unchanged. Any shape."""
    if images.dtype == torch.uint8:
        return images.to(torch.float32).div_(255.0)
    return images.to(torch.float32)
