"""Downsampled ImageNet 64×64 reader for the official ``.npz`` batches (Chrabaszcz et al., 2017).

Files: ``train_data_batch_1.npz`` … ``train_data_batch_10.npz`` (1,281,167 images in all) and
``val_data.npz`` (50,000; docs/method.md §9 uses it as the test split). Each holds

- ``data``: (N, 12288) uint8, one image per row, channel-major: the 64×64 red plane (row-major),
  then green, then blue; so ``data.reshape(N, 3, 64, 64)`` is already (N, C, H, W);
- ``labels``: (N,) ints 1..1000 (shifted to 0..999 here);
- optionally ``mean`` (the training-set mean image), not used: normalisation is the docs/method.md §9
  per-channel mean/std inside the model.

Accepted layouts (each file is looked for in these folders, first hit wins)::

    <data-dir>/train_data_batch_*.npz, val_data.npz               everything in one folder
    <data-dir>/Imagenet64_train_npz/  + Imagenet64_val_npz/       the unzipped downloads
    <data-dir>/Imagenet64_train_part1_npz/ + ..._part2_npz/       (train comes as two zips: batches 1-5, 6-10)
    <data-dir>/train/ + val/ (or test/)

Files are read with ``np.load(..., allow_pickle=False)``: an object array (a pickle) is refused,
never unpickled. The training set is 15.7 GB as uint8; it is filled batch by batch into one
preallocated tensor, so loading needs about one extra batch (~1.6 GB) beyond that.
"""
from __future__ import annotations

import math
import zipfile
from pathlib import Path

import numpy as np
import torch

from ..errors import CertkdError
from .dataset import ImageDataset

IMAGENET64_SIZE = 64
IMAGENET64_CLASSES = 1000
TRAIN_FILES: tuple[str, ...] = tuple(f"train_data_batch_{i}.npz" for i in range(1, 11))
VAL_FILE = "val_data.npz"
TRAIN_DIRS: tuple[str, ...] = ("", "Imagenet64_train_npz", "Imagenet64_train_part1_npz",
                               "Imagenet64_train_part2_npz", "Imagenet64_train", "train")
VAL_DIRS: tuple[str, ...] = ("", "Imagenet64_val_npz", "Imagenet64_val", "val", "test")
LAYOUT_HINT = (f"expected train_data_batch_1..10.npz and {VAL_FILE} (the downsampled-ImageNet 64x64 npz files) "
               "in <data-dir>, or in <data-dir>/Imagenet64_train_npz/ (or _part1_npz/ + _part2_npz/) "
               "and <data-dir>/Imagenet64_val_npz/")

_ROW = 3 * IMAGENET64_SIZE * IMAGENET64_SIZE  # 12288 bytes per image
_MAX_DEFLATE_RATIO = 1100  # deflate expands at most ~1032:1; a member claiming more is corrupt


def _find(root: Path, name: str, folders: tuple[str, ...]) -> Path | None:
    for folder in folders:
        path = root / folder / name
        if path.is_file():
            return path
    return None


