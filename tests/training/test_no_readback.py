"""The training step reads nothing back to the host (issue #20: no host–device synchronisation in the step).

Every registered method's step (loss, backward, clipping) runs with ``Tensor.item``, ``tolist``,
``__float__`` and ``__bool__`` made to raise; the loop's :class:`StepMonitor` reads back only at its flushes,
and its checks and logged means equal a per-step read-back.
"""
from __future__ import annotations

import math

import pytest
import torch

from certkd.attacks import PGD
from certkd.config import METHODS, TrainConfig
from certkd.models import create_model
from certkd.training import Teacher, training_loss
from certkd.training.loop import _clip_gradients
from certkd.training.monitor import NonFiniteError, StepMonitor, gradient_norms

EPS = 0.05


class ReadBack(AssertionError):
    pass


def _forbid(monkeypatch):
    def refuse(*_a, **_k):
        raise ReadBack("a read-back to the host inside the step")

    for name in ("item", "tolist", "__float__", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)


@pytest.mark.parametrize("method", METHODS)
def test_a_step_of_every_method_reads_nothing_back(monkeypatch, method):
    torch.manual_seed(0)
    model = create_model("cnn-small", 1, 8, 10).train()
    teacher = Teacher(create_model("cnn-small", 1, 8, 10).eval())
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    cfg = TrainConfig(method=method, eps=EPS, alpha=0.4, beta=0.7, reg_lambda=0.0, l1=1e-5,
                      attack_steps=2, attack_step_size=0.5)
    params = list(model.parameters())
    monitor = StepMonitor(1, [n for n, _ in model.named_parameters()], lambda what: what, sync_every=10 ** 9)
    with monkeypatch.context() as m:
        _forbid(m)
        loss, logs = training_loss(model, x, y, cfg, EPS, False, PGD(2, 0.5), teacher)
        loss.backward()
        norms = _clip_gradients(params, 1.0)
        monitor.record(0, 0, loss, norms, logs)
    monitor.flush()
    assert monitor.means()["loss"] == pytest.approx(float(loss.detach()))
    assert set(logs) <= set(monitor.means())


def test_monitor_reads_back_once_per_flush_and_sums_like_item(monkeypatch):
    calls = {"n": 0}
    real = torch.Tensor.tolist

    def counting(self):
        calls["n"] += 1
        return real(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counting)
    mon = StepMonitor(1, ["w"], lambda what: what, sync_every=4)
    values = [torch.tensor(v, dtype=torch.float32) for v in (0.1, 0.2, 0.3, 0.7, 1.1)]
    for i, v in enumerate(values):
        mon.record(i, i, v * 2, None, {"acc": v, "eps": 0.5})
    assert calls["n"] == 1  # the 4th step flushed; the 5th waits
    mon.flush()
    assert calls["n"] == 2
    expected = 0.0
    for v in values:  # per-step .item() summed in Python: the old loop's arithmetic
        expected += v.item()
    assert mon.means()["acc"] == expected / 5
    assert mon.means()["eps"] == 0.5 and mon.last["loss"] == (values[-1] * 2).item()


def test_monitor_names_the_first_fault_in_step_order():
    mon = StepMonitor(3, ["a.weight", "b.bias"], lambda what: f"fix: {what}", sync_every=100)
    ok = (torch.tensor([1.0, 2.0]), [0, 1])
    mon.record(0, 40, torch.tensor(1.0), ok, {"ce": torch.tensor(1.0)})
    mon.record(1, 41, torch.tensor(1.0), (torch.tensor([math.inf]), [1]), {"ce": torch.tensor(1.0)})
    mon.record(2, 42, torch.tensor(math.nan), ok, {"ce": torch.tensor(math.nan)})
    with pytest.raises(NonFiniteError, match=r"non-finite gradient at epoch 3, batch 2 \(step 42\) in b\.bias"):
        mon.flush()
    mon = StepMonitor(3, ["a"], lambda what: f"fix: {what}", sync_every=100)
    mon.record(4, 44, torch.tensor(math.nan), ok, {"ce": torch.tensor(math.nan), "reg": torch.tensor(0.5)})
    with pytest.raises(NonFiniteError, match=r"non-finite loss at epoch 3, batch 5 \(step 45\) in term ce \(ce=nan, "
                                             r"reg=0\.5\); fix: lower --lr"):
        mon.flush()


def test_gradient_norms_clip_exactly_like_clip_grad_norm():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 7)), torch.nn.Parameter(torch.randn(5)),
              torch.nn.Parameter(torch.randn(3, 5))]
    for p in params:
        p.grad = torch.randn_like(p) * 10
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for c, p in zip(copies, params):
        c.grad = p.grad.clone()
    params[1].grad = None
    copies[1].grad = None
    norms, present = _clip_gradients(params, 1.0)
    total_ref = torch.nn.utils.clip_grad_norm_(copies, 1.0)
    assert present == [0, 2]
    assert torch.equal(torch.linalg.vector_norm(norms), total_ref)
    assert all(p.grad is None and c.grad is None or torch.equal(p.grad, c.grad) for p, c in zip(params, copies))
    _, total, _ = gradient_norms(params)
    assert float(total) == pytest.approx(1.0, rel=1e-5)
