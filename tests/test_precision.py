"""certkd.precision: TF32 flags set for training/verification and restored; AMP switch."""
from __future__ import annotations

import contextlib

import pytest
import torch

import certkd.training.loop as loop
from certkd import precision, resolve_config, train


@pytest.fixture
def restore_flags():
    saved = precision.tf32_flags()
    yield
    precision.set_tf32_flags(*saved)


def test_tf32_context_sets_and_restores(restore_flags):
    precision.set_tf32_flags(True, False)
    with precision.tf32(False):
        assert precision.tf32_flags() == (False, False)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    assert precision.tf32_flags() == (True, False)
    with pytest.raises(RuntimeError):
        with precision.tf32(True):
            assert precision.tf32_flags() == (True, True)
            raise RuntimeError
    assert precision.tf32_flags() == (True, False)


def test_autocast_is_bfloat16_when_enabled_and_a_no_op_otherwise():
    on = precision.autocast(True, torch.device("cpu"))
    assert isinstance(on, torch.autocast) and on.fast_dtype == torch.bfloat16
    assert isinstance(precision.autocast(False, torch.device("cpu")), contextlib.nullcontext)
    assert isinstance(precision.autocast(False, torch.device("cuda")), contextlib.nullcontext)


@pytest.mark.parametrize("allow", [False, True])
def test_training_sets_tf32_from_config_and_restores(tmp_path, monkeypatch, restore_flags, allow):
    """During the training steps the flags follow allow_tf32; the periodic evaluation runs with
    TF32 off; afterwards the caller's flags are back."""
    seen = {"step": set(), "eval": set()}
    step, evaluate = loop.training_loss, loop.evaluate_accuracy

    def spy_step(*a, **k):
        seen["step"].add(precision.tf32_flags())
        return step(*a, **k)

    def spy_eval(*a, **k):
        seen["eval"].add(precision.tf32_flags())
        return evaluate(*a, **k)

    monkeypatch.setattr(loop, "training_loss", spy_step)
    monkeypatch.setattr(loop, "evaluate_accuracy", spy_eval)
    before = (not allow, True)
    precision.set_tf32_flags(*before)
    cfg = resolve_config("digits-small", {"method": "standard", "model": "mlp", "epochs": 1, "eval_limit": 5,
                                          "test_attack_steps": 1, "allow_tf32": allow, "device": "cpu"})
    train(cfg, tmp_path / "run", progress=False, log=lambda s: None)
    assert seen["step"] == {(allow, allow)}
    assert seen["eval"] == {(False, False)}
    assert precision.tf32_flags() == before
