"""MNIST / Fashion-MNIST reader for the IDX format (plain or gzip).

IDX layout: a 4-byte magic ``00 00 <type> <ndim>`` (type 0x08 = unsigned byte),
then ``ndim`` big-endian uint32 dimensions, then the raw payload. Images are
magic 0x00000803 (N, rows, cols); labels are 0x00000801 (N,).
"""
from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from ..errors import CertkdError
from .dataset import ImageDataset

IDX_IMAGES_MAGIC = 0x00000803
IDX_LABELS_MAGIC = 0x00000801

MNIST_FILES: tuple[str, ...] = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

FASHION_CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


# Deflate cannot expand data by more than ~1032:1, so a .gz file of S bytes never holds more than
# about 1032*S bytes; a header declaring more is refused before anything is decompressed or allocated.
_MAX_GZIP_RATIO = 1100
_CHUNK = 1 << 24


def _payload(f, path: Path, header: int, expected: int, dims: tuple[int, ...]) -> np.ndarray:
    """Read exactly ``expected`` payload bytes after the header, checking the size *before* reading.

    A plain file's payload size is known from its size on disk; a .gz file is decompressed in
    chunks and at most one byte past ``expected`` is read, so neither a lying header nor a
    gzip bomb can make this allocate more than the file can really hold.
    """
    size = path.stat().st_size
    need = f"header dims {dims} need {expected} payload bytes"
    if path.suffix != ".gz":
        got = size - header
        if got != expected:
            what = "truncated" if got < expected else "corrupt (trailing bytes)"
            raise CertkdError(f"{path} is {what}: {need}, found {got}; re-download it")
        out = np.fromfile(f, dtype=np.uint8, count=expected)
        if out.size != expected:  # the file shrank while we read it
            raise CertkdError(f"{path} is truncated: {need}, read {out.size}; re-download it")
        return out
    if expected > _MAX_GZIP_RATIO * size:
        raise CertkdError(f"{path} is corrupt: {need}, more than a {size}-byte .gz file can hold; re-download it")
    buf = bytearray()
    while len(buf) <= expected:
        chunk = f.read(min(_CHUNK, expected + 1 - len(buf)))
        if not chunk:
            break
        buf += chunk
    if len(buf) != expected:
        what = "truncated" if len(buf) < expected else "corrupt (trailing bytes)"
        found = len(buf) if len(buf) < expected else f"more than {expected}"
        raise CertkdError(f"{path} is {what}: {need}, found {found}; re-download it")
    return np.frombuffer(buf, dtype=np.uint8)   # a bytearray: the array is writable, no copy needed


def read_idx(path: str | Path, magic: int) -> np.ndarray:
    """Parse one IDX file of unsigned bytes.

    Args:
        path: the file (``.gz`` is decompressed).
        magic: the expected magic number, :data:`IDX_IMAGES_MAGIC` or :data:`IDX_LABELS_MAGIC`.
    Returns:
        uint8 array with the dims from the header, e.g. (N, 28, 28) or (N,).
    """
    path = Path(path)
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
            head = f.read(header)
            if len(head) < 4:
                raise CertkdError(f"{path} is truncated or corrupt (only {len(head)} bytes); re-download it")
            (found,) = struct.unpack(">I", head[:4])
            if found != magic:
                raise CertkdError(
                    f"{path} is not an IDX {'image' if magic == IDX_IMAGES_MAGIC else 'label'} file "
                    f"(magic 0x{found:08x}, expected 0x{magic:08x}); check the file name or re-download it")
            if len(head) < header:
                raise CertkdError(f"{path} is truncated or corrupt (header cut short); re-download it")
            dims = struct.unpack(f">{ndim}I", head[4:header])
            data = _payload(f, path, header, math.prod(dims), dims)
    except PermissionError as exc:
        raise CertkdError(f"cannot read {path} (permission denied); check the file's permissions") from exc
    except (EOFError, OSError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise CertkdError(f"{path} is truncated or corrupt ({exc}); re-download it") from exc
    return data.reshape(dims)


def _find_file(folder: Path, name: str) -> Path | None:
    """``folder/name`` or ``folder/name.gz``; the plain file wins (it loads faster)."""
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def find_mnist_dir(data_dir: Path, torchvision_name: str) -> dict[str, Path]:
    """Locate the four IDX files in ``data_dir``, ``data_dir/<torchvision_name>/raw`` or ``data_dir/raw``.

    Returns a map from base file name (e.g. ``train-images-idx3-ubyte``) to the path found.
    """
    folders = (data_dir, data_dir / torchvision_name / "raw", data_dir / "raw")
    for folder in folders:
        found = {name: _find_file(folder, name) for name in MNIST_FILES}
        if all(p is not None for p in found.values()):
            return found  # type: ignore[return-value]
    raise CertkdError(
        f"MNIST-format files not found in {data_dir}: expected {', '.join(n + '[.gz]' for n in MNIST_FILES)} "
        f"in it, in {torchvision_name}/raw/ (torchvision's layout) or in raw/; pass --data-dir pointing at them")


def _load_split(images_path: Path, labels_path: Path) -> ImageDataset:
    images = read_idx(images_path, IDX_IMAGES_MAGIC)
    n, rows, cols = images.shape
    if rows == 0 or cols == 0 or rows != cols:
        raise CertkdError(f"{images_path} holds {rows}x{cols} images; certkd needs square images of at least 1x1 "
                          "(MNIST is 28x28), the file is corrupt or of another dataset, re-download it")
    if n == 0:
        raise CertkdError(f"{images_path} holds 0 images; the file is empty or corrupt, re-download it")
    labels = read_idx(labels_path, IDX_LABELS_MAGIC)
    if images.shape[0] != labels.shape[0]:
        raise CertkdError(
            f"{images_path} has {images.shape[0]} images but {labels_path} has {labels.shape[0]} labels; "
            "the files do not belong together, re-download them")
    if labels.size and int(labels.max()) > 9:
        raise CertkdError(f"{labels_path} has label {int(labels.max())} outside 0..9; the file is corrupt, re-download it")
    x = torch.from_numpy(images).unsqueeze(1)          # (N, 1, rows, cols); read_idx's arrays are writable
    y = torch.from_numpy(labels.astype(np.int64))
    return ImageDataset(x, y)


def load_mnist_like(data_dir: Path, torchvision_name: str) -> tuple[ImageDataset, ImageDataset]:
    """(train, test) uint8 (N, 1, 28, 28) from the IDX files of MNIST or Fashion-MNIST."""
    files = find_mnist_dir(data_dir, torchvision_name)
    train = _load_split(files["train-images-idx3-ubyte"], files["train-labels-idx1-ubyte"])
    test = _load_split(files["t10k-images-idx3-ubyte"], files["t10k-labels-idx1-ubyte"])
    if train.images.shape[1:] != test.images.shape[1:]:
        raise CertkdError(
            f"train images are {tuple(train.images.shape[2:])} but test images are {tuple(test.images.shape[2:])} "
            f"in {data_dir}; the files come from different datasets, re-download them")
    return train, test
