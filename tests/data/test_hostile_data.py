"""Hostile data files (issue #10): each is refused at load time with one ``CertkdError`` line.

Empty splits, impossible image shapes, lying headers that declare terabytes, overflowing labels,
decompression bombs, non-UTF-8 annotations and a missing Pillow: every case must fail while the
dataset is loaded (before any training, so no finished work is lost), and through the CLI with
exit code 2, exactly one ``error: ...`` line naming the problem and the fix, no traceback and no
``--out`` folder. All files are tiny and written here.
"""
from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import subprocess
import sys
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest

from certkd.cli import main
from certkd.data import load_dataset
from certkd.errors import CertkdError

IMAGES, LABELS = 0x00000803, 0x00000801


def refused(dataset: str, data_dir: Path, *match: str) -> str:
    """``load_dataset`` raises a one-line CertkdError containing every ``match`` string."""
    with pytest.raises(CertkdError) as exc:
        load_dataset(dataset, data_dir)
    msg = str(exc.value)
    assert "\n" not in msg, msg
    for m in match:
        assert m in msg, msg
    return msg


def cli_refuses(capsys, tmp_path: Path, dataset: str, data_dir: Path, *match: str) -> str:
    """``certkd train --dataset ... --out OUT`` exits 2 with one ``error:`` line and creates no OUT."""
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        main(["train", "--preset", "digits-small", "--method", "standard", "--model", "mlp", "--epochs", "1",
              "--quiet", "--dataset", dataset, "--data-dir", str(data_dir), "--out", str(out)])
    captured = capsys.readouterr()
    assert exc.value.code == 2, (captured.out, captured.err)
    assert "Traceback" not in captured.out + captured.err
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    for m in match:
        assert m in lines[0], lines[0]
    assert not out.exists()
    return lines[0]


# --------------------------------------------------------------------------- IDX (MNIST)

def idx_blob(magic: int, dims: tuple[int, ...], payload: bytes) -> bytes:
    return struct.pack(">I", magic) + struct.pack(f">{len(dims)}I", *dims) + payload


