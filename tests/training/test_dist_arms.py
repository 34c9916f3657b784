"""Issue #21: the study's arms as options of certkd train (docs/method.md §7.4, §7.10, §7.11).

The scale-free distances (cosine, standardized), the label-only class-mean target and the box-width
penalty, each checked against a by-hand computation on a tiny network, refused where it makes no
sense, and trained for one epoch through the CLI.
"""
import json

import pytest
import torch
import yaml

from certkd import resolve_config, train
from certkd.attacks import PGD, linf_box
from certkd.bounds import interval_bounds
from certkd.cli import main
from certkd.errors import CertkdError
from certkd.models import create_model
from certkd.reporting import model_card
from certkd.training import loop
from certkd.training.step import Teacher, training_loss
from certkd.training.teacher_stats import feature_stats

QUIET = dict(progress=False, log=lambda s: None)
EPS = 0.05


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    student = create_model("cnn-small", 1, 8, 10)                 # no BatchNorm: train and eval mode agree
    net = create_model("cnn-small", 1, 8, 10).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    x, y = torch.rand(12, 1, 8, 8), torch.arange(12) % 10
    with torch.no_grad():
        stats = feature_stats(net.features(torch.rand(40, 1, 8, 8)), torch.arange(40) % 10, 10)
    return student, Teacher(net, stats=stats), x, y


def _dist(student, teacher, x, y, eps, **kw):
    cfg = resolve_config("digits-small", dict({"teacher": "t", "beta": 0.5}, **kw))
    _, logs = training_loss(student, x, y, cfg, eps, False, PGD(1, 10.0), teacher)
    return logs["dist"]


def _box(student, x, eps):
    lo, hi = linf_box(x, eps)
    with torch.no_grad():
        fb = interval_bounds(student.features, lo, hi, point=x)
    return fb.lower, fb.upper


def test_class_mean_target_by_hand():
    student, teacher, x, y = _setup()
    m = teacher.stats.class_means[y]                                  # the target: the class's mean feature
    with torch.no_grad():
        h = student.features(x)
    got = _dist(student, teacher, x, y, 0.0, method="cc-dist", dist_target="class-mean")   # warm-up batch
    assert got == pytest.approx((h - m).pow(2).sum(1).mean().item(), rel=1e-6)
    lo, hi = _box(student, x, EPS)                                    # α = 1: the worst case over the box
    got = _dist(student, teacher, x, y, EPS, method="ibp-dist", dist_target="class-mean")
    want = torch.maximum((hi - m).abs(), (lo - m).abs()).pow(2).sum(1).mean().item()
    assert got == pytest.approx(want, rel=1e-5)
    # nothing per sample: two points of one class get one target
    assert torch.equal(m[0], m[10])


def test_standardized_distance_by_hand():
    student, teacher, x, y = _setup()
    s = teacher.stats.scale
    t = teacher.targets(x)
    with torch.no_grad():
        h = student.features(x)
    got = _dist(student, teacher, x, y, 0.0, method="cc-dist", dist_distance="standardized")
    assert got == pytest.approx(((h - t) * s).pow(2).sum(1).mean().item(), rel=1e-5)
    got = _dist(student, teacher, x, y, 0.0, method="cc-dist", dist_distance="standardized", dist_reduction="mean")
    assert got == pytest.approx(((h - t) * s).pow(2).mean(1).mean().item(), rel=1e-5)
    lo, hi = _box(student, x, EPS)
    got = _dist(student, teacher, x, y, EPS, method="ibp-dist", dist_distance="standardized")
    want = (torch.maximum((hi - t).abs(), (lo - t).abs()) * s).pow(2).sum(1).mean().item()
    assert got == pytest.approx(want, rel=1e-5)


def test_standardized_with_unit_std_is_l2sq_bit_for_bit():
    student, teacher, x, y = _setup()
    teacher.stats.scale = torch.ones_like(teacher.stats.scale)
    out = {}
    for dist in ("l2sq", "standardized"):
        cfg = resolve_config("digits-small", {"method": "cc-dist", "teacher": "t", "dist_distance": dist})
        student.zero_grad()
        torch.manual_seed(1)
        loss, _ = training_loss(student, x, y, cfg, EPS, True, PGD(1, 10.0), teacher)
        loss.backward()
        out[dist] = (loss.detach(), [p.grad.clone() for p in student.parameters()])
    assert torch.equal(out["l2sq"][0], out["standardized"][0])
    assert all(torch.equal(a, b) for a, b in zip(out["l2sq"][1], out["standardized"][1]))


