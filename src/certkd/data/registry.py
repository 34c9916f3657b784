"""The dataset registry: ``load_dataset(name)`` -> (train, test, info), with the constants of docs/method.md §9.

One entry per dataset: a loader function registered with :func:`register_dataset` (its name, the
spellings users type, and what ``--data-dir`` must hold). Adding a dataset is one such function
plus its name in :data:`certkd.choices.DATASETS`, which ``certkd train --help`` reads without torch.
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import numpy as np
import torch

from ..errors import CertkdError
from .cifar import CIFAR_DIRNAME, load_cifar10
from .dataset import DatasetInfo, ImageDataset
from .idx import FASHION_CLASSES, MNIST_FILES, load_mnist_like
from .imagefolder import LAYOUT_HINT, load_image_folder
from .imagenet64 import IMAGENET64_CLASSES, LAYOUT_HINT as IMAGENET64_HINT, load_imagenet64

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
TINYIMAGENET_MEAN = (0.4802, 0.4481, 0.3975)
TINYIMAGENET_STD = (0.2302, 0.2265, 0.2262)
IMAGENET64_MEAN = (0.4815, 0.4578, 0.4082)
IMAGENET64_STD = (0.2153, 0.2111, 0.2121)

DIGITS_TRAIN = 1437  # of 1797; the remaining 360 are the test set

Loaded = Tuple[ImageDataset, ImageDataset, DatasetInfo]
Loader = Callable[[Optional[Path]], Loaded]


class _Entry(NamedTuple):
    load: Loader
    expects: Optional[str]  # what --data-dir must hold, for the missing-directory error; None: bundled, no files


_REGISTRY: Dict[str, _Entry] = {}  # canonical name -> entry, in registration order (the order errors list)
_ALIASES: Dict[str, str] = {}      # common spellings users type -> canonical name


def register_dataset(name: str, *, expects: Optional[str], aliases: Tuple[str, ...] = ()
                     ) -> Callable[[Loader], Loader]:
    """Decorator: register ``load(root) -> (train, test, info)`` under ``name`` (and ``aliases``).

    ``expects`` describes the files ``--data-dir`` must hold; None for a dataset bundled with a
    dependency (``load`` then gets ``None`` and its result is not re-checked). A new dataset also
    needs its name in :data:`certkd.choices.DATASETS` (``tests/test_options.py`` checks both agree).
    """
    def wrap(load: Loader) -> Loader:
        if name in _REGISTRY or name in _ALIASES:
            raise ValueError(f"dataset {name!r} is registered twice")
        _REGISTRY[name] = _Entry(load, expects)
        _ALIASES.update({alias: name for alias in aliases})
        return load

    return wrap


def _canonical(name: str) -> str:
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in _REGISTRY:
        names = tuple(_REGISTRY)
        close = difflib.get_close_matches(key, names + tuple(_ALIASES), n=1)
        hint = f"did you mean {_ALIASES.get(close[0], close[0])!r}? " if close else ""
        raise CertkdError(f"unknown dataset {name!r}; {hint}choose one of: {', '.join(names)}")
    return key


def _require_dir(name: str, data_dir: str | os.PathLike | None) -> Path:
    expects = _REGISTRY[name].expects
    if data_dir is None:
        raise CertkdError(f"dataset {name!r} needs --data-dir: a directory holding {expects}")
    path = Path(data_dir).expanduser()
    if not path.is_dir():
        raise CertkdError(f"data directory {path} does not exist; dataset {name!r} expects it to hold "
                          f"{expects}, pass --data-dir pointing at it")
    return path


def load_dataset(name: str, data_dir: str | os.PathLike | None = None) -> Loaded:
    """Load a dataset fully into memory.

    Args:
        name: one of :data:`DATASETS` (case-insensitive; a few aliases such as "cifar-10" work).
        data_dir: directory with the files; ignored for "digits".
    Returns:
        (train, test, info). Images are (N, C, H, W) uint8, except digits (float32 in [0, 1]);
        labels (N,) int64. Unknown name or missing/broken files raise :class:`CertkdError`.
    """
    key = _canonical(name)
    entry = _REGISTRY[key]
    if entry.expects is None:
        return entry.load(None)
    root = _require_dir(key, data_dir)
    train, test, info = entry.load(root)
    _check_loaded(key, root, train, test)
    return train, test, info


# ---------------------------------------------------------------------------------------------
# The datasets (docs/method.md §9), in the order of certkd.choices.DATASETS
# ---------------------------------------------------------------------------------------------

_DIGIT_CLASSES = tuple(str(i) for i in range(10))
_MNIST_EXPECTS = ", ".join(f + "[.gz]" for f in MNIST_FILES)
_FOLDER_EXPECTS = LAYOUT_HINT.removeprefix("expected ")


@register_dataset("digits", expects=None)
def _load_digits(root: Optional[Path]) -> Loaded:
    """sklearn's 8×8 digits as float32 (N, 1, 8, 8) in [0, 1]; fixed RandomState(0) split 1437/360."""
    from sklearn.datasets import load_digits  # bundled with scikit-learn, no download

    bunch = load_digits()
    images = (bunch.images.astype(np.float32) / 16.0)[:, None]    # pixel values are 0..16
    labels = bunch.target.astype(np.int64)
    perm = np.random.RandomState(0).permutation(len(labels))
    tr, te = perm[:DIGITS_TRAIN], perm[DIGITS_TRAIN:]
    train = ImageDataset(torch.from_numpy(images[tr]), torch.from_numpy(labels[tr]))
    test = ImageDataset(torch.from_numpy(images[te]), torch.from_numpy(labels[te]))
    info = DatasetInfo("digits", 10, 1, 8, (0.0,), (1.0,), "none", 0, _DIGIT_CLASSES)
    return train, test, info