def write(path: Path, blob: bytes, gz: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        Path(f"{path}.gz").write_bytes(gzip.compress(blob, compresslevel=1))
    else:
        path.write_bytes(blob)


def make_mnist(folder: Path, n_train: int = 4, n_test: int = 2, rows: int = 28, cols: int = 28,
               gz: bool = False) -> None:
    rng = np.random.RandomState(0)
    for split, n in (("train", n_train), ("t10k", n_test)):
        x = rng.randint(0, 256, (n, rows, cols)).astype(np.uint8)
        write(folder / f"{split}-images-idx3-ubyte", idx_blob(IMAGES, (n, rows, cols), x.tobytes()), gz)
        write(folder / f"{split}-labels-idx1-ubyte", idx_blob(LABELS, (n,), bytes(i % 10 for i in range(n))), gz)


@pytest.mark.parametrize("split", ["train", "t10k"])
def test_idx_zero_images_cli(tmp_path: Path, capsys, split: str) -> None:
    # A 0-image test set used to crash with ZeroDivisionError after a whole training epoch.
    make_mnist(tmp_path / "d", n_train=0 if split == "train" else 4, n_test=0 if split == "t10k" else 2)
    cli_refuses(capsys, tmp_path, "mnist", tmp_path / "d", f"{split}-images-idx3-ubyte holds 0 images",
                "re-download it")


def test_idx_zero_images_gz(tmp_path: Path) -> None:
    make_mnist(tmp_path, n_test=0, gz=True)
    refused("mnist", tmp_path, "t10k-images-idx3-ubyte.gz holds 0 images", "re-download it")


@pytest.mark.parametrize("rows, cols", [(0, 0), (28, 20), (20, 28), (0, 28)])
def test_idx_bad_image_shapes(tmp_path: Path, rows: int, cols: int) -> None:
    make_mnist(tmp_path, rows=rows, cols=cols)
    refused("mnist", tmp_path, f"train-images-idx3-ubyte holds {rows}x{cols} images",
            "certkd needs square images", "re-download it")


def test_idx_non_square_cli(tmp_path: Path, capsys) -> None:
    make_mnist(tmp_path / "d", rows=28, cols=20, gz=True)
    cli_refuses(capsys, tmp_path, "fashion-mnist", tmp_path / "d", "holds 28x20 images", "square")


def test_idx_label_count_mismatch(tmp_path: Path) -> None:
    make_mnist(tmp_path)
    write(tmp_path / "train-labels-idx1-ubyte", idx_blob(LABELS, (5,), bytes(5)))
    refused("mnist", tmp_path, "has 4 images but", "has 5 labels", "re-download them")


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("which", ["images", "labels"])
def test_idx_huge_declared_dims_are_refused_before_reading(tmp_path: Path, gz: bool, which: str) -> None:
    # 2**32-1 images of 2**32-1 x 2**32-1 pixels (~8e28 bytes), followed by a few bytes: refused from the
    # header and the file size, without reading or allocating what the header declares.
    make_mnist(tmp_path, gz=gz)
    big = 0xFFFFFFFF
    if which == "images":
        write(tmp_path / "train-images-idx3-ubyte", idx_blob(IMAGES, (big, big, big), bytes(100)), gz)
    else:
        write(tmp_path / "train-labels-idx1-ubyte", idx_blob(LABELS, (big,), bytes(4)), gz)
    start = time.perf_counter()
    msg = refused("mnist", tmp_path, f"train-{which}-idx", "payload bytes", "re-download it")
    assert time.perf_counter() - start < 5
    assert ("can hold" in msg) if gz else ("truncated" in msg)


def test_idx_gzip_bomb_is_not_decompressed_in_full(tmp_path: Path) -> None:
    # A valid 4-image header followed by 64 MB of zeros (a 64 KB .gz): only the declared payload
    # plus one byte is decompressed before the trailing data is refused.
    make_mnist(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    (tmp_path / "train-images-idx3-ubyte").unlink()
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)           # gzip container
    with open(path, "wb") as f:
        f.write(comp.compress(idx_blob(IMAGES, (4, 28, 28), bytes(4 * 28 * 28))))
        zeros = bytes(1 << 20)
        for _ in range(64):
            f.write(comp.compress(zeros))
        f.write(comp.flush())
    assert path.stat().st_size < 1 << 20
    refused("mnist", tmp_path, "train-images-idx3-ubyte.gz is corrupt (trailing bytes)",
            "found more than 3136", "re-download it")


def test_idx_unreadable_file(tmp_path: Path) -> None:
    if not hasattr(os, "geteuid") or os.geteuid() == 0:
        pytest.skip("root ignores file permissions")
    make_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").chmod(0)
    refused("mnist", tmp_path, "cannot read", "t10k-labels-idx1-ubyte (permission denied)", "permissions")


# --------------------------------------------------------------------------- CIFAR-10

CIFAR_NAMES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def make_cifar(folder: Path, n: int = 2) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for k, name in enumerate(CIFAR_NAMES):
        data = np.full((n, 3072), k, np.uint8)
        (folder / name).write_bytes(pickle.dumps({b"data": data, b"labels": [k % 10] * n}, protocol=2))
    return folder


def put_batch(folder: Path, name: str, data, labels) -> None:
    # Protocol 4: protocol 2 pickles an empty array's b"" as a call to builtins.bytes, which the
    # restricted unpickler forbids (bytes(n) could allocate n bytes).
    (folder / name).write_bytes(pickle.dumps({b"data": data, b"labels": labels}, protocol=4))


@pytest.mark.parametrize("name", ["data_batch_3", "test_batch"])
def test_cifar_zero_images_cli(tmp_path: Path, capsys, name: str) -> None:
    folder = make_cifar(tmp_path / "d" / "cifar-10-batches-py")
    put_batch(folder, name, np.zeros((0, 3072), np.uint8), [])
    cli_refuses(capsys, tmp_path, "cifar10", tmp_path / "d", f"{name} holds 0 images", "re-download it")


def test_cifar_zero_images_as_bytes(tmp_path: Path) -> None:
    folder = make_cifar(tmp_path)
    put_batch(folder, "test_batch", b"", [])
    refused("cifar10", tmp_path, "test_batch holds 0 images", "re-download it")


@pytest.mark.parametrize("length", [3071, 3073, 2 * 3072 + 5])
def test_cifar_data_bytes_not_multiple_of_3072(tmp_path: Path, length: int) -> None:
    folder = make_cifar(tmp_path)
    put_batch(folder, "data_batch_1", bytes(length), [0])
    refused("cifar10", tmp_path, f"data_batch_1 does not hold a CIFAR-10 batch (b'data' holds {length} bytes, "
            "not a whole number of 3072-byte", "re-download it")


def test_cifar_data_bytes_multiple_of_3072_loads(tmp_path: Path) -> None:
    folder = make_cifar(tmp_path)
    put_batch(folder, "data_batch_1", bytes(range(256)) * 24, [7, 8])  # 6144 bytes = 2 images
    train, _, _ = load_dataset("cifar10", tmp_path)
    assert train.images.shape == (10, 3, 32, 32) and train.labels[:2].tolist() == [7, 8]


def test_cifar_huge_label_cli(tmp_path: Path, capsys) -> None:
    folder = make_cifar(tmp_path / "d")
    put_batch(folder, "data_batch_2", np.zeros((2, 3072), np.uint8), [1, 2 ** 70])
    cli_refuses(capsys, tmp_path, "cifar10", tmp_path / "d", f"data_batch_2 does not hold a CIFAR-10 batch "
                f"(label {2 ** 70} is outside 0..9)", "re-download it")


@pytest.mark.parametrize("labels", [[0, 10], [-1, 0], [0, -(2 ** 70)], np.array([3, 2 ** 63], np.uint64)],
                         ids=["10", "-1", "-2**70", "uint64"])
def test_cifar_labels_out_of_range(tmp_path: Path, labels) -> None:
    folder = make_cifar(tmp_path)
    put_batch(folder, "test_batch", np.zeros((2, 3072), np.uint8), labels)
    refused("cifar10", tmp_path, "test_batch does not hold a CIFAR-10 batch (label", "outside 0..9",
            "re-download it")


@pytest.mark.parametrize("labels, match", [
    ([0], "2 images but 1 labels"),
    ([0, 1, 2], "2 images but 3 labels"),
    (np.array(3), "b'labels' must be a list of ints"),
    (np.zeros((2, 1), np.int64), "b'labels' must be a list of ints"),
    ([0, 1.5], "b'labels' must be a list of ints"),
])
def test_cifar_bad_labels(tmp_path: Path, labels, match: str) -> None:
    folder = make_cifar(tmp_path)
    put_batch(folder, "data_batch_5", np.zeros((2, 3072), np.uint8), labels)
    refused("cifar10", tmp_path, "data_batch_5 does not hold a CIFAR-10 batch", match, "re-download it")


def test_cifar_pickle_declaring_huge_bytes(tmp_path: Path) -> None:
    # A 12-byte file whose BINBYTES8 opcode declares 2**62 bytes: refused, nothing that size is kept.
    folder = make_cifar(tmp_path)
    (folder / "test_batch").write_bytes(b"\x80\x04\x8e" + struct.pack("<Q", 2 ** 62) + b"abc")
    refused("cifar10", tmp_path, "test_batch is not a valid CIFAR-10 python batch (", "re-download it")


# --------------------------------------------------------------------------- image folders / TinyImageNet

def save_png(path: Path, value: int = 0, size: int = 4) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(path, format="PNG")


def png_declaring(width: int, height: int) -> bytes:
    """A ~100-byte PNG whose header declares ``width`` x ``height`` RGB pixels (one zero row of data)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (1 + 3 * min(width, 1000)))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def make_folder(root: Path) -> Path:
    for cls in ("a", "b"):
        save_png(root / "train" / cls / "1.png", 10)
        save_png(root / "val" / cls / "1.png", 20)
    return root


def make_tiny(root: Path) -> Path:
    for wnid in ("n01", "n02"):
        save_png(root / "train" / wnid / "images" / f"{wnid}_0.png", 30)
    save_png(root / "val" / "images" / "val_0.png", 40)
    save_png(root / "val" / "images" / "val_1.png", 50)
    (root / "val" / "val_annotations.txt").write_text("val_0.png\tn01\t0\t0\t4\t4\nval_1.png\tn02\t0\t0\t4\t4\n")
    return root


def test_imagefolder_empty_eval_split_cli(tmp_path: Path, capsys) -> None:
    root = make_folder(tmp_path / "d")
    for p in (root / "val").rglob("*.png"):
        p.unlink()
    cli_refuses(capsys, tmp_path, "imagefolder", root, f"no images found in {root / 'val'}", "expected <data-dir>")


def test_imagefolder_empty_splits(tmp_path: Path) -> None:
    root = make_folder(tmp_path)
    for p in (root / "train" / "b").iterdir():
        p.unlink()
    refused("imagefolder", root, f"class folder {root / 'train' / 'b'} has no .jpg/.jpeg/.png images",
            "add some or remove the folder")
    for d in (root / "train").iterdir():
        for p in d.iterdir():
            p.unlink()
        d.rmdir()
    refused("imagefolder", root, f"no class folders in {root / 'train'}", "expected <data-dir>/train")
    (root / "val").rename(root / "test")
    for d in (root / "test").iterdir():
        for p in d.iterdir():
            p.unlink()
        d.rmdir()
    save_png(root / "train" / "a" / "1.png")
    refused("imagefolder", root, f"no images found in {root / 'test'}")


def test_tinyimagenet_non_utf8_annotations_cli(tmp_path: Path, capsys) -> None:
    root = make_tiny(tmp_path / "d")
    (root / "val" / "val_annotations.txt").write_bytes(b"val_0.png\tn01\n\xff\xfe caf\xe9\tn02\n")
    cli_refuses(capsys, tmp_path, "tinyimagenet", root, "val_annotations.txt is not UTF-8 text (byte 0xff at "
                "offset 14)", "re-download it")


@pytest.mark.parametrize("name", ["../../train/n01/images/n01_0.png", "/etc/hostname", "..", "sub/val_0.png"])
def test_tinyimagenet_annotation_outside_images_folder(tmp_path: Path, name: str) -> None:
    root = make_tiny(tmp_path)
    (root / "val" / "val_annotations.txt").write_text(f"val_0.png\tn01\n{name}\tn02\n")
    refused("tinyimagenet", root, "val_annotations.txt:2 names", "not a file name in", "re-download it")


@pytest.mark.parametrize("side", [15000, 10000], ids=["bomb-error", "bomb-warning"])
def test_imagefolder_decompression_bomb_cli(tmp_path: Path, capsys, side: int) -> None:
    # 15000x15000 is over twice Pillow's limit (DecompressionBombError); 10000x10000 only triggers
    # its DecompressionBombWarning, and would otherwise be decoded into 300 MB. Both are refused.
    root = make_folder(tmp_path / "d")
    bomb = root / "train" / "b" / "2.png"
    bomb.write_bytes(png_declaring(side, side))
    assert bomb.stat().st_size < 200
    cli_refuses(capsys, tmp_path, "imagefolder", root, f"image {bomb} is too large (Image size ({side * side} pixels)",
                "decompression bomb", "delete or replace the file")


def test_imagefolder_bomb_refused_whatever_the_global_limit(tmp_path: Path, monkeypatch) -> None:
    from PIL import Image

    root = make_folder(tmp_path)
    bomb = root / "val" / "a" / "big.png"
    bomb.write_bytes(png_declaring(12000, 9000))
    for limit in (None, 10 ** 12):  # a user raised or disabled Pillow's own check
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
        refused("imagefolder", root, f"image {bomb} declares 12000x9000 pixels", "decompression bomb")
    monkeypatch.undo()
    with pytest.warns(Image.DecompressionBombWarning):  # the filter set while decoding does not leak out
        Image.open(bomb).close()


def test_imagefolder_corrupt_image(tmp_path: Path) -> None:
    root = make_folder(tmp_path)
    bad = root / "train" / "a" / "2.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    refused("imagefolder", root, f"cannot read image {bad}", "delete or replace the file")


def test_imagefolder_without_pillow_cli(tmp_path: Path, capsys, monkeypatch) -> None:
    root = make_tiny(tmp_path / "d")
    monkeypatch.setitem(sys.modules, "PIL", None)        # `from PIL import Image` now raises ImportError
    monkeypatch.setitem(sys.modules, "PIL.Image", None)
    cli_refuses(capsys, tmp_path, "tinyimagenet", root, "reading image folders needs Pillow",
                "pip install 'certkd[vision]'")


# --------------------------------------------------------------------------- ImageNet64

def make_imagenet64(root: Path, n: int = 1) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(1, 11):
        np.savez(root / f"train_data_batch_{i}.npz", data=np.zeros((n, 12288), np.uint8), labels=np.ones(n, np.int64))
    np.savez(root / "val_data.npz", data=np.zeros((n, 12288), np.uint8), labels=np.ones(n, np.int64))
    return root


def npz_with_header(path: Path, shape: tuple[int, ...], payload: bytes, compress: int = zipfile.ZIP_STORED) -> None:
    hdr = io.BytesIO()
    np.lib.format.write_array_header_1_0(hdr, {"descr": "|u1", "fortran_order": False, "shape": shape})
    with zipfile.ZipFile(path, "w", compression=compress) as zf:
        zf.writestr("data.npy", hdr.getvalue() + payload)
        buf = io.BytesIO()
        np.save(buf, np.ones(1, np.int64))
        zf.writestr("labels.npy", buf.getvalue())


def test_imagenet64_zero_images_cli(tmp_path: Path, capsys) -> None:
    root = make_imagenet64(tmp_path / "d")
    np.savez(root / "val_data.npz", data=np.zeros((0, 12288), np.uint8), labels=np.zeros(0, np.int64))
    cli_refuses(capsys, tmp_path, "imagenet64", root, "val_data.npz holds 0 images", "re-download it")


def test_imagenet64_zero_images_train(tmp_path: Path) -> None:
    root = make_imagenet64(tmp_path)
    np.savez_compressed(root / "train_data_batch_7.npz", data=np.zeros((0, 12288), np.uint8),
                        labels=np.zeros(0, np.int64))
    refused("imagenet64", root, "train_data_batch_7.npz holds 0 images", "re-download it")


@pytest.mark.parametrize("compress", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED], ids=["stored", "deflated"])
def test_imagenet64_lying_header_is_refused_before_allocating(tmp_path: Path, compress: int) -> None:
    # data.npy declares 10**9 images (12 TB) but holds one: refused from the zip directory, nothing allocated.
    root = make_imagenet64(tmp_path)
    npz_with_header(root / "train_data_batch_3.npz", (10 ** 9, 12288), bytes(12288), compress)
    start = time.perf_counter()
    refused("imagenet64", root, "train_data_batch_3.npz is not a valid ImageNet64 npz batch ('data' declares",
            "truncated or corrupt", "re-download it")
    assert time.perf_counter() - start < 5


def test_imagenet64_lying_labels_header(tmp_path: Path) -> None:
    root = make_imagenet64(tmp_path)
    hdr = io.BytesIO()
    np.lib.format.write_array_header_1_0(hdr, {"descr": "<i8", "fortran_order": False, "shape": (10 ** 12,)})
    with zipfile.ZipFile(root / "val_data.npz", "w") as zf:
        buf = io.BytesIO()
        np.save(buf, np.zeros((1, 12288), np.uint8))
        zf.writestr("data.npy", buf.getvalue())
        zf.writestr("labels.npy", hdr.getvalue() + bytes(8))
    refused("imagenet64", root, "val_data.npz is not a valid ImageNet64 npz batch ('labels' declares int64 "
            "(1000000000000,)", "re-download it")


def test_imagenet64_deflate_bomb_is_refused(tmp_path: Path) -> None:
    # data.npy declares 300,000 images (3.7 GB) and the zip directory agrees, but its deflated stream is a
    # few hundred bytes: more than deflate can expand (~1032:1), so it is refused without decompressing.
    root = make_imagenet64(tmp_path)
    path = root / "val_data.npz"
    hdr = io.BytesIO()
    np.lib.format.write_array_header_1_0(hdr, {"descr": "|u1", "fortran_order": False, "shape": (300000, 12288)})
    npz_with_header(path, (300000, 12288), bytes(2 * 12288), zipfile.ZIP_DEFLATED)
    blob = bytearray(path.read_bytes())
    size = struct.pack("<I", len(hdr.getvalue()) + 300000 * 12288)
    assert blob[:4] == b"PK\x03\x04"                       # data.npy is the first member
    blob[22:26] = size                                      # its local header's uncompressed size
    central = blob.index(b"PK\x01\x02")                    # and its central directory entry's
    blob[central + 24:central + 28] = size
    path.write_bytes(bytes(blob))
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("data.npy")
        assert info.file_size > 3_000_000_000 and info.compress_size < 10_000
    refused("imagenet64", root, "val_data.npz is not a valid ImageNet64 npz batch ('data' declares",
            "truncated or corrupt", "re-download it")


# --------------------------------------------------------------------------- a real process

def test_zero_image_test_set_through_python_m_certkd(tmp_path: Path) -> None:
    make_mnist(tmp_path / "d", n_test=0, gz=True)
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "certkd", "train", "--preset", "digits-small", "--method",
                           "standard", "--model", "mlp", "--epochs", "1", "--quiet", "--dataset", "mnist",
                           "--data-dir", str(tmp_path / "d"), "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "holds 0 images" in lines[0], proc.stderr
    assert not out.exists()