def find_imagenet64_files(root: Path) -> tuple[list[Path], Path]:
    """(the ten training batch paths in order, the validation path); one-line error naming what is missing."""
    train = [_find(root, n, TRAIN_DIRS) for n in TRAIN_FILES]
    val = _find(root, VAL_FILE, VAL_DIRS)
    missing = [n for n, p in zip(TRAIN_FILES, train) if p is None] + ([VAL_FILE] if val is None else [])
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise CertkdError(f"ImageNet64 files not found in {root}: missing {shown}; {LAYOUT_HINT}; "
                          "pass --data-dir pointing at them")
    return train, val  # type: ignore[return-value]


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``data`` as (N, 3, 64, 64) uint8 and ``labels`` as (N,) int64 in 0..999."""
    bad = f"{path} is not a valid ImageNet64 npz batch"
    try:
        with np.load(path, allow_pickle=False) as npz:
            if "data" not in npz.files or "labels" not in npz.files:
                raise CertkdError(f"{bad} (it has {sorted(npz.files)}, expected 'data' and 'labels'); re-download it")
            data = npz["data"]
            labels = npz["labels"]
    except CertkdError:
        raise
    except Exception as exc:  # BadZipFile, EOFError, ValueError (object arrays, bad header), OSError, zlib.error
        detail = str(exc).splitlines()[0] if str(exc) else "no details"
        raise CertkdError(f"{bad}: cannot read it ({type(exc).__name__}: {detail}); it is truncated, corrupt "
                          "or not an official file (pickled object arrays are refused), re-download it") from exc
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _ROW:
        raise CertkdError(f"{bad} ('data' must be an (N, {_ROW}) uint8 array for 3x64x64 images, got "
                          f"{data.dtype} {data.shape}); check that it is the 64x64 version, re-download it")
    if data.shape[0] == 0:
        raise CertkdError(f"{path} holds 0 images; it is empty or not an official file, re-download it")
    labels = np.asarray(labels).reshape(-1)
    if labels.shape[0] != data.shape[0] or not np.issubdtype(labels.dtype, np.integer):
        raise CertkdError(f"{bad} ({data.shape[0]} images but 'labels' is {labels.dtype} {labels.shape}); "
                          "re-download it")
    if labels.size and (labels.min() < 1 or labels.max() > IMAGENET64_CLASSES):
        raise CertkdError(f"{bad} (labels must be 1..{IMAGENET64_CLASSES}, found {labels.min()}..{labels.max()}; "
                          "the official files are 1-based); re-download it")
    return data.reshape(-1, 3, IMAGENET64_SIZE, IMAGENET64_SIZE), labels.astype(np.int64) - 1


def _member_header(path: Path, zf: zipfile.ZipFile, name: str) -> tuple[tuple[int, ...], np.dtype] | None:
    """Shape and dtype from the .npy header of member ``name``; refuses a header declaring more (or fewer)
    bytes than the member holds, or a member larger than its compressed size could hold. None for object
    arrays (pickles, refused later by ``allow_pickle=False``)."""
    info = zf.getinfo(name)
    with zf.open(info) as f:
        version = np.lib.format.read_magic(f)
        shape, _, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                           else np.lib.format.read_array_header_2_0(f))
        offset = f.tell()
    if dtype.hasobject:
        return None
    declared = offset + math.prod(shape) * dtype.itemsize
    if declared != info.file_size or (info.compress_type != zipfile.ZIP_STORED
                                      and info.file_size > _MAX_DEFLATE_RATIO * info.compress_size):
        raise CertkdError(f"{path} is not a valid ImageNet64 npz batch ('{name[:-4]}' declares {dtype} {shape}, "
                          f"{declared} bytes, but the member holds {info.file_size} bytes stored in "
                          f"{info.compress_size}); it is truncated or corrupt, re-download it")
    return shape, dtype


def _npz_rows(path: Path) -> int:
    """Number of images in ``path`` from the .npy header of its ``data`` member, without decompressing the array.

    Headers that lie about their size are refused here (:func:`_member_header`), before numpy or
    :func:`_load_files` preallocates what they declare. -1 when a header cannot be read or ``data`` is not
    (N, 12288) uint8: :func:`_read_npz` then explains what is wrong.
    """
    try:
        with zipfile.ZipFile(path) as zf:
            data = _member_header(path, zf, "data.npy")
            _member_header(path, zf, "labels.npy")
    except CertkdError:
        raise
    except Exception:
        return -1  # unknown: _read_npz will explain what is wrong
    if data is None or data[1] != np.uint8 or len(data[0]) != 2 or data[0][1] != _ROW:
        return -1
    return int(data[0][0])


def _load_files(paths: list[Path]) -> ImageDataset:
    """Concatenate batches into one preallocated uint8 tensor (no second full-size copy)."""
    rows = [_npz_rows(p) for p in paths]
    if any(r < 0 for r in rows):
        parts = [_read_npz(p) for p in paths]   # the slow path; raises on the broken file
        return ImageDataset(torch.from_numpy(np.concatenate([x for x, _ in parts])),
                            torch.from_numpy(np.concatenate([y for _, y in parts])))
    images = torch.empty((sum(rows), 3, IMAGENET64_SIZE, IMAGENET64_SIZE), dtype=torch.uint8)
    labels = torch.empty(sum(rows), dtype=torch.int64)
    start = 0
    for path, n in zip(paths, rows):
        x, y = _read_npz(path)
        if x.shape[0] != n:
            raise CertkdError(f"{path} is not a valid ImageNet64 npz batch (header says {n} images, read "
                              f"{x.shape[0]}); re-download it")
        images[start:start + n] = torch.from_numpy(x)
        labels[start:start + n] = torch.from_numpy(y)
        start += n
    return ImageDataset(images, labels)


def load_imagenet64(root: Path) -> tuple[ImageDataset, ImageDataset]:
    """(train, test = the val set) as uint8 (N, 3, 64, 64) images and int64 labels in 0..999."""
    train_paths, val_path = find_imagenet64_files(root)
    return _load_files(train_paths), _load_files([val_path])