def test_cosine_distance_through_the_method_by_hand():
    student, teacher, x, y = _setup()
    t = teacher.targets(x)
    with torch.no_grad():
        h = student.features(x)
    got = _dist(student, teacher, x, y, 0.0, method="cc-dist", dist_distance="cosine")
    want = (1 - (h * t).sum(1) / (h.norm(dim=1) * t.norm(dim=1))).mean().item()
    assert got == pytest.approx(want, rel=1e-5)
    # α = 1: the bound of docs/method.md §7.4 (features are >= 0 here, so p >= 0 and n_hi = |u|)
    lo, hi = _box(student, x, EPS)
    got = _dist(student, teacher, x, y, EPS, method="ibp-dist", dist_distance="cosine")
    p = torch.minimum(lo * t, hi * t).sum(1)
    assert (lo >= 0).all() and (p >= 0).all()
    want = (1 - p / (hi.norm(dim=1) * t.norm(dim=1))).mean().item()
    assert got == pytest.approx(want, rel=1e-5)


def test_box_width_penalty_by_hand():
    student, _, x, y = _setup()
    lo, hi = _box(student, x, EPS)
    for alpha in (0.0, 0.5):  # the box is propagated at α = 0 too
        cfg = resolve_config("digits-small", {"method": "cc-ibp-width", "alpha": alpha})
        _, logs = training_loss(student, x, y, cfg, EPS, False, PGD(1, 10.0), None)
        assert logs["dist"] == pytest.approx((hi - lo).pow(2).sum(1).mean().item(), rel=1e-5)
    cfg = resolve_config("digits-small", {"method": "cc-ibp-width", "dist_distance": "l1", "dist_reduction": "mean"})
    _, logs = training_loss(student, x, y, cfg, EPS, False, PGD(1, 10.0), None)
    assert logs["dist"] == pytest.approx((hi - lo).mean(1).mean().item(), rel=1e-5)
    # a warm-up batch has no box: no penalty
    _, logs = training_loss(student, x, y, cfg, 0.0, False, PGD(1, 10.0), None)
    assert "dist" not in logs


def test_box_width_at_beta_zero_is_cc_ibp_bit_for_bit():
    student, _, x, y = _setup()
    out = {}
    for method in ("cc-ibp", "cc-ibp-width"):
        cfg = resolve_config("digits-small", {"method": method, "beta": 0.0})
        student.zero_grad()
        torch.manual_seed(1)
        loss, _ = training_loss(student, x, y, cfg, EPS, True, PGD(1, 10.0), None)
        loss.backward()
        out[method] = (loss.detach(), [p.grad.clone() for p in student.parameters()])
    assert torch.equal(out["cc-ibp"][0], out["cc-ibp-width"][0])
    assert all(torch.equal(a, b) for a, b in zip(out["cc-ibp"][1], out["cc-ibp-width"][1]))


def test_missing_statistics_is_a_clear_error():
    student, teacher, x, y = _setup()
    cfg = resolve_config("digits-small", {"method": "cc-dist", "teacher": "t", "dist_target": "class-mean"})
    with pytest.raises(CertkdError, match="feature statistics"):
        training_loss(student, x, y, cfg, EPS, False, PGD(1, 10.0), Teacher(teacher.model))


