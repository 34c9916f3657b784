"""``load_dataset``: dataset names -> (train, test, info), with the constants of docs/method.md §9."""
from __future__ import annotations

import difflib
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import CertkdError
from .cifar import CIFAR_DIRNAME, load_cifar10
from .dataset import DatasetInfo, ImageDataset
from .idx import FASHION_CLASSES, MNIST_FILES, load_mnist_like
from .imagefolder import LAYOUT_HINT, load_image_folder
from .imagenet64 import IMAGENET64_CLASSES, LAYOUT_HINT as IMAGENET64_HINT, load_imagenet64

DATASETS: tuple[str, ...] = ("digits", "mnist", "fashion-mnist", "cifar10", "imagefolder", "tinyimagenet",
                              "imagenet64")

# Common spellings users type; mapped to the canonical names above.
_ALIASES: dict[str, str] = {
    "fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist",
    "cifar-10": "cifar10", "cifar_10": "cifar10",
    "tiny-imagenet": "tinyimagenet", "tiny_imagenet": "tinyimagenet",
    "image-folder": "imagefolder", "image_folder": "imagefolder",
    "imagenet-64": "imagenet64", "imagenet_64": "imagenet64", "imagenet64x64": "imagenet64",
}

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
TINYIMAGENET_MEAN = (0.4802, 0.4481, 0.3975)
TINYIMAGENET_STD = (0.2302, 0.2265, 0.2262)
IMAGENET64_MEAN = (0.4815, 0.4578, 0.4082)
IMAGENET64_STD = (0.2153, 0.2111, 0.2121)

DIGITS_TRAIN = 1437  # of 1797; the remaining 360 are the test set

# What each on-disk dataset expects, for the missing-directory error.
_EXPECTED: dict[str, str] = {
    "mnist": ", ".join(f + "[.gz]" for f in MNIST_FILES) + " (or torchvision's MNIST/raw/ layout)",
    "fashion-mnist": ", ".join(f + "[.gz]" for f in MNIST_FILES) + " (or torchvision's FashionMNIST/raw/ layout)",
    "cifar10": f"{CIFAR_DIRNAME}/data_batch_1..5 and test_batch",
    "imagefolder": LAYOUT_HINT.removeprefix("expected "),
    "tinyimagenet": LAYOUT_HINT.removeprefix("expected "),
    "imagenet64": IMAGENET64_HINT.removeprefix("expected "),
}


def _canonical(name: str) -> str:
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in DATASETS:
        close = difflib.get_close_matches(key, DATASETS + tuple(_ALIASES), n=1)
        hint = f"did you mean {_ALIASES.get(close[0], close[0])!r}? " if close else ""
        raise CertkdError(f"unknown dataset {name!r}; {hint}choose one of: {', '.join(DATASETS)}")
    return key


def _require_dir(name: str, data_dir: str | os.PathLike | None) -> Path:
    if data_dir is None:
        raise CertkdError(f"dataset {name!r} needs --data-dir: a directory holding {_EXPECTED[name]}")
    path = Path(data_dir).expanduser()
    if not path.is_dir():
        raise CertkdError(f"data directory {path} does not exist; dataset {name!r} expects it to hold "
                          f"{_EXPECTED[name]}, pass --data-dir pointing at it")
    return path


def _load_digits() -> tuple[ImageDataset, ImageDataset]:
    """sklearn's 8×8 digits as float32 (N, 1, 8, 8) in [0, 1]; fixed RandomState(0) split 1437/360."""
    from sklearn.datasets import load_digits  # bundled with scikit-learn, no download

    bunch = load_digits()
    images = (bunch.images.astype(np.float32) / 16.0)[:, None]    # pixel values are 0..16
    labels = bunch.target.astype(np.int64)
    perm = np.random.RandomState(0).permutation(len(labels))
    tr, te = perm[:DIGITS_TRAIN], perm[DIGITS_TRAIN:]
    train = ImageDataset(torch.from_numpy(images[tr]), torch.from_numpy(labels[tr]))
    test = ImageDataset(torch.from_numpy(images[te]), torch.from_numpy(labels[te]))
    return train, test


def load_dataset(name: str, data_dir: str | os.PathLike | None = None
                 ) -> tuple[ImageDataset, ImageDataset, DatasetInfo]:
    """Load a dataset fully into memory.

    Args:
        name: one of :data:`DATASETS` (case-insensitive; a few aliases such as "cifar-10" work).
        data_dir: directory with the files; ignored for "digits".
    Returns:
        (train, test, info). Images are (N, C, H, W) uint8, except digits (float32 in [0, 1]);
        labels (N,) int64. Unknown name or missing/broken files raise :class:`CertkdError`.
    """
    key = _canonical(name)
    if key == "digits":
        train, test = _load_digits()
        info = DatasetInfo("digits", 10, 1, 8, (0.0,), (1.0,), "none", 0, tuple(str(i) for i in range(10)))
        return train, test, info

    root = _require_dir(key, data_dir)
    if key in ("mnist", "fashion-mnist"):
        train, test = load_mnist_like(root, "MNIST" if key == "mnist" else "FashionMNIST")
        classes = tuple(str(i) for i in range(10)) if key == "mnist" else FASHION_CLASSES
        info = DatasetInfo(key, 10, 1, int(train.images.shape[-1]), (0.0,), (1.0,), "none", 0, classes)
    elif key == "cifar10":
        train, test, classes = load_cifar10(root)
        info = DatasetInfo("cifar10", 10, 3, 32, CIFAR10_MEAN, CIFAR10_STD, "crop-flip", 2, classes)
    elif key == "imagenet64":
        train, test = load_imagenet64(root)
        info = DatasetInfo("imagenet64", IMAGENET64_CLASSES, 3, 64, IMAGENET64_MEAN, IMAGENET64_STD, "crop-flip", 4,
                           tuple(str(i) for i in range(IMAGENET64_CLASSES)))
    else:  # imagefolder / tinyimagenet: same reader, TinyImageNet constants for both
        train, test, classes = load_image_folder(root)
        info = DatasetInfo(key, len(classes), 3, int(train.images.shape[-1]),
                           TINYIMAGENET_MEAN, TINYIMAGENET_STD, "crop-flip", 4, classes)
    _check_loaded(key, root, train, test)
    return train, test, info


def _check_loaded(name: str, root: Path, train: ImageDataset, test: ImageDataset) -> None:
    """Last line of defence behind the readers' own checks: every split non-empty, images square and
    non-empty, so bad data fails at load time and never after an epoch of training."""
    for split, ds in (("training", train), ("test", test)):
        _, _, h, w = ds.images.shape
        if len(ds) == 0:
            raise CertkdError(f"the {split} split of {name} in {root} holds 0 images; "
                              "the files are empty or corrupt, re-download them")
        if h == 0 or h != w:
            raise CertkdError(f"the {split} images of {name} in {root} are {h}x{w}; certkd needs square images "
                              "of at least 1x1, re-download or resize them")
    if train.images.shape[1:] != test.images.shape[1:]:
        raise CertkdError(f"the training images of {name} in {root} are {tuple(train.images.shape[1:])} but the "
                          f"test images {tuple(test.images.shape[1:])}; use the files of one dataset")
