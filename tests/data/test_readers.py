"""Dataset readers: IDX (MNIST), CIFAR-10 pickles, image folders, digits, error messages."""
from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from certkd.data import DATASETS, DatasetInfo, ImageDataset, load_dataset
from certkd.errors import CertkdError

REAL_MNIST = Path("/work/shared/data/mnist")


# --------------------------------------------------------------------------- IDX / MNIST

def write_idx(path: Path, arr: np.ndarray, gz: bool = False) -> Path:
    """Write a uint8 IDX file (magic 0x08 type, ndim from the array)."""
    arr = np.asarray(arr, dtype=np.uint8)
    blob = struct.pack(">I", 0x0800 | arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(blob))
    else:
        path.write_bytes(blob)
    return path


def make_mnist(folder: Path, gz: bool, n_train: int = 6, n_test: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Small MNIST-format files; returns the train images and labels written."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(1)
    x_tr = rng.randint(0, 256, size=(n_train, 28, 28)).astype(np.uint8)
    y_tr = (np.arange(n_train) % 10).astype(np.uint8)
    write_idx(folder / "train-images-idx3-ubyte", x_tr, gz)
    write_idx(folder / "train-labels-idx1-ubyte", y_tr, gz)
    write_idx(folder / "t10k-images-idx3-ubyte", rng.randint(0, 256, size=(n_test, 28, 28)), gz)
    write_idx(folder / "t10k-labels-idx1-ubyte", (np.arange(n_test) * 3) % 10, gz)
    return x_tr, y_tr


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("sub", ["", "MNIST/raw", "raw"])
def test_mnist_idx_layouts(tmp_path: Path, gz: bool, sub: str) -> None:
    x_tr, y_tr = make_mnist(tmp_path / sub, gz)
    train, test, info = load_dataset("mnist", tmp_path)
    assert train.images.dtype == torch.uint8 and train.images.shape == (6, 1, 28, 28)
    assert test.images.shape == (4, 1, 28, 28)
    assert torch.equal(train.images[:, 0], torch.from_numpy(x_tr))
    assert train.labels.dtype == torch.int64 and train.labels.tolist() == y_tr.tolist()
    assert test.labels.tolist() == [0, 3, 6, 9]
    assert info == DatasetInfo("mnist", 10, 1, 28, (0.0,), (1.0,), "none", 0, tuple("0123456789"))


def test_fashion_mnist_torchvision_layout(tmp_path: Path) -> None:
    make_mnist(tmp_path / "FashionMNIST" / "raw", gz=True)
    train, _, info = load_dataset("fashion-mnist", tmp_path)
    assert len(train) == 6 and info.name == "fashion-mnist"
    assert info.class_names[0] == "T-shirt/top" and info.class_names[9] == "Ankle boot"
    # MNIST's torchvision folder is not searched for Fashion-MNIST.
    make_mnist(tmp_path / "other" / "MNIST" / "raw", gz=False)
    with pytest.raises(CertkdError, match="FashionMNIST/raw"):
        load_dataset("fashion-mnist", tmp_path / "other")


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_truncated_file(tmp_path: Path, gz: bool) -> None:
    make_mnist(tmp_path, gz)
    name = "train-images-idx3-ubyte" + (".gz" if gz else "")
    path = tmp_path / name
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CertkdError) as exc:
        load_dataset("mnist", tmp_path)
    msg = str(exc.value)
    assert name in msg and "truncated" in msg and "re-download" in msg and "\n" not in msg


def test_mnist_bad_magic(tmp_path: Path) -> None:
    make_mnist(tmp_path, gz=False)
    # A label file where the images should be.
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros(6, np.uint8))
    with pytest.raises(CertkdError, match=r"train-images-idx3-ubyte is not an IDX image file \(magic 0x00000801"):
        load_dataset("mnist", tmp_path)


def test_mnist_count_mismatch(tmp_path: Path) -> None:
    make_mnist(tmp_path, gz=False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(3, np.uint8))
    with pytest.raises(CertkdError, match="has 4 images but .* has 3 labels"):
        load_dataset("mnist", tmp_path)


def test_mnist_missing_files(tmp_path: Path) -> None:
    make_mnist(tmp_path, gz=False)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(CertkdError, match=r"MNIST-format files not found in .*t10k-labels-idx1-ubyte\[\.gz\]"):
        load_dataset("mnist", tmp_path)


