"""--amp for certified training (issue #20): bfloat16 autocast covers the training attack only, never a bound.

The bound and the loss are computed in float32 whatever ``amp`` says (exact equality when the attack has no
gradient step), and the loss curve of a short CC-IBP run moves by less than the tolerance stated in
docs/performance.md.
"""
from __future__ import annotations

import json

import pytest
import torch

from certkd import resolve_config, train
from certkd.attacks import PGD, linf_box
from certkd.config import TrainConfig
from certkd.models import create_model
from certkd.training import Teacher, training_loss

EPS = 0.1
#: docs/performance.md: the largest relative change of an epoch's mean training loss that --amp may cause
LOSS_TOLERANCE = 0.01


def _setup():
    torch.manual_seed(0)
    model = create_model("cnn-small", 1, 8, 10).train()
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    return model, Teacher(create_model("cnn-small", 1, 8, 10).eval()), x, y


def test_pgd_with_amp_stays_in_the_box_and_in_float32():
    model, _, x, y = _setup()
    lo, hi = linf_box(x, EPS)
    torch.manual_seed(1)
    xa = PGD(3, 0.5, amp=True)(model, x, y, lo, hi)
    assert xa.dtype == torch.float32 and (xa >= lo).all() and (xa <= hi).all()
    torch.manual_seed(1)
    seen = []
    hook = model.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    PGD(1, 0.5, amp=True)(model, x, y, lo, hi)
    hook.remove()
    assert torch.bfloat16 in seen  # the attack's forward ran in reduced precision


@pytest.mark.parametrize("method", ["cc-ibp", "ibp", "cc-dist", "sabr"])
def test_amp_leaves_the_bounded_loss_bit_identical_without_attack_steps(method):
    """With 0 attack steps the attack's point does not depend on its precision, so any difference would
    come from a bound or a loss computed under autocast."""
    model, teacher, x, y = _setup()
    losses = []
    for amp in (False, True):
        cfg = TrainConfig(method=method, eps=EPS, alpha=0.5, beta=0.5, reg_lambda=0.0, attack_steps=0, amp=amp)
        m = create_model("cnn-small", 1, 8, 10)
        m.load_state_dict(model.state_dict())
        torch.manual_seed(2)
        loss, _ = training_loss(m.train(), x, y, cfg, EPS, False, PGD(0, 0.5, amp=amp), teacher)
        losses.append(loss.detach())
    assert losses[0].dtype == torch.float32 and torch.equal(losses[0], losses[1])


@pytest.mark.slow
def test_amp_cc_ibp_loss_curve_stays_within_the_stated_tolerance(tmp_path):
    curves = []
    for amp in (False, True):
        cfg = resolve_config("digits-small", {"epochs": 3, "eval_limit": 10, "train_limit": 512, "amp": amp})
        run = train(cfg, tmp_path / f"amp{amp}", progress=False, log=lambda s: None)
        lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
        curves.append([r["train"]["loss"] for r in lines])
    assert len(curves[0]) == 3
    for ref, got in zip(*curves):
        assert got != ref  # amp really ran
        assert abs(got - ref) <= LOSS_TOLERANCE * abs(ref)