@register_dataset("mnist", expects=_MNIST_EXPECTS + " (or torchvision's MNIST/raw/ layout)")
def _load_mnist(root: Optional[Path]) -> Loaded:
    train, test = load_mnist_like(root, "MNIST")
    return train, test, DatasetInfo("mnist", 10, 1, int(train.images.shape[-1]), (0.0,), (1.0,), "none", 0,
                                    _DIGIT_CLASSES)


@register_dataset("fashion-mnist", expects=_MNIST_EXPECTS + " (or torchvision's FashionMNIST/raw/ layout)",
                  aliases=("fashion_mnist", "fashionmnist"))
def _load_fashion_mnist(root: Optional[Path]) -> Loaded:
    train, test = load_mnist_like(root, "FashionMNIST")
    return train, test, DatasetInfo("fashion-mnist", 10, 1, int(train.images.shape[-1]), (0.0,), (1.0,), "none", 0,
                                    FASHION_CLASSES)


@register_dataset("cifar10", expects=f"{CIFAR_DIRNAME}/data_batch_1..5 and test_batch",
                  aliases=("cifar-10", "cifar_10"))
def _load_cifar10(root: Optional[Path]) -> Loaded:
    train, test, classes = load_cifar10(root)
    return train, test, DatasetInfo("cifar10", 10, 3, 32, CIFAR10_MEAN, CIFAR10_STD, "crop-flip", 2, classes)


def _class_folders(root: Optional[Path], name: str) -> Loaded:
    """imagefolder and tinyimagenet: the same reader, TinyImageNet constants for both."""
    train, test, classes = load_image_folder(root)
    return train, test, DatasetInfo(name, len(classes), 3, int(train.images.shape[-1]),
                                    TINYIMAGENET_MEAN, TINYIMAGENET_STD, "crop-flip", 4, classes)


@register_dataset("imagefolder", expects=_FOLDER_EXPECTS, aliases=("image-folder", "image_folder"))
def _load_imagefolder(root: Optional[Path]) -> Loaded:
    return _class_folders(root, "imagefolder")


@register_dataset("tinyimagenet", expects=_FOLDER_EXPECTS, aliases=("tiny-imagenet", "tiny_imagenet"))
def _load_tinyimagenet(root: Optional[Path]) -> Loaded:
    return _class_folders(root, "tinyimagenet")


@register_dataset("imagenet64", expects=IMAGENET64_HINT.removeprefix("expected "),
                  aliases=("imagenet-64", "imagenet_64", "imagenet64x64"))
def _load_imagenet64(root: Optional[Path]) -> Loaded:
    train, test = load_imagenet64(root)
    return train, test, DatasetInfo("imagenet64", IMAGENET64_CLASSES, 3, 64, IMAGENET64_MEAN, IMAGENET64_STD,
                                    "crop-flip", 4, tuple(str(i) for i in range(IMAGENET64_CLASSES)))


DATASETS: Tuple[str, ...] = tuple(_REGISTRY)  # the registered names, in order


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
