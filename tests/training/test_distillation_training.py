"""Issue 3 end to end: teachers, CC-Dist and its variants through the training loop."""
import json

import pytest
import torch
from safetensors.torch import load_file

from certkd import evaluate_run, resolve_config, train
from certkd.attacks import PGD
from certkd.cli import main
from certkd.errors import CertkdError
from certkd.models import create_model
from certkd.training.step import Teacher, training_loss

QUIET = dict(progress=False, log=lambda s: None)


def _weights(run):
    ck = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    return load_file(str(ck / "model.safetensors"))


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    common = {"epochs": 15, "eps": 0.1}
    train(resolve_config("digits-small", dict(common, method="pgd-at"), teacher=True), root / "pgd", **QUIET)
    train(resolve_config("digits-small", dict(common, method="standard"), teacher=True), root / "std", **QUIET)
    return root


@pytest.mark.slow
def test_pgd_at_teacher_is_more_robust_than_standard(teachers):
    pgd = evaluate_run(teachers / "pgd", eps=0.1)
    std = evaluate_run(teachers / "std", eps=0.1)
    assert pgd["clean_accuracy"] >= 0.85
    assert pgd["pgd_accuracy"] >= std["pgd_accuracy"] + 0.15, (pgd, std)


@pytest.mark.slow
def test_beta_zero_reproduces_ccibp_weights(teachers, tmp_path):
    common = {"epochs": 3, "eps_start": 1, "eps_length": 2, "test_interval": 3, "eval_limit": 20}
    a = train(resolve_config("digits-small", dict(common, method="cc-ibp")), tmp_path / "cc", **QUIET)
    b = train(resolve_config("digits-small", dict(common, method="cc-dist", beta=0.0, teacher=str(teachers / "pgd"))),
              tmp_path / "dist", **QUIET)
    wa, wb = _weights(a), _weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    c = train(resolve_config("digits-small", dict(common, method="cc-dist", beta=1.0, teacher=str(teachers / "pgd"))),
              tmp_path / "dist1", **QUIET)
    wc = _weights(c)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


def test_beta_zero_same_loss_and_gradients():
    torch.manual_seed(0)
    student = create_model("cnn-small", 1, 8, 10)
    teacher = Teacher(create_model("cnn-small", 1, 8, 10).eval())
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    attack = PGD(1, 10.0)
    out = {}
    for method in ("cc-ibp", "cc-dist"):
        cfg = resolve_config("digits-small", {"method": method, "beta": 0.0, "teacher": "t" if method == "cc-dist" else None})
        student.zero_grad()
        torch.manual_seed(1)
        loss, _ = training_loss(student, x, y, cfg, 0.05, True, attack, teacher)
        loss.backward()
        out[method] = (loss.detach(), [p.grad.clone() for p in student.parameters()])
    assert torch.equal(out["cc-ibp"][0], out["cc-dist"][0])
    assert all(torch.equal(g1, g2) for g1, g2 in zip(out["cc-ibp"][1], out["cc-dist"][1]))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["cc-dist", "mtl-dist", "exp-dist", "sabr-dist", "adv-dist", "ibp-dist", "cc-ibp-kd"])
def test_every_distillation_method_trains(teachers, tmp_path, method):
    cfg = resolve_config("digits-small", {"method": method, "teacher": str(teachers / "pgd"), "epochs": 2,
                                          "eps_start": 1, "eps_length": 1, "test_interval": 2, "eval_limit": 30,
                                          "beta": 0.1})
    run = train(cfg, tmp_path / method, **QUIET)
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert "dist" in last["train"] and last["train"]["dist"] >= 0
    assert last["train"]["loss"] == last["train"]["loss"]


@pytest.mark.slow
def test_distillation_during_warmup_uses_clean_features(teachers, tmp_path):
    cfg = resolve_config("digits-small", {"method": "cc-dist", "teacher": str(teachers / "pgd"), "epochs": 1,
                                          "eps_start": 2, "eps_length": 1, "eval_limit": 10})
    run = train(cfg, tmp_path / "warm", **QUIET)
    rec = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["train"]["eps"] == 0.0 and rec["train"]["dist"] > 0


@pytest.mark.slow
def test_projection_when_attack_box_is_larger(teachers, tmp_path):
    cfg = resolve_config("digits-small", {"method": "cc-dist", "teacher": str(teachers / "pgd"), "epochs": 2,
                                          "eps_start": 1, "eps_length": 1, "attack_eps_factor": 2.1,
                                          "attack_steps": 3, "attack_step_size": 0.5, "eval_limit": 10})
    run = train(cfg, tmp_path / "proj", **QUIET)
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["train"]["dist"] >= 0


def test_feature_dimension_mismatch_is_a_clear_error(tmp_path, capsys):
    teacher = tmp_path / "mlp-teacher"
    train(resolve_config("digits-small", {"method": "standard", "model": "mlp", "epochs": 1, "eval_limit": 10,
                                          "model_kwargs": {"hidden": [64]}}), teacher, **QUIET)
    with pytest.raises(SystemExit) as exc:
        main(["train", "--preset", "digits-small", "--method", "cc-dist", "--teacher", str(teacher),
              "--out", str(tmp_path / "s"), "--quiet"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "teacher features have 64 dimensions but student features have 100" in err
    assert "--feature-adapter linear" in err
    cfg = resolve_config("digits-small", {"method": "cc-dist", "teacher": str(teacher), "feature_adapter": "linear",
                                          "epochs": 1, "eval_limit": 10})
    run = train(cfg, tmp_path / "adapted", **QUIET)
    assert (run / "metrics.jsonl").exists()


@pytest.mark.slow
def test_teacher_command_and_side_by_side_table(teachers, tmp_path, capsys):
    out = tmp_path / "t"
    main(["teacher", "--preset", "digits-small", "--epochs", "1", "--out", str(out), "--quiet",
          "--set", "eval_limit=10"])
    cfg = json.loads(json.dumps(__import__("yaml").safe_load((out / "config.yaml").read_text())))
    assert cfg["method"] == "pgd-at" and cfg["attack_steps"] == 10
    main(["evaluate", str(out), str(teachers / "pgd"), "--limit", "30"])
    table = capsys.readouterr().out
    assert str(out) in table and str(teachers / "pgd") in table and "IBP-verified" in table
