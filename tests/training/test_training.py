"""End-to-end training on bundled digits: acceptance figures, resume, run layout."""
import json

import pytest
import torch
from safetensors.torch import load_file

import certkd.training.loop as loop
from certkd import evaluate_run, load_model, resolve_config, train
from certkd.cli import main


def _weights(run):
    ck = (run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip())
    return load_file(str(ck / "model.safetensors"))


@pytest.fixture(scope="module")
def ccibp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "cc"
    train(resolve_config("digits-small", {"method": "cc-ibp"}), out, progress=False, log=lambda s: None)
    return out


def test_digits_small_ccibp_meets_acceptance(ccibp_run):
    """Issue 2: cc-ibp on digits-small reaches IBP-verified >= 50% and clean >= 85%."""
    res = evaluate_run(ccibp_run)
    assert res["n"] == 360 and res["eps"] == pytest.approx(0.05)
    assert res["ibp_verified_accuracy"] >= 0.50, res
    assert res["clean_accuracy"] >= 0.85, res
    assert res["ibp_verified_accuracy"] <= res["pgd_accuracy"] <= res["clean_accuracy"]
    stored = json.loads((ccibp_run / "evaluation.json").read_text())
    assert set(stored) >= {"clean_accuracy", "pgd_accuracy", "ibp_verified_accuracy", "eps", "n"}


def test_standard_training_is_not_certified(tmp_path):
    out = tmp_path / "std"
    train(resolve_config("digits-small", {"method": "standard", "epochs": 15}), out, progress=False, log=lambda s: None)
    res = evaluate_run(out)
    assert res["clean_accuracy"] >= 0.9
    assert res["ibp_verified_accuracy"] <= 0.02


def test_run_layout_and_load_model(ccibp_run):
    assert (ccibp_run / "config.yaml").exists()
    lines = (ccibp_run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 40 and json.loads(lines[-1])["epoch"] == 40
    assert "test" in json.loads(lines[-1])
    model = load_model(ccibp_run)
    assert not model.training
    x = torch.rand(3, 1, 8, 8)
    assert model(x).shape == (3, 10)
    assert model.features(x).shape == (3, 100)


def test_evaluate_limit_and_cli(ccibp_run, capsys):
    main(["evaluate", str(ccibp_run), "--limit", "50"])
    out = capsys.readouterr().out
    assert "n=50" in out and "IBP-verified" in out
    assert json.loads((ccibp_run / "evaluation.json").read_text())["n"] == 50


class _Interrupt(Exception):
    pass


def test_resume_gives_same_weights_as_uninterrupted(tmp_path, monkeypatch):
    cfg = resolve_config("digits-small", {"method": "cc-ibp", "epochs": 4, "eps_length": 2, "test_interval": 2})
    full = train(cfg, tmp_path / "full", progress=False, log=lambda s: None)

    real_save = loop.save_checkpoint

    def crash_after_epoch_2(run_dir, epoch, *a, **k):
        path = real_save(run_dir, epoch, *a, **k)
        if epoch == 2:
            raise _Interrupt()
        return path

    monkeypatch.setattr(loop, "save_checkpoint", crash_after_epoch_2)
    with pytest.raises(_Interrupt):
        train(cfg, tmp_path / "cut", progress=False, log=lambda s: None)
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    train(cfg, tmp_path / "cut", resume=True, progress=False, log=lambda s: None)
    a, b = _weights(full), _weights(tmp_path / "cut")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert len((tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()) == 4


def test_same_seed_same_weights(tmp_path):
    cfg = resolve_config("digits-small", {"method": "cc-ibp", "epochs": 2, "eps_start": 1, "eps_length": 1})
    a = _weights(train(cfg, tmp_path / "a", progress=False, log=lambda s: None))
    b = _weights(train(cfg, tmp_path / "b", progress=False, log=lambda s: None))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", ["ibp", "mtl-ibp", "exp-ibp", "sabr", "pgd-at", "trades"])
def test_every_method_trains(tmp_path, method):
    cfg = resolve_config("digits-small", {"method": method, "epochs": 3, "eps_start": 1, "eps_length": 1,
                                          "test_interval": 3, "eval_limit": 50})
    run = train(cfg, tmp_path / method, progress=False, log=lambda s: None)
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["train"]["eps"] == pytest.approx(0.05)
    assert 0.0 <= last["test"]["ibp_verified_accuracy"] <= last["test"]["clean_accuracy"]
    assert last["train"]["loss"] == last["train"]["loss"]  # not NaN


def test_train_limit_trains_on_a_fixed_subset(tmp_path, monkeypatch):
    seen = []
    real = loop.iterate_batches

    def spy(dataset, *args, **kwargs):
        seen.append(dataset.labels.clone())
        return real(dataset, *args, **kwargs)

    monkeypatch.setattr(loop, "iterate_batches", spy)
    for name, seed in (("a", 100), ("b", 7)):
        cfg = resolve_config("digits-small", {"epochs": 1, "eps_start": 1, "eps_length": 1, "eval_limit": 20,
                                              "train_limit": 200, "seed": seed})
        run = train(cfg, tmp_path / name, progress=False, log=lambda s: None)
        assert json.loads((run / "metrics.jsonl").read_text())["epoch"] == 1
    assert [len(s) for s in seen] == [200, 200]
    assert torch.equal(seen[0], seen[1])  # the subset does not depend on the run's seed


def test_force_with_a_bad_flag_keeps_the_old_run_and_a_refused_run_writes_nothing(tmp_path):
    """--force only deletes the old run once data, model and teacher have loaded."""
    from certkd.cli import main

    cfg = resolve_config("digits-small", {"method": "standard", "model": "mlp", "epochs": 1, "eval_limit": 10,
                                          "model_kwargs": {"hidden": [16]}})
    run = train(cfg, tmp_path / "run", progress=False, log=lambda s: None)
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    for argv in (["--dataset", "mnist", "--data-dir", str(tmp_path / "nowhere")],
                 ["--method", "cc-dist", "--teacher", str(tmp_path / "no-teacher")]):
        with pytest.raises(SystemExit) as exc:
            main(["train", "--preset", "digits-small", "--model", "mlp", "--epochs", "1", *argv,
                  "--out", str(run), "--force"])
        assert exc.value.code == 2
        assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
    with pytest.raises(SystemExit):
        main(["train", "--preset", "digits-small", "--dataset", "mnist", "--data-dir", str(tmp_path / "nowhere"),
              "--out", str(tmp_path / "fresh")])
    assert not (tmp_path / "fresh").exists()
