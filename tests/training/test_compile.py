"""--compile (issue #20): torch.compile of the model's forward; the loss curve stays within the stated tolerance
of the uncompiled run, and the checkpoint is the plain model's."""
from __future__ import annotations

import json

import pytest
import torch

from certkd import resolve_config, train
from certkd.checkpoints import latest_checkpoint, read_tensors
from certkd.options import option

#: docs/performance.md: the largest relative change of an epoch's mean training loss --compile may cause
LOSS_TOLERANCE = 0.01


def test_compile_is_an_option_and_off_by_default():
    assert resolve_config("digits-small", {}).compile is False
    assert option("compile").flag == "--compile"


@pytest.mark.slow
def test_compiled_training_follows_the_plain_loss_curve(tmp_path):
    curves, weights = [], []
    for compiled in (False, True):
        cfg = resolve_config("digits-small", {"epochs": 2, "eval_limit": 10, "train_limit": 128, "model": "mlp",
                                              "model_kwargs": {"hidden": [32, 32]}, "compile": compiled})
        run = train(cfg, tmp_path / f"c{compiled}", progress=False, log=lambda s: None)
        curves.append([json.loads(l)["train"]["loss"] for l in (run / "metrics.jsonl").read_text().splitlines()])
        weights.append(read_tensors(latest_checkpoint(run) / "model.safetensors"))
    assert set(weights[0]) == set(weights[1])  # no "_orig_mod." keys: the checkpoint is the plain model's
    for ref, got in zip(*curves):
        assert abs(got - ref) <= LOSS_TOLERANCE * abs(ref)
    assert all(torch.isfinite(t).all() for t in weights[1].values())
