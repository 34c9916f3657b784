"""Class-folder image datasets (generic ImageFolder and TinyImageNet).

Layout::

    root/train/<class>/**/*.{jpg,jpeg,png}      class order = sorted folder names
    root/val/<class>/**/*.{jpg,jpeg,png}        (or root/test/ in the same layout)

TinyImageNet's original validation layout is accepted too::

    root/val/images/*.JPEG
    root/val/val_annotations.txt                "<file>\\t<wnid>\\t..." per line

All images are decoded with PIL, converted to RGB and must share one square size. They are
decoded once, at load time, into one uint8 tensor (training batches are slices of it, so
training never waits for data). Decoding is serial on purpose: a thread pool was measured
slower (``benchmarks/bench_data.py``: serial/pool time ratio 0.64 with 2 threads on 5,000 64×64 JPEGs; the
small-image decode is dominated by GIL-holding Python/PIL overhead). One thread decodes about
7,000 such images per second on this CPU, i.e. ~15 s for TinyImageNet, once per run.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CertkdError
from .dataset import ImageDataset

IMAGE_SUFFIXES: frozenset[str] = frozenset({".jpg", ".jpeg", ".png"})
# Pillow's default MAX_IMAGE_PIXELS (~9459x9459), fixed here so that a changed global limit cannot let a
# decompression bomb through; Pillow itself only warns between this and twice this.
MAX_IMAGE_PIXELS = 89_478_485
LAYOUT_HINT = ("expected <data-dir>/train/<class>/*.jpg|png and <data-dir>/val/ (or test/) with the same "
               "class folders, or TinyImageNet's val/images/ + val/val_annotations.txt")


def _images_under(folder: Path) -> list[Path]:
    """Image files anywhere below ``folder``, sorted for a deterministic order."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _class_dirs(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")),
                  key=lambda p: p.name)


def _scan_train(train_dir: Path) -> tuple[tuple[str, ...], list[tuple[Path, int]]]:
    dirs = _class_dirs(train_dir)
    if not dirs:
        raise CertkdError(f"no class folders in {train_dir}; {LAYOUT_HINT}")
    items: list[tuple[Path, int]] = []
    for label, d in enumerate(dirs):
        files = _images_under(d)
        if not files:
            raise CertkdError(f"class folder {d} has no .jpg/.jpeg/.png images; add some or remove the folder")
        items.extend((f, label) for f in files)
    return tuple(d.name for d in dirs), items


def _scan_annotations(val_dir: Path, class_index: dict[str, int]) -> list[tuple[Path, int]]:
    """TinyImageNet's ``val/images`` + ``val_annotations.txt`` layout."""
    ann = val_dir / "val_annotations.txt"
    try:
        text = ann.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CertkdError(f"{ann} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); "
                          "the file is corrupt, re-download it") from exc
    items: list[tuple[Path, int]] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2:
            raise CertkdError(f"{ann}:{lineno} is not '<file>\\t<wnid>\\t...'; the file is corrupt, re-download it")
        name, wnid = fields[0].strip(), fields[1].strip()
        if wnid not in class_index:
            raise CertkdError(f"{ann}:{lineno} names class {wnid!r}, which has no folder in train/; "
                              "use the matching train/ and val/ of one dataset")
        if not name or Path(name).name != name or name in (".", ".."):
            raise CertkdError(f"{ann}:{lineno} names {name!r}, not a file name in {val_dir / 'images'}; "
                              "the file is corrupt, re-download it")
        path = val_dir / "images" / name
        if not path.is_file():
            raise CertkdError(f"{path} is listed in {ann} but missing; re-extract the dataset")
        items.append((path, class_index[wnid]))
    if not items:
        raise CertkdError(f"{ann} lists no images; re-extract the dataset")
    return items


def _scan_eval(eval_dir: Path, class_index: dict[str, int]) -> list[tuple[Path, int]]:
    if (eval_dir / "val_annotations.txt").is_file():
        return _scan_annotations(eval_dir, class_index)
    items: list[tuple[Path, int]] = []
    for d in _class_dirs(eval_dir):
        if d.name not in class_index:
            raise CertkdError(f"{d} is a class folder that train/ lacks; the evaluation split must use "
                              "the training classes (rename or remove it)")
        items.extend((f, class_index[d.name]) for f in _images_under(d))
    if not items:
        raise CertkdError(f"no images found in {eval_dir}; {LAYOUT_HINT}")
    return items


