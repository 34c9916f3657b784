"""CIFAR-10 reader for the official ``cifar-10-batches-py`` files.

That format is a Python pickle by design (each batch is a dict with ``b"data"``,
an (N, 3072) uint8 numpy array in channel-major order: 1024 red, 1024 green,
1024 blue values, each 32×32 row-major; and ``b"labels"``, a list of ints).
Unpickling can run arbitrary code, so the batches are read with
:class:`RestrictedUnpickler`: it rebuilds only plain dicts, lists, bytes, str
and numbers, plus the handful of numpy constructors an ndarray pickle refers
to (which only allocate arrays and dtypes). Any other global, e.g. ``os.system``
in a malicious file, is refused before it can be called, and the result is
then type-checked.
"""
from __future__ import annotations

import codecs
import pickle
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..errors import CertkdError
from .dataset import ImageDataset

CIFAR_DIRNAME = "cifar-10-batches-py"
TRAIN_BATCHES: tuple[str, ...] = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)


def _numpy_reconstruct() -> Callable[..., Any]:
    try:  # numpy >= 2
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    return _reconstruct


def _numpy_frombuffer() -> Callable[..., Any]:
    try:
        from numpy._core.numeric import _frombuffer
    except ImportError:
        from numpy.core.numeric import _frombuffer  # type: ignore[no-redef]
    return _frombuffer


# (module, name) -> object. Both numpy 1.x ("numpy.core") and 2.x ("numpy._core")
# spellings appear in pickles; the official files were written by Python 2 / numpy 1.
_ALLOWED_GLOBALS: dict[tuple[str, str], Callable[[], Any]] = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _numpy_frombuffer,      # protocol-5 ndarray pickles
    ("numpy._core.numeric", "_frombuffer"): _numpy_frombuffer,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("_codecs", "encode"): lambda: codecs.encode,                  # bytes in Python-3 protocol-2 pickles
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the numpy-array globals above; everything else raises."""

    def find_class(self, module: str, name: str) -> Any:
        factory = _ALLOWED_GLOBALS.get((module, name))
        if factory is None:
            raise pickle.UnpicklingError(f"global '{module}.{name}' is forbidden")
        return factory()


def load_cifar_pickle(path: Path) -> Any:
    """Unpickle one CIFAR batch file safely (``encoding="bytes"`` as the official loader does)."""
    try:
        with open(path, "rb") as f:
            return RestrictedUnpickler(f, encoding="bytes").load()
    except Exception as exc:  # any failure while parsing means a bad file, not a certkd bug
        # MemoryError (a pickle declaring a huge object) has no message; keep the error on one line.
        detail = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CertkdError(
            f"{path} is not a valid CIFAR-10 python batch ({detail}); it is corrupt or not the official "
            f"{CIFAR_DIRNAME} file, re-download it") from exc


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch as (N, 3, 32, 32) uint8 images and (N,) int64 labels."""
    obj = load_cifar_pickle(path)
    bad = f"{path} does not hold a CIFAR-10 batch"
    if not isinstance(obj, dict) or b"data" not in obj or b"labels" not in obj:
        raise CertkdError(f"{bad} (expected a dict with b'data' and b'labels'); re-download it")
    data = obj[b"data"]
    if isinstance(data, (bytes, bytearray)):
        if len(data) % 3072:
            raise CertkdError(f"{bad} (b'data' holds {len(data)} bytes, not a whole number of 3072-byte "
                              "32x32 RGB images); re-download it")
        data = np.frombuffer(data, dtype=np.uint8).reshape(-1, 3072)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise CertkdError(f"{bad} (b'data' must be an (N, 3072) uint8 array); re-download it")
    if data.shape[0] == 0:
        raise CertkdError(f"{path} holds 0 images; it is empty or not the official {CIFAR_DIRNAME} file, "
                          "re-download it")
    labels = obj[b"labels"]
    if not isinstance(labels, (list, np.ndarray)) or (isinstance(labels, np.ndarray) and labels.ndim != 1) or not all(
            isinstance(v, (int, np.integer)) for v in labels):
        raise CertkdError(f"{bad} (b'labels' must be a list of ints); re-download it")
    if len(labels) != data.shape[0]:
        raise CertkdError(f"{bad} ({data.shape[0]} images but {len(labels)} labels); re-download it")
    # Compared as Python ints first: a label like 2**70 would overflow int64 in np.asarray.
    out_of_range = next((int(v) for v in labels if not 0 <= int(v) <= 9), None)
    if out_of_range is not None:
        raise CertkdError(f"{bad} (label {out_of_range} is outside 0..9); re-download it")
    labels_arr = np.asarray(labels, dtype=np.int64).reshape(-1)
    return data.reshape(-1, 3, 32, 32), labels_arr


def find_cifar_dir(data_dir: Path) -> Path:
    """``data_dir/cifar-10-batches-py`` or ``data_dir`` itself, whichever holds all six batches."""
    names = (*TRAIN_BATCHES, TEST_BATCH)
    for folder in (data_dir / CIFAR_DIRNAME, data_dir):
        if all((folder / n).is_file() for n in names):
            return folder
    raise CertkdError(
        f"CIFAR-10 files not found in {data_dir}: expected {CIFAR_DIRNAME}/ containing "
        f"{', '.join(names)} (the official python version, extracted); pass --data-dir pointing at it or its parent")


def _class_names(folder: Path) -> tuple[str, ...]:
    meta = folder / "batches.meta"
    if not meta.is_file():
        return CIFAR10_CLASSES
    obj = load_cifar_pickle(meta)
    names = obj.get(b"label_names") if isinstance(obj, dict) else None
    if not isinstance(names, list) or len(names) != 10 or not all(isinstance(s, (bytes, str)) for s in names):
        raise CertkdError(f"{meta} does not hold 10 b'label_names'; it is corrupt, re-download or delete it")
    return tuple(s.decode("utf-8", "replace") if isinstance(s, bytes) else s for s in names)


def load_cifar10(data_dir: Path) -> tuple[ImageDataset, ImageDataset, tuple[str, ...]]:
    """(train 50k, test 10k, class names); images uint8 (N, 3, 32, 32)."""
    folder = find_cifar_dir(data_dir)
    parts = [_read_batch(folder / n) for n in TRAIN_BATCHES]
    x_train = np.concatenate([p[0] for p in parts])
    y_train = np.concatenate([p[1] for p in parts])
    x_test, y_test = _read_batch(folder / TEST_BATCH)
    train = ImageDataset(torch.from_numpy(np.ascontiguousarray(x_train)), torch.from_numpy(y_train))
    test = ImageDataset(torch.from_numpy(np.array(x_test)), torch.from_numpy(y_test))
    return train, test, _class_names(folder)
