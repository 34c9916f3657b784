"""The registry of training methods (certkd.methods): each method's loss is the one it documents.

For a fixed batch, every registered method's loss (through ``training_loss``) is compared with
the loss its class computes by hand (:meth:`Method.reference_loss`, from the parts of
certkd.losses, certkd.bounds and certkd.attacks) on a copy of the same model with the same random
seed. The methods are the registry's: a new method class is tested as soon as it is registered.
"""
import copy

import pytest
import torch

from certkd.attacks import PGD
from certkd.config import (CERTIFIED_METHODS, DISTILLATION_METHODS, EMPIRICAL_METHODS, METHODS, TrainConfig)
from certkd.methods import Method, ReferenceCase, base, method_class, method_names, register_method
from certkd.models import create_model
from certkd.reporting import method_family
from certkd.training import Teacher, effective_alpha, training_loss

EPS = 0.05


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    model = create_model("cnn-small", 1, 8, 10)
    model.train()
    teacher_model = create_model("cnn-small", 1, 8, 10).eval()
    x = torch.rand(16, 1, 8, 8)
    y = torch.randint(0, 10, (16,))
    return model, Teacher(teacher_model), x, y


def _cfg(method):
    return TrainConfig(method=method, eps=EPS, alpha=0.4, beta=0.7, reg_lambda=0.0, l1=0.0,
                       attack_steps=2, attack_step_size=0.5)


def _applied(parts, method, seed):
    model, teacher, x, y = parts
    cfg = _cfg(method)
    m = copy.deepcopy(model)
    torch.manual_seed(seed)
    loss, _ = training_loss(m, x, y, cfg, EPS, False, PGD(cfg.attack_steps, cfg.attack_step_size), teacher)
    return loss


@pytest.mark.parametrize("method", method_names())
def test_method_loss_is_the_documented_one(parts, method):
    cls = method_class(method)
    assert "reference_loss" in vars(cls), (f"training method '{method}' ({cls.__module__}.{cls.__name__}) defines "
                                           "no reference_loss of its own: write its loss by hand there")
    model, teacher, x, y = parts
    case = ReferenceCase(model, teacher, x, y, _cfg(method), EPS)
    expected = cls.reference_loss(case)
    applied = _applied(parts, method, case.seed)
    assert torch.isfinite(applied)
    assert torch.allclose(applied, expected, rtol=1e-6, atol=1e-7), (method, applied.item(), expected.item())


def test_a_reference_loss_tells_the_methods_apart(parts):
    """The comparison above can fail: the reference of one method is not another's loss."""
    model, teacher, x, y = parts
    case = ReferenceCase(model, teacher, x, y, _cfg("cc-dist"), EPS)
    assert not torch.allclose(method_class("cc-ibp").reference_loss(case), _applied(parts, "cc-dist", case.seed))
    with pytest.raises(NotImplementedError, match="'x' defines no reference_loss"):
        type("X", (Method,), {"name": "x"}).reference_loss(case)


def test_config_lists_come_from_the_registry():
    assert EMPIRICAL_METHODS == ("standard", "pgd-at", "trades")
    assert CERTIFIED_METHODS == ("ibp", "cc-ibp", "mtl-ibp", "exp-ibp", "sabr", "crown-ibp", "taps", "staps")
    assert DISTILLATION_METHODS == ("cc-dist", "mtl-dist", "exp-dist", "sabr-dist", "adv-dist", "ibp-dist",
                                    "cc-ibp-kd", "cc-ibp-width", "taps-dist", "staps-dist")
    assert METHODS == method_names()
    for name in METHODS:
        assert method_class(name).name == name
        # every distillation method but the box-width penalty (docs/method.md §7.11) distils a teacher
        assert method_class(name).needs_teacher == (name in DISTILLATION_METHODS and name != "cc-ibp-width")


def test_report_family_and_effective_alpha_unchanged():
    fam = {m: method_family(m) for m in METHODS}
    assert {m for m, f in fam.items() if f == "teacher"} == set(EMPIRICAL_METHODS)
    assert {m for m, f in fam.items() if f == "certified"} == set(CERTIFIED_METHODS)
    assert {m for m, f in fam.items() if f == "distillation"} == set(DISTILLATION_METHODS)
    assert method_family("no-such-method") == "other"
    assert effective_alpha(_cfg("adv-dist")) == 0.0 and effective_alpha(_cfg("ibp-dist")) == 1.0
    assert effective_alpha(_cfg("cc-dist")) == 0.4 and effective_alpha(_cfg("sabr")) == 0.4


def test_registering_a_method_is_one_class(parts):
    @register_method("test-zero")
    class Zero(Method):
        category = "empirical"

        def loss(self, b):
            b.logs["zero"] = 0.0
            return (b.model(b.x) * 0).sum()

    try:
        assert method_names("empirical")[-1] == "test-zero"
        model, teacher, x, y = parts
        loss, logs = training_loss(copy.deepcopy(model), x, y, _cfg("test-zero"), EPS, False, PGD(1, 0.1))
        assert loss.item() == 0.0 and logs["zero"] == 0.0
        with pytest.raises(ValueError, match="registered twice"):
            register_method("test-zero")(Zero)
    finally:
        base._REGISTRY.pop("test-zero", None)
    with pytest.raises(ValueError, match="category"):
        register_method("test-bad")(type("Bad", (Method,), {}))