@pytest.mark.skipif(not (REAL_MNIST / "train-images-idx3-ubyte.gz").is_file(), reason="real MNIST not available")
def test_real_mnist() -> None:
    train, test, info = load_dataset("mnist", REAL_MNIST)
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert train.labels.min() == 0 and train.labels.max() == 9 and test.labels.max() == 9
    assert train.labels[:5].tolist() == [5, 0, 4, 1, 9] and test.labels[:3].tolist() == [7, 2, 1]
    assert torch.bincount(test.labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert info.input_size == 28


# --------------------------------------------------------------------------- CIFAR-10

def py2_cifar_pickle(data: np.ndarray, labels: list[int]) -> bytes:
    """Protocol-2 pickle as Python 2 / numpy 1 wrote the official batches (str -> SHORT_BINSTRING)."""
    def sbs(b: bytes) -> bytes:
        return b"U" + bytes([len(b)]) + b

    n = data.shape[0]
    raw = data.astype(np.uint8).tobytes()
    out = bytearray(b"\x80\x02}(")
    out += sbs(b"data")
    out += b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + sbs(b"b") + b"\x87R"
    out += b"(K\x01M" + struct.pack("<H", n) + b"M" + struct.pack("<H", 3072) + b"\x86"
    out += b"cnumpy\ndtype\n" + sbs(b"u1") + b"K\x00K\x01\x87R"
    out += b"(K\x03" + sbs(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
    out += b"\x89T" + struct.pack("<I", len(raw)) + raw + b"tb"
    out += sbs(b"labels") + b"](" + b"".join(b"K" + bytes([v]) for v in labels) + b"e"
    out += b"u."
    return bytes(out)


def make_cifar(root: Path, n: int = 3) -> dict[str, np.ndarray]:
    """Six small batches written with different pickle flavours; returns the data arrays."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(0)
    written = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for k, name in enumerate(names):
        data = rng.randint(0, 256, size=(n, 3072)).astype(np.uint8)
        labels = [(k + j) % 10 for j in range(n)]
        if k == 0:
            blob = py2_cifar_pickle(data, labels)
        else:
            protocol = (2, 2, 4, 4, 5)[k - 1]  # py3 protocol 2 uses _codecs.encode, 5 uses _frombuffer
            blob = pickle.dumps({b"batch_label": b"x", b"data": data, b"labels": labels,
                                 b"filenames": [b"f.png"] * n}, protocol=protocol)
        (root / name).write_bytes(blob)
        written[name] = data
    return written


def test_py2_helper_matches_official_reader() -> None:
    # The hand-written py2 pickle must be what the stock reader (official recipe) sees.
    data = np.arange(2 * 3072, dtype=np.int64).reshape(2, 3072).astype(np.uint8)
    obj = pickle.loads(py2_cifar_pickle(data, [3, 7]), encoding="bytes")
    assert np.array_equal(obj[b"data"], data) and obj[b"labels"] == [3, 7]


@pytest.mark.parametrize("nested", [True, False])
def test_cifar_batches(tmp_path: Path, nested: bool) -> None:
    folder = tmp_path / "cifar-10-batches-py" if nested else tmp_path
    written = make_cifar(folder)
    # A known pixel: channel 1 (green), row 5, column 7 of image 1 of data_batch_2.
    written["data_batch_2"][1, 1 * 1024 + 5 * 32 + 7] = 201
    (folder / "data_batch_2").write_bytes(pickle.dumps(
        {b"data": written["data_batch_2"], b"labels": [1, 2, 3]}, protocol=2))
    train, test, info = load_dataset("cifar10", tmp_path)
    assert train.images.shape == (15, 3, 32, 32) and test.images.shape == (3, 3, 32, 32)
    assert train.images.dtype == torch.uint8
    assert train.images[3 + 1, 1, 5, 7].item() == 201
    assert torch.equal(train.images[0].reshape(-1), torch.from_numpy(written["data_batch_1"][0]))
    assert torch.equal(test.images[2].reshape(-1), torch.from_numpy(written["test_batch"][2]))
    assert train.labels[:6].tolist() == [0, 1, 2, 1, 2, 3] and test.labels.tolist() == [5, 6, 7]
    assert info.mean == (0.4914, 0.4822, 0.4465) and info.std == (0.2023, 0.1994, 0.2010)
    assert (info.augmentation, info.crop_padding, info.input_size, info.in_channels) == ("crop-flip", 2, 32, 3)
    assert info.class_names[0] == "airplane" and info.class_names[9] == "truck"


def test_cifar_meta_label_names(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    make_cifar(folder)
    names = [f"c{i}".encode() for i in range(10)]
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": names, b"num_vis": 3072}, protocol=2))
    _, _, info = load_dataset("cifar10", tmp_path)
    assert info.class_names == tuple(f"c{i}" for i in range(10))


class _Payload:
    """Unpickling this creates ``marker`` (the stand-in for arbitrary code)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_cifar_malicious_pickle_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    make_cifar(folder)
    # Sanity: the payload does run under a plain pickle.load.
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Payload(probe))).close()
    assert probe.exists()

    marker = tmp_path / "pwned"
    (folder / "data_batch_3").write_bytes(pickle.dumps(
        {b"data": np.zeros((1, 3072), np.uint8), b"labels": [_Payload(marker)]}, protocol=2))
    with pytest.raises(CertkdError, match=r"data_batch_3 is not a valid CIFAR-10 python batch .*forbidden"):
        load_dataset("cifar10", tmp_path)
    assert not marker.exists()