def _pillow() -> Any:
    """``PIL.Image``, or a one-line error naming the extra that installs it."""
    try:
        from PIL import Image
    except ImportError:
        raise CertkdError("reading image folders needs Pillow: pip install 'certkd[vision]' "
                          "(or pip install pillow)") from None
    return Image


def _open_rgb(image_mod: Any, path: Path) -> Any:
    """Decode one file to an RGB PIL image; a one-line error naming the file if it cannot be used.

    Call under ``warnings.simplefilter("error", DecompressionBombWarning)``: the size is checked from the
    header before any pixel is decoded, so a small file declaring 15000x15000 pixels allocates nothing.
    """
    fix = f"delete or replace the file (certkd refuses images over {MAX_IMAGE_PIXELS} pixels)"
    try:
        with image_mod.open(path) as im:
            w, h = im.size
            if w * h > MAX_IMAGE_PIXELS:
                raise CertkdError(f"image {path} declares {w}x{h} pixels, a possible decompression bomb; {fix}")
            return im.convert("RGB")
    except CertkdError:
        raise
    except (image_mod.DecompressionBombError, image_mod.DecompressionBombWarning) as exc:
        # Pillow's own check, raised inside open(): "Image size (N pixels) exceeds limit of M pixels, could be
        # decompression bomb DOS attack."
        raise CertkdError(f"image {path} is too large ({str(exc).rstrip('.')}); {fix}") from exc
    except Exception as exc:  # UnidentifiedImageError, OSError, SyntaxError, ValueError...: a bad file, not a bug
        detail = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CertkdError(f"cannot read image {path} ({detail}); delete or replace the file") from exc


def _decode(items: list[tuple[Path, int]], size: tuple[int, int] | None,
            ref: Path | None) -> tuple[ImageDataset, tuple[int, int], Path]:
    """Decode to uint8 (N, 3, H, W). ``size`` (W, H) and ``ref`` fix the size other splits must match."""
    image_mod = _pillow()  # optional dependency ("vision" extra)

    out: np.ndarray | None = None
    with warnings.catch_warnings():
        warnings.simplefilter("error", image_mod.DecompressionBombWarning)
        for i, (path, _) in enumerate(items):
            rgb = _open_rgb(image_mod, path)
            if size is None:
                size, ref = rgb.size, path
            elif rgb.size != size:
                raise CertkdError(f"image {path} is {rgb.size[0]}x{rgb.size[1]} but {ref} is {size[0]}x{size[1]}; "
                                  "all images must have the same size, resize them first")
            if out is None:
                if size[0] != size[1]:
                    raise CertkdError(f"image {path} is {size[0]}x{size[1]}; certkd needs square images, "
                                      "resize or crop them first")
                # Preallocate (N, H, W, 3): one big array instead of N small ones to stack.
                out = np.empty((len(items), size[1], size[0], 3), dtype=np.uint8)
            out[i] = np.asarray(rgb, dtype=np.uint8)
    if out is None or size is None or ref is None:  # the scanners refuse empty splits; keep it an error anyway
        raise CertkdError(f"no images to decode; {LAYOUT_HINT}")
    images = torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()
    labels = torch.tensor([label for _, label in items], dtype=torch.int64)
    return ImageDataset(images, labels), size, ref


def load_image_folder(root: Path) -> tuple[ImageDataset, ImageDataset, tuple[str, ...]]:
    """(train, eval, class names) from ``root/train`` and ``root/val`` (else ``root/test``)."""
    train_dir = root / "train"
    eval_dir = next((root / n for n in ("val", "test") if (root / n).is_dir()), None)
    if not train_dir.is_dir() or eval_dir is None:
        missing = "train/" if not train_dir.is_dir() else "val/ or test/"
        raise CertkdError(f"{root} has no {missing}; {LAYOUT_HINT}")
    _pillow()  # before scanning: a missing Pillow is reported first, not after a long directory walk
    try:
        class_names, train_items = _scan_train(train_dir)
        eval_items = _scan_eval(eval_dir, {c: i for i, c in enumerate(class_names)})
    except OSError as exc:  # e.g. a folder or val_annotations.txt without read permission
        raise CertkdError(f"cannot read {exc.filename or root} ({exc.strerror or exc}); "
                          "check the permissions of the dataset folder") from exc
    train, size, ref = _decode(train_items, None, None)
    test, _, _ = _decode(eval_items, size, ref)
    return train, test, class_names
