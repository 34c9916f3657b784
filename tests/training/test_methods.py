"""The registry of training methods (certkd.methods): each method's loss is the one it documents.

For a fixed batch, every registered method's loss (through ``training_loss``) is compared with
the loss computed by hand from the parts of certkd.losses, certkd.bounds and certkd.attacks on
a copy of the same model with the same random seed.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

from certkd.attacks import PGD, linf_box
from certkd.bounds import ibp_logit_difference_bounds, logit_differences
from certkd.config import (CERTIFIED_METHODS, DISTILLATION_METHODS, EMPIRICAL_METHODS, METHODS, TrainConfig)
from certkd.losses import certified as L
from certkd.losses import distillation as D
from certkd.methods import Method, base, method_class, method_names, register_method
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


def _applied(parts, method):
    model, teacher, x, y = parts
    cfg = _cfg(method)
    m = copy.deepcopy(model)
    torch.manual_seed(1)
    loss, _ = training_loss(m, x, y, cfg, EPS, False, PGD(cfg.attack_steps, cfg.attack_step_size), teacher)
    return loss


def _adversarial(model, cfg, x, y):
    """Clean forward (BN statistics), then the training attack, as the procedure does."""
    torch.manual_seed(1)
    logits = model(x)
    lo, hi = linf_box(x, EPS)
    x_adv = PGD(cfg.attack_steps, cfg.attack_step_size)(model, x, y, lo, hi)
    return logits, lo, hi, x_adv


def _bounds(model, lo, hi, y, point):
    lb, fb = ibp_logit_difference_bounds(model, lo, hi, y, point=point)
    return lb, fb, logit_differences(model.head(fb.point_output), y)


def _taps(m, cfg, lo, hi, point, y):
    """(L_TAPS · L_IBP on the box (docs/method.md §5.9), the features' box); the gradient connector changes no value."""
    from certkd.bounds import interval_bounds
    from certkd.losses import taps as T
    ext, cls = T.split_network(m, cfg.taps_head_relus)
    latent = interval_bounds(ext, lo, hi, point)
    pts = T.pivotal_points(cls, latent.lower, latent.upper, y, cfg.taps_steps, cfg.taps_step_size)
    lb, margins, fb = T.head_bounds(cls, latent, pts, y)
    return L.ibp_loss(margins) * L.ibp_loss(lb), fb


def _by_hand(parts, method):
    model, teacher, x, y = parts
    cfg, m = _cfg(method), copy.deepcopy(parts[0])
    alpha, beta, t = cfg.alpha, cfg.beta, teacher.targets(x)
    dist = dict(distance=cfg.dist_distance, reduction=cfg.dist_reduction)
    if method == "standard":
        return F.cross_entropy(m(x), y)
    if method in ("ibp", "crown-ibp"):  # crown-ibp at ε_s = ε: β = 0, IBP alone (β > 0: tests/bounds/test_crown_ibp.py)
        lo, hi = linf_box(x, EPS)
        return L.ibp_loss(_bounds(m, lo, hi, y, x)[0])
    if method in ("taps", "staps", "taps-dist", "staps-dist"):
        if method.startswith("staps"):
            _, lo, hi, x_adv = _adversarial(m, cfg, x, y)
            loss, fb = _taps(m, cfg, *L.sabr_box(x_adv, lo, hi, alpha, EPS), x_adv, y)
        else:
            torch.manual_seed(1)
            loss, fb = _taps(m, cfg, *linf_box(x, EPS), x, y)
        if method.endswith("-dist"):  # as sabr-dist: the worst case over the features' IBP box
            loss = loss + beta * D.worst_case_feature_distance(fb.lower, fb.upper, t, **dist).mean()
        return loss
    logits, lo, hi, x_adv = _adversarial(m, cfg, x, y)
    if method == "pgd-at":
        return F.cross_entropy(m(x_adv), y)
    if method == "trades":
        torch.manual_seed(1)
        m = copy.deepcopy(parts[0])
        logits = m(x)
        kl_attack = PGD(cfg.attack_steps, cfg.attack_step_size, loss_fn=L.trades_kl)
        x_adv = kl_attack(m, x, logits.detach(), lo, hi)
        return F.cross_entropy(logits, y) + cfg.trades_beta * L.trades_kl(m(x_adv), logits).mean()
    if method in ("sabr", "sabr-dist"):
        slo, shi = L.sabr_box(x_adv, lo, hi, alpha, EPS)
        lb, fb, _ = _bounds(m, slo, shi, y, x_adv)
        loss = L.ibp_loss(lb)
        if method == "sabr-dist":
            loss = loss + beta * D.worst_case_feature_distance(fb.lower, fb.upper, t, **dist).mean()
        return loss
    if method == "adv-dist":  # α = 0: no IBP pass, adversarial loss plus the plain feature distance
        a = m.features(x_adv)
        d_adv = logit_differences(m.head(a), y)
        return L.adversarial_loss(d_adv) + beta * D.feature_distance(a, t, **dist).mean()
    lb, fb, d_adv = _bounds(m, lo, hi, y, x_adv)
    a = fb.point_output
    if method in ("cc-ibp", "cc-ibp-kd", "cc-ibp-width"):
        loss = L.cc_ibp_loss(lb, d_adv, alpha)
        if method == "cc-ibp-kd":
            loss = loss + beta * D.logit_distillation_loss(m.head(a), teacher.logits(x_adv), cfg.kd_temperature)
        if method == "cc-ibp-width":  # docs/method.md §7.11: the distance between the feature box's corners
            loss = loss + beta * D.feature_distance(fb.upper, fb.lower, **dist).mean()
        return loss
    if method in ("mtl-ibp", "mtl-dist"):
        loss = L.mtl_ibp_loss(lb, d_adv, alpha)
        if method == "mtl-dist":
            loss = loss + beta * D.mtl_dist_distance(a, fb.lower, fb.upper, t, alpha, **dist).mean()
        return loss
    if method in ("exp-ibp", "exp-dist"):
        loss = L.exp_ibp_loss(lb, d_adv, alpha)
        if method == "exp-dist":
            loss = loss + beta * D.exp_dist_distance(a, fb.lower, fb.upper, t, alpha, **dist)
        return loss
    if method in ("cc-dist", "ibp-dist"):
        alpha = 1.0 if method == "ibp-dist" else alpha
        return L.cc_ibp_loss(lb, d_adv, alpha) + beta * D.cc_dist_distance(
            a, fb.lower, fb.upper, t, alpha, cfg.dist_combination, **dist).mean()
    raise AssertionError(f"no hand-computed loss for method '{method}'")


@pytest.mark.parametrize("method", METHODS)
def test_method_loss_is_the_documented_one(parts, method):
    expected = _by_hand(parts, method)
    applied = _applied(parts, method)
    assert torch.isfinite(applied)
    assert torch.allclose(applied, expected, rtol=1e-6, atol=1e-7), (method, applied.item(), expected.item())


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
