"""ImageNet64 reader on tiny fake ``.npz`` batches written here (the real set is 13 GB)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from certkd.data import DATASETS, load_dataset
from certkd.data.imagenet64 import TRAIN_FILES, VAL_FILE
from certkd.errors import CertkdError

PER_BATCH = 2   # 10 training batches -> 20 images
N_VAL = 4


def fake_batch(n: int, first_label: int, seed: int) -> dict[str, np.ndarray]:
    """``n`` images as the official files store them: (n, 12288) uint8, R plane, G plane, B plane.

    Image i has value 200 + channel at (row 5, col 9) of its channel plane, over random noise
    in 0..99, so the channel/row/column order can be checked after loading.
    """
    rng = np.random.RandomState(seed)
    img = rng.randint(0, 100, size=(n, 3, 64, 64)).astype(np.uint8)
    for c in range(3):
        img[:, c, 5, 9] = 200 + c
    img[:, 0, 63, 0] = 250                                  # bottom-left corner of the red plane
    data = img.reshape(n, 3 * 64 * 64)
    # flat index check: red plane first, row-major inside a plane
    assert data[0, 5 * 64 + 9] == 200 and data[0, 4096 + 5 * 64 + 9] == 201 and data[0, 63 * 64] == 250
    labels = (np.arange(n) + first_label - 1) % 1000 + 1        # 1-based, as in the official files
    return {"data": data, "labels": labels.astype(np.int64), "mean": img.mean(0).reshape(-1).astype(np.float32)}


def write_imagenet64(root: Path, layout: str = "flat") -> tuple[np.ndarray, np.ndarray]:
    """The ten training batches + val_data.npz; returns the training data and labels written."""
    if layout == "flat":
        train_dirs, val_dir = [root] * 10, root
    elif layout == "npz-dirs":
        train_dirs, val_dir = [root / "Imagenet64_train_npz"] * 10, root / "Imagenet64_val_npz"
    else:  # the train download in two zips
        train_dirs = [root / "Imagenet64_train_part1_npz"] * 5 + [root / "Imagenet64_train_part2_npz"] * 5
        val_dir = root / "Imagenet64_val_npz"
    datas, labels = [], []
    for i, (name, folder) in enumerate(zip(TRAIN_FILES, train_dirs)):
        folder.mkdir(parents=True, exist_ok=True)
        batch = fake_batch(PER_BATCH, first_label=1 + 100 * i, seed=i)
        save = np.savez_compressed if i % 2 == 0 else np.savez    # the official files are compressed
        if i == 3:
            batch.pop("mean")                                     # 'mean' is optional
        save(folder / name, **batch)
        datas.append(batch["data"])
        labels.append(batch["labels"])
    val_dir.mkdir(parents=True, exist_ok=True)
    val = fake_batch(N_VAL, first_label=998, seed=99)           # labels 998, 999, 1000, 1
    np.savez_compressed(val_dir / VAL_FILE, data=val["data"], labels=val["labels"])
    return np.concatenate(datas), np.concatenate(labels)


@pytest.mark.parametrize("layout", ["flat", "npz-dirs", "two-part"])
def test_imagenet64_layouts_shapes_labels(tmp_path: Path, layout: str) -> None:
    data, labels = write_imagenet64(tmp_path, layout)
    train, test, info = load_dataset("imagenet64", tmp_path)
    assert "imagenet64" in DATASETS
    assert train.images.shape == (20, 3, 64, 64) and train.images.dtype == torch.uint8
    assert test.images.shape == (N_VAL, 3, 64, 64) and test.images.dtype == torch.uint8
    assert train.labels.dtype == torch.int64
    assert train.labels.tolist() == (labels - 1).tolist()       # 1-based -> 0-based
    assert train.labels[:4].tolist() == [0, 1, 100, 101]
    assert test.labels.tolist() == [997, 998, 999, 0]
    # stored order kept, channel-first: the known pixels land on channel c, row 5, column 9
    assert torch.equal(train.images.reshape(20, -1), torch.from_numpy(data))
    assert train.images[:, :, 5, 9].tolist() == [[200, 201, 202]] * 20
    assert test.images[:, 0, 63, 0].tolist() == [250] * N_VAL
    assert int(train.images[:, :, :5].max()) < 100              # rows above the marker are noise only
    assert (info.name, info.num_classes, info.in_channels, info.input_size) == ("imagenet64", 1000, 3, 64)
    assert info.mean == (0.4815, 0.4578, 0.4082) and info.std == (0.2153, 0.2111, 0.2121)   # docs/method.md §9
    assert info.augmentation == "crop-flip" and info.crop_padding == 4
    assert load_dataset("ImageNet-64", tmp_path)[2].name == "imagenet64"


def one_line_error(root: Path, match: str) -> str:
    with pytest.raises(CertkdError, match=match) as exc:
        load_dataset("imagenet64", root)
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_imagenet64_missing_file(tmp_path: Path) -> None:
    write_imagenet64(tmp_path)
    (tmp_path / "train_data_batch_7.npz").unlink()
    msg = one_line_error(tmp_path, r"ImageNet64 files not found in .*: missing train_data_batch_7\.npz")
    assert "--data-dir" in msg and "Imagenet64_train_npz" in msg
    (tmp_path / VAL_FILE).unlink()
    one_line_error(tmp_path, r"missing train_data_batch_7\.npz, val_data\.npz;")
    one_line_error(tmp_path / "empty", "data directory .*empty does not exist")
    with pytest.raises(CertkdError, match="dataset 'imagenet64' needs --data-dir"):
        load_dataset("imagenet64")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "pickled-labels", "no-labels", "wrong-size",
                                    "zero-based"])
def test_imagenet64_broken_file(tmp_path: Path, damage: str) -> None:
    write_imagenet64(tmp_path)
    bad = tmp_path / "train_data_batch_2.npz"
    raw = bad.read_bytes()
    good = fake_batch(PER_BATCH, 1, seed=0)
    if damage == "truncated":
        bad.write_bytes(raw[: len(raw) // 2])
    elif damage == "garbage":
        bad.write_bytes(b"not a zip file at all")
    elif damage == "pickled-labels":   # an object array would need unpickling: refused, never loaded
        np.savez(bad, data=good["data"], labels=np.array([1, "x"], dtype=object))
    elif damage == "no-labels":
        np.savez(bad, data=good["data"])
    elif damage == "wrong-size":       # e.g. the 32x32 version
        np.savez(bad, data=np.zeros((2, 3072), np.uint8), labels=np.array([1, 2]))
    else:
        np.savez(bad, data=good["data"], labels=np.array([0, 1]))
    expected = {"truncated": "cannot read it .*truncated", "garbage": "cannot read it .*truncated",
                "pickled-labels": "Object arrays cannot be loaded", "no-labels": "expected 'data' and 'labels'",
                "wrong-size": r"\(N, 12288\) uint8", "zero-based": r"labels must be 1\.\.1000, found 0\.\.1"}[damage]
    msg = one_line_error(tmp_path, rf"{bad} is not a valid ImageNet64 npz batch.*{expected}")
    assert msg.endswith("re-download it")


def test_imagenet64_preset_model_forward(tmp_path: Path) -> None:
    """The imagenet64 presets' model (CNN7 with a stride-2 conv 5) runs on a batch of this loader."""
    from certkd.config import resolve_config
    from certkd.data import iterate_batches
    from certkd.models import create_model

    write_imagenet64(tmp_path)
    cfg = resolve_config("imagenet64-1_255-ccibp", {"data_dir": str(tmp_path)})
    train, _, info = load_dataset(cfg.dataset, cfg.data_dir)
    assert cfg.model == "cnn7-imagenet"
    # full-width CNN7 as in the preset, but a batch of 4 keeps this fast
    model = create_model(cfg.model, info.in_channels, info.input_size, info.num_classes, info.mean, info.std,
                         **cfg.model_kwargs).eval()
    x, y = next(iterate_batches(train, 4, shuffle=True, seed=0, augmentation=info.augmentation,
                                crop_padding=info.crop_padding))
    assert x.shape == (4, 3, 64, 64) and x.dtype == torch.float32 and 0.0 <= x.min() and x.max() <= 1.0
    with torch.no_grad():
        out = model(x)
    assert out.shape == (4, 1000) and torch.isfinite(out).all()
    assert model.features[-3].in_features == 32768               # 16·16·128 (docs/method.md §8)