@pytest.mark.parametrize("overrides, message", [
    ({"method": "cc-dist", "dist_target": "class-mean"}, "class-mean targets a teacher's mean feature.*--teacher"),
    ({"method": "cc-ibp-kd", "dist_target": "class-mean", "teacher": "t"}, "class-mean is for feature distillation"),
    ({"method": "cc-ibp-width", "teacher": "t"}, "uses no teacher; drop --teacher"),
    ({"method": "cc-ibp-width", "dist_target": "zero"}, "no distillation target; drop --dist-target zero"),
    ({"method": "cc-ibp-width", "dist_distance": "cosine"}, "not cosine"),
    ({"method": "cc-ibp-width", "dist_distance": "standardized"}, "not standardized"),
    ({"method": "cc-dist", "dist_target": "zero", "dist_distance": "standardized"}, "needs a teacher"),
    ({"method": "cc-dist", "dist_target": "zero", "dist_distance": "cosine"}, "constant"),
    ({"method": "cc-dist", "teacher": "t", "dist_distance": "cosine", "dist_reduction": "mean"},
     "dist_reduction sum"),
    ({"method": "cc-dist", "teacher": "t", "dist_distance": "cosine", "dist_combination": "literal"},
     "no 'literal' combination"),
])
def test_new_choices_refused_with_one_line(overrides, message):
    with pytest.raises(CertkdError, match=message) as e:
        resolve_config("digits-small", overrides)
    assert "\n" not in str(e.value)


def test_new_choices_accepted():
    assert resolve_config("digits-small", {"method": "cc-ibp-width"}).teacher is None
    for kw in ({"dist_target": "class-mean"}, {"dist_distance": "cosine"}, {"dist_distance": "standardized"},
               {"dist_distance": "standardized", "dist_target": "class-mean"}):
        cfg = resolve_config("digits-small", dict(kw, method="cc-dist", teacher="t"))
        assert all(getattr(cfg, k) == v for k, v in kw.items())


# --------------------------------------------------------------------------- one epoch through the CLI

@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "std"
    train(resolve_config("digits-small", {"method": "standard", "epochs": 1, "train_limit": 256, "eval_limit": 20},
                         teacher=True), out, **QUIET)
    return out


ARMS = {
    "class-mean": ["--method", "cc-dist", "--dist-target", "class-mean"],
    "cosine": ["--method", "cc-dist", "--dist-distance", "cosine"],
    "standardized": ["--method", "cc-dist", "--dist-distance", "standardized", "--dist-reduction", "mean"],
    "box-width": ["--method", "cc-ibp-width", "--dist-distance", "l1"],
}


@pytest.mark.parametrize("arm", sorted(ARMS))
def test_each_arm_trains_one_epoch_from_the_cli(arm, tiny_teacher, tmp_path, monkeypatch):
    computed = []
    real = loop.teacher_feature_stats
    monkeypatch.setattr(loop, "teacher_feature_stats",
                        lambda model, data, *a: computed.append(len(data)) or real(model, data, *a))
    out = tmp_path / arm
    teacher = [] if arm == "box-width" else ["--teacher", str(tiny_teacher)]
    main(["train", "--preset", "digits-small", *ARMS[arm], *teacher, "--beta", "0.01", "--epochs", "1",
          "--set", "eps_start=1", "--set", "eps_length=1", "--set", "eval_limit=20", "--set", "train_limit=256",
          "--out", str(out), "--quiet"])
    rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["train"]["eps"] > 0 and rec["train"]["dist"] > 0 and "test" in rec
    stored = yaml.safe_load((out / "config.yaml").read_text())
    flags = dict(zip(ARMS[arm][::2], ARMS[arm][1::2]))
    assert all(stored[f[2:].replace("-", "_")] == v for f, v in flags.items())
    # the teacher's statistics are computed once, over the training points, and only where they are used
    assert computed == ([256] if arm in ("class-mean", "standardized") else [])
    if arm == "cosine":
        assert rec["train"]["dist"] <= 2.0
    card = model_card(out)
    if arm == "box-width":
        assert "penalty on the student's feature box (no teacher" in card and "distance `l1`" in card
    if arm == "class-mean":
        assert "distillation target: the teacher's mean feature of each class" in card


def test_default_distillation_computes_no_statistics(tiny_teacher, tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "teacher_feature_stats", lambda *a: pytest.fail("statistics computed"))
    cfg = resolve_config("digits-small", {"method": "cc-dist", "teacher": str(tiny_teacher), "epochs": 1,
                                          "train_limit": 64, "eval_limit": 10, "eps_start": 1, "eps_length": 1})
    train(cfg, tmp_path / "default", **QUIET)
