"""Issue #11: the feature adapter on the student's side, and the zero-target control (docs/method.md §7.8, §7.9)."""
import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from certkd import resolve_config, train
from certkd.attacks import PGD, linf_box
from certkd.bounds import interval_bounds
from certkd.checkpoints import load_model
from certkd.cli import main
from certkd.errors import CertkdError
from certkd.models import create_model
from certkd.training.step import Teacher, training_loss

QUIET = dict(progress=False, log=lambda s: None)


def _student_and_teacher(seed: int = 0):
    torch.manual_seed(seed)
    student = create_model("cnn-small", 1, 8, 10)          # m_S = 100
    teacher_net = create_model("mlp", 1, 8, 10, hidden=[64]).eval()  # m_T = 64
    for p in teacher_net.parameters():
        p.requires_grad_(False)
    adapter = nn.Linear(student.feature_dim, teacher_net.feature_dim)
    return student, Teacher(model=teacher_net, adapter=adapter)


# --------------------------------------------------------------------------- adapter on the student's side

def test_adapter_maps_student_features_and_box_exactly():
    student, teacher = _student_and_teacher()
    x = torch.rand(6, 1, 8, 8)
    lo, hi = linf_box(x, 0.1)
    fb = interval_bounds(student.features, lo, hi, point=x)
    v, l2, u2 = teacher.adapt(fb.point_output, fb.lower, fb.upper)
    w, b = teacher.adapter.weight, teacher.adapter.bias
    c, r = (fb.upper + fb.lower) / 2, (fb.upper - fb.lower) / 2
    torch.testing.assert_close(v, fb.point_output @ w.T + b)
    torch.testing.assert_close(l2, c @ w.T + b - r @ w.abs().T)
    torch.testing.assert_close(u2, c @ w.T + b + r @ w.abs().T)
    assert v.shape == (6, 64) and teacher.targets(x).shape == (6, 64)
    # sound: A(h(x')) lies in the mapped box for points x' of the input box
    with torch.no_grad():
        for _ in range(20):
            xp = lo + (hi - lo) * torch.rand_like(x)
            ap = teacher.adapter(student.features(xp))
            assert (ap >= l2 - 1e-5).all() and (ap <= u2 + 1e-5).all()
    # without a box only the point is mapped; without an adapter nothing changes
    assert teacher.adapt(fb.point_output)[1:] == (None, None)
    same = Teacher(model=teacher.model).adapt(fb.point_output, fb.lower, fb.upper)
    assert same[0] is fb.point_output and same[1] is fb.lower and same[2] is fb.upper


def test_teacher_target_is_fixed_and_gets_no_gradient():
    """The target is the fixed teacher feature: training steps (student + adapter) leave it unchanged, it carries
    no graph, and the distance reaches no teacher-side parameter, while the adapter and the student learn."""
    student, teacher = _student_and_teacher()
    cfg = resolve_config("digits-small", {"method": "cc-dist", "teacher": "t", "feature_adapter": "linear",
                                          "beta": 1.0})
    x, y = torch.rand(32, 1, 8, 8), torch.randint(0, 10, (32,))
    t0 = teacher.targets(x)
    assert not t0.requires_grad and t0.grad_fn is None
    teacher_before = copy.deepcopy(teacher.model.state_dict())
    adapter_before = copy.deepcopy(teacher.adapter.state_dict())
    # make teacher parameters trainable for the check: the distance must still not reach them
    for p in teacher.model.parameters():
        p.requires_grad_(True)
    params = list(student.parameters()) + list(teacher.adapter.parameters())
    opt = torch.optim.Adam(params, lr=1e-2)
    attack = PGD(1, 10.0)
    for step in range(3):
        for eps_sched, reg in ((0.0, False), (0.05, True)):  # warm-up batch and robust batch
            loss, logs = training_loss(student, x, y, cfg, eps_sched, reg, attack, teacher)
            assert logs["dist"] > 0
            opt.zero_grad(set_to_none=True)
            for p in teacher.model.parameters():
                p.grad = None
            loss.backward()
            assert all(p.grad is None for p in teacher.model.parameters())
            assert teacher.adapter.weight.grad is not None and teacher.adapter.weight.grad.abs().sum() > 0
            opt.step()
            torch.testing.assert_close(teacher.targets(x), t0, rtol=0, atol=0)
    assert all(torch.equal(v, teacher_before[k]) for k, v in teacher.model.state_dict().items())
    assert not torch.equal(teacher.adapter.weight, adapter_before["weight"])


