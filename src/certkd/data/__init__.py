"""Datasets (docs/method.md §9): in-memory readers and a seeded, shardable batch iterator.

>>> train, test, info = load_dataset("digits")
>>> for x, y in iterate_batches(train, 64, shuffle=True, seed=0):
...     pass  # x: (B, 1, 8, 8) float32 in [0, 1]; y: (B,) int64

Readers (``load_dataset`` names): digits (sklearn, bundled), mnist / fashion-mnist (IDX,
:mod:`.idx`), cifar10 (python pickles read by a restricted unpickler, :mod:`.cifar`),
imagefolder / tinyimagenet (PNG/JPEG class folders, :mod:`.imagefolder`) and imagenet64
(the downsampled 64×64 ``.npz`` batches, read with ``allow_pickle=False``, :mod:`.imagenet64`).
Broken or missing files raise a one-line :class:`~certkd.errors.CertkdError` naming the path.

Throughput: every dataset is decoded once and kept in memory as uint8 (float32 only per
batch), so there are no loader workers and no per-epoch decoding: a batch is one index
gather. With a CUDA device, :func:`iterate_batches` pins the gathered uint8 batch and copies
it with ``non_blocking=True``; crop/flip augmentation and the float conversion then run on
the GPU. On the CPU the behaviour is unchanged. ``TrainConfig.train_limit`` trains on a
fixed-seed subset (:meth:`ImageDataset.sample`) for quick runs.
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