def test_cifar_wrong_content(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    make_cifar(folder)
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(CertkdError, match=r"test_batch does not hold a CIFAR-10 batch \(b'data' must be"):
        load_dataset("cifar10", tmp_path)
    (folder / "test_batch").write_bytes(b"\x80\x02}q")  # truncated pickle
    with pytest.raises(CertkdError, match="test_batch is not a valid CIFAR-10 python batch"):
        load_dataset("cifar10", tmp_path)


def test_cifar_missing(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    make_cifar(folder)
    (folder / "data_batch_4").unlink()
    with pytest.raises(CertkdError, match=r"CIFAR-10 files not found in .*data_batch_4"):
        load_dataset("cifar10", tmp_path)


# --------------------------------------------------------------------------- image folders

def save_png(path: Path, rgb: tuple[int, int, int], size: int = 4, fmt: str = "PNG") -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.zeros((size, size, 3), np.uint8)
    arr[...] = rgb
    arr[1, 2] = (255 - rgb[0], 7, 9)  # a distinct pixel at row 1, column 2
    Image.fromarray(arr).save(path, format=fmt)


@pytest.mark.parametrize("eval_split", ["val", "test"])
def test_imagefolder(tmp_path: Path, eval_split: str) -> None:
    save_png(tmp_path / "train" / "cat" / "a.png", (10, 20, 30))
    save_png(tmp_path / "train" / "cat" / "sub" / "b.PNG", (11, 20, 30))
    save_png(tmp_path / "train" / "ant" / "c.png", (12, 20, 30))
    (tmp_path / "train" / "ant" / "notes.txt").write_text("ignored")
    save_png(tmp_path / eval_split / "cat" / "d.png", (13, 20, 30))
    train, test, info = load_dataset("imagefolder", tmp_path)
    assert info.class_names == ("ant", "cat") and info.num_classes == 2
    assert train.images.shape == (3, 3, 4, 4) and train.images.dtype == torch.uint8
    assert train.labels.tolist() == [0, 1, 1] and test.labels.tolist() == [1]
    # Files sorted within a class: ant/c, cat/a, cat/sub/b.
    assert train.images[:, 0, 0, 0].tolist() == [12, 10, 11]
    assert train.images[1, :, 1, 2].tolist() == [245, 7, 9]
    assert test.images[0, :, 0, 0].tolist() == [13, 20, 30]
    assert info.mean == (0.4802, 0.4481, 0.3975) and info.crop_padding == 4 and info.augmentation == "crop-flip"


def test_tinyimagenet_val_annotations(tmp_path: Path) -> None:
    for wnid, v in (("n02", 50), ("n01", 100)):
        save_png(tmp_path / "train" / wnid / "images" / f"{wnid}_0.JPEG", (v, v, v), size=8, fmt="JPEG")
        (tmp_path / "train" / wnid / f"{wnid}_boxes.txt").write_text("x\n")
    save_png(tmp_path / "val" / "images" / "val_0.JPEG", (100, 100, 100), size=8, fmt="JPEG")
    save_png(tmp_path / "val" / "images" / "val_1.JPEG", (50, 50, 50), size=8, fmt="JPEG")
    (tmp_path / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn01\t0\t0\t8\t8\nval_1.JPEG\tn02\t0\t0\t8\t8\n")
    train, test, info = load_dataset("tinyimagenet", tmp_path)
    assert info.name == "tinyimagenet" and info.class_names == ("n01", "n02") and info.input_size == 8
    assert train.labels.tolist() == [0, 1] and test.labels.tolist() == [0, 1]
    assert abs(int(test.images[0, 0, 7, 7]) - 100) <= 3 and abs(int(test.images[1, 0, 7, 7]) - 50) <= 3


def test_imagefolder_size_mismatch(tmp_path: Path) -> None:
    save_png(tmp_path / "train" / "a" / "1.png", (1, 2, 3))
    save_png(tmp_path / "train" / "b" / "2.png", (1, 2, 3), size=5)
    save_png(tmp_path / "val" / "a" / "3.png", (1, 2, 3))
    with pytest.raises(CertkdError, match=r"image .*2\.png is 5x5 but .*1\.png is 4x4; all images must have the same size"):
        load_dataset("imagefolder", tmp_path)


def test_imagefolder_missing_split(tmp_path: Path) -> None:
    save_png(tmp_path / "train" / "a" / "1.png", (1, 2, 3))
    with pytest.raises(CertkdError, match=r"has no val/ or test/; expected <data-dir>/train/<class>"):
        load_dataset("imagefolder", tmp_path)
    with pytest.raises(CertkdError, match=r"has no train/"):
        load_dataset("tinyimagenet", tmp_path / "train")


def test_imagefolder_unknown_eval_class(tmp_path: Path) -> None:
    save_png(tmp_path / "train" / "a" / "1.png", (1, 2, 3))
    save_png(tmp_path / "val" / "zebra" / "1.png", (1, 2, 3))
    with pytest.raises(CertkdError, match="zebra is a class folder that train/ lacks"):
        load_dataset("imagefolder", tmp_path)


# --------------------------------------------------------------------------- digits, names, dirs

def test_digits() -> None:
    train, test, info = load_dataset("digits", data_dir="/ignored")
    assert len(train) == 1437 and len(test) == 360
    assert train.images.shape == (1437, 1, 8, 8) and train.images.dtype == torch.float32
    assert train.images.min() == 0.0 and train.images.max() == 1.0
    allx = torch.cat([train.images, test.images])
    assert torch.equal(torch.unique(allx * 16), torch.arange(17, dtype=torch.float32))
    # The split is the fixed RandomState(0) permutation.
    from sklearn.datasets import load_digits
    perm = np.random.RandomState(0).permutation(1797)
    assert train.labels.tolist() == load_digits().target[perm[:1437]].tolist()
    assert info == DatasetInfo("digits", 10, 1, 8, (0.0,), (1.0,), "none", 0, tuple("0123456789"))
    x, y = train.get(torch.tensor([0, 5]))
    assert x.shape == (2, 1, 8, 8) and torch.equal(y, train.labels[[0, 5]])


def test_unknown_name() -> None:
    with pytest.raises(CertkdError) as exc:
        load_dataset("cifar100")
    msg = str(exc.value)
    assert "unknown dataset 'cifar100'" in msg and "did you mean 'cifar10'?" in msg
    assert all(name in msg for name in DATASETS)
    assert load_dataset("DIGITS")[2].name == "digits"


@pytest.mark.parametrize("name", ["mnist", "cifar10", "tinyimagenet"])
def test_missing_dir(tmp_path: Path, name: str) -> None:
    with pytest.raises(CertkdError, match=f"dataset '{name}' needs --data-dir"):
        load_dataset(name)
    with pytest.raises(CertkdError, match=rf"data directory {tmp_path / 'nope'} does not exist"):
        load_dataset(name, tmp_path / "nope")


def test_image_dataset_get_and_subset() -> None:
    images = torch.arange(5 * 3 * 2 * 2, dtype=torch.uint8).reshape(5, 3, 2, 2)
    ds = ImageDataset(images, torch.tensor([4, 3, 2, 1, 0]))
    x, y = ds.get(torch.tensor([4, 1]))
    assert x.dtype == torch.float32 and torch.equal(x, images[[4, 1]].float() / 255) and y.tolist() == [0, 3]
    assert len(ds.subset(2)) == 2 and ds.subset(2).labels.tolist() == [4, 3]
    assert ds.take(3).labels.tolist() == [1, 0]


def test_image_dataset_sample_is_a_fixed_seed_subset() -> None:
    ds = ImageDataset(torch.arange(100, dtype=torch.uint8).reshape(100, 1, 1, 1), torch.arange(100))
    a, b = ds.sample(30), ds.sample(30)
    assert len(a) == 30 and torch.equal(a.labels, b.labels)             # deterministic
    assert a.labels.tolist() == sorted(a.labels.tolist())                # stored order kept
    assert torch.equal(a.images.flatten().long(), a.labels)              # images and labels stay paired
    assert a.labels.tolist() != list(range(30))                          # random, not the first 30
    assert set(ds.sample(10).labels.tolist()) <= set(a.labels.tolist())  # nested: a prefix of one permutation
    assert ds.sample(30, seed=1).labels.tolist() != a.labels.tolist()
    assert ds.sample(100) is ds and ds.sample(500) is ds
    with pytest.raises(ValueError, match="n must be >= 1"):
        ds.sample(0)