def test_adapter_run_checkpoints_and_resumes(tmp_path):
    teacher = tmp_path / "mlp-teacher"
    train(resolve_config("digits-small", {"method": "standard", "model": "mlp", "epochs": 1, "eval_limit": 10,
                                          "model_kwargs": {"hidden": [64]}}), teacher, **QUIET)
    common = {"method": "cc-dist", "teacher": str(teacher), "feature_adapter": "linear", "beta": 0.01,
              "eps_start": 1, "eps_length": 1, "eval_limit": 10, "test_interval": 1}
    run = train(resolve_config("digits-small", dict(common, epochs=1)), tmp_path / "s", **QUIET)
    ck = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    opt = load_file(str(ck / "optimizer.safetensors"))
    assert opt["extra.student_adapter.weight"].shape == (64, 100)   # student (100) → teacher (64)
    cfg2 = resolve_config("digits-small", dict(common, epochs=2))
    (run / "config.yaml").write_text(__import__("yaml").safe_dump(cfg2.to_dict()))
    train(cfg2, run, resume=True, **QUIET)
    records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2] and records[-1]["train"]["dist"] > 0


# --------------------------------------------------------------------------- dist_target: zero

def test_dist_target_config_validation():
    cfg = resolve_config("digits-small", {"method": "cc-dist", "dist_target": "zero"})   # no teacher needed
    assert cfg.dist_target == "zero" and cfg.teacher is None
    assert resolve_config("digits-small").dist_target == "teacher"
    with pytest.raises(CertkdError, match="--teacher"):
        resolve_config("digits-small", {"method": "cc-dist"})
    with pytest.raises(CertkdError, match="unknown dist_target 'zeros'.*did you mean 'zero'"):
        resolve_config("digits-small", {"method": "cc-dist", "dist_target": "zeros"})
    with pytest.raises(CertkdError, match="cc-ibp-kd"):
        resolve_config("digits-small", {"method": "cc-ibp-kd", "dist_target": "zero"})
    with pytest.raises(CertkdError, match="feature adapter"):
        resolve_config("digits-small", {"method": "cc-dist", "dist_target": "zero", "feature_adapter": "linear"})


def test_dist_target_zero_trains_without_teacher_and_distils_towards_zero(tmp_path, capsys):
    out = tmp_path / "zero"
    main(["train", "--preset", "digits-small", "--method", "cc-dist", "--dist-target", "zero", "--beta", "0.003",
          "--epochs", "1", "--set", "eps_start=1", "--set", "eps_length=1", "--set", "eval_limit=20",
          "--out", str(out), "--quiet"])
    rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["train"]["eps"] > 0 and rec["train"]["dist"] > 0
    stored = __import__("yaml").safe_load((out / "config.yaml").read_text())
    assert stored["dist_target"] == "zero" and stored["teacher"] is None

    # The distillation term of the trained student is its distance to 0.
    model = load_model(out).train()
    x, y = torch.rand(32, 1, 8, 8), torch.randint(0, 10, (32,))
    attack = PGD(1, 10.0)
    zcfg = lambda **kw: resolve_config("digits-small", dict({"dist_target": "zero", "beta": 0.003}, **kw))
    # warm-up batch: mean_batch ||h(x)||²
    _, logs = training_loss(model, x, y, zcfg(method="cc-dist"), 0.0, False, attack, None)
    with torch.no_grad():
        expected = model.features(x).pow(2).sum(1).mean().item()
    assert logs["dist"] == pytest.approx(expected, rel=1e-5)
    # α = 1 (ibp-dist): the worst case of ||v||² over the feature box is ||u||² (features are >= 0)
    eps = 0.05
    _, logs = training_loss(model, x, y, zcfg(method="ibp-dist"), eps, False, attack, None)
    with torch.no_grad():
        lo, hi = linf_box(x, eps)
        u = interval_bounds(model.features, lo, hi, point=x).upper
    assert logs["dist"] == pytest.approx(u.pow(2).sum(1).mean().item(), rel=1e-5)

    # cc-dist (α = 0.5, box combination): the same as distilling a teacher whose features are all 0
    class ZeroFeatures(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def features(self, x):
            return x.new_zeros(x.shape[0], self.m)

    results = []
    for cfg, teacher in ((zcfg(method="cc-dist"), None),
                         (resolve_config("digits-small", {"method": "cc-dist", "teacher": "t", "beta": 0.003}),
                          Teacher(model=ZeroFeatures(model.feature_dim)))):
        torch.manual_seed(5)
        loss, logs = training_loss(model, x, y, cfg, eps, True, attack, teacher)
        results.append((loss.item(), logs["dist"]))
    assert results[0] == results[1] and results[0][1] > 0
