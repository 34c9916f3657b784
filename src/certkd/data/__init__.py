"""Datasets (SPEC §5): in-memory readers and a seeded, shardable batch iterator.

>>> train, test, info = load_dataset("digits")
>>> for x, y in iterate_batches(train, 64, shuffle=True, seed=0):
...     pass  # x: (B, 1, 8, 8) float32 in [0, 1]; y: (B,) int64
"""
from .batches import AUGMENTATIONS, crop_flip, iterate_batches, num_batches
from .dataset import DatasetInfo, ImageDataset
from .registry import DATASETS, load_dataset

__all__ = [
    "AUGMENTATIONS",
    "DATASETS",
    "DatasetInfo",
    "ImageDataset",
    "crop_flip",
    "iterate_batches",
    "load_dataset",
    "num_batches",
]
