"""val_fraction: the last fraction of the training set is held out, evaluated every epoch as 'val'."""
import json

import pytest
import torch

from certkd.config import resolve_config
from certkd.data import ImageDataset
from certkd.errors import CertkdError
from certkd.training import train


def test_split_validation_sizes_and_order():
    ds = ImageDataset(torch.zeros(10, 1, 2, 2), torch.arange(10))
    tr, val = ds.split_validation(0.2)
    assert tr.labels.tolist() == list(range(8)) and val.labels.tolist() == [8, 9]
    assert len(ds.split_validation(0.01)[1]) == 1  # at least one validation point
    with pytest.raises(ValueError):
        ds.split_validation(0.0)
    with pytest.raises(ValueError, match="leaves no training point"):
        ImageDataset(torch.zeros(1, 1, 2, 2), torch.zeros(1)).split_validation(0.5)


def test_val_fraction_is_checked():
    with pytest.raises(CertkdError, match=r"val_fraction must be in \[0, 1\)"):
        resolve_config("digits-small", {"val_fraction": 1.0})


def test_training_reports_val_every_epoch(tmp_path):
    cfg = resolve_config("digits-small", {"model": "mlp", "model_kwargs": {"hidden": [16]}, "epochs": 2,
                                          "val_fraction": 0.2, "test_interval": 100, "test_attack_steps": 2})
    seen = []
    train(cfg, tmp_path / "run", progress=False, log=lambda s: None, on_epoch=seen.append)
    records = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in seen] == [1, 2] and [r["epoch"] for r in records] == [1, 2]
    # digits: 1437 training points, round(0.2 * 1437) = 287 validate, never trained on
    assert all(r["val"]["n"] == 287 for r in records)
    assert "test" not in records[0] and records[1]["test"]["n"] == 360  # the test set only at its interval/end
