"""What a new user meets in the first hour (issue 14): --epochs that rescales the schedule, --eps 2/255,
--threads, preset descriptions, TensorBoard logging, plain logs when stderr is not a terminal, and
error messages that name the Python arguments in the Python API."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import certkd.training
from certkd.cli import main
from certkd.config import list_presets, resolve_config
from certkd.errors import CertkdError
from certkd.sweep import plan_sweep
from certkd.threads import default_threads

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_bad_input import fake_mnist  # noqa: E402  (the tests' tiny MNIST writer)


def _records(run: Path):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _capture_train(monkeypatch):
    """Replace the training function the CLI calls; returns the list of (cfg, out, kwargs, threads)."""
    calls = []

    def fake(cfg, out, **kw):
        calls.append((cfg, out, kw, torch.get_num_threads()))
        return Path(out)

    monkeypatch.setattr(certkd.training, "train", fake)
    return calls


@pytest.fixture(autouse=True)
def _one_thread_after():
    yield
    torch.set_num_threads(1)  # commands here set other thread counts; the rest of the suite uses one


# ---------------------------------------------------------------- --epochs rescales the schedule

def test_epochs_rescales_ramp_and_milestones_of_the_defaults_and_of_a_preset():
    cfg = resolve_config(None, {"epochs": 5})  # TrainConfig: 70 epochs, ramp 1..20, milestones 50, 60
    assert (cfg.eps_start, cfg.eps_length) == (1, 1) and cfg.lr_milestones == [4, 4]
    cfg = resolve_config("digits-small", {"epochs": 3})  # preset: 40 epochs, ramp 2..16, milestones 30, 36
    assert cfg.eps_start + cfg.eps_length - 1 <= 3 and cfg.eps_length >= 1
    assert cfg.lr_milestones == [2, 3]
    cfg = resolve_config("digits-small", {"epochs": 80})  # longer: stretched
    assert (cfg.eps_start, cfg.eps_length, cfg.lr_milestones) == (3, 30, [60, 72])
    assert resolve_config("digits-small").eps_length == 15  # the preset itself is unchanged


def test_an_explicit_schedule_key_wins_over_the_rescaling():
    cfg = resolve_config("digits-small", {"epochs": 4, "eps_length": 10, "lr_milestones": [39]})
    assert cfg.eps_length == 10 and cfg.lr_milestones == [39]
    assert cfg.eps_start == 1  # not given: rescaled


def test_cli_epochs_and_set_epochs_rescale_alike(monkeypatch, tmp_path):
    calls = _capture_train(monkeypatch)
    main(["train", "--preset", "digits-small", "--epochs", "3", "--out", str(tmp_path / "a")])
    main(["train", "--preset", "digits-small", "--set", "epochs=3", "--out", str(tmp_path / "b")])
    main(["train", "--preset", "digits-small", "--epochs", "3", "--set", "eps_length=12", "--out", str(tmp_path / "c")])
    a, b, c = (call[0] for call in calls)
    assert a == b and a.eps_length <= 3
    assert c.eps_length == 12


def test_sweep_over_epochs_rescales_each_run(tmp_path):
    runs = plan_sweep(tmp_path, "digits-small", ["epochs=2,40"], [0])
    by_epochs = {r.config.epochs: r.config for r in runs}
    assert by_epochs[40].eps_length == 15 and by_epochs[2].eps_start + by_epochs[2].eps_length - 1 <= 2


def test_mnist_with_epochs_5_reaches_the_target_eps_by_its_last_epoch(tmp_path, capsys):
    """The README's `--method mtl-ibp --epochs 5` example without a preset, on a tiny fake MNIST."""
    data = fake_mnist(tmp_path / "mnist", 28, n=64)
    out = tmp_path / "m"
    main(["train", "--dataset", "mnist", "--data-dir", str(data), "--model", "cnn-small", "--eps", "0.1",
          "--method", "mtl-ibp", "--epochs", "5", "--batch-size", "32", "--set", "eval_limit=16", "--out", str(out)])
    records = _records(out)
    assert [r["epoch"] for r in records] == [1, 2, 3, 4, 5]
    assert records[-1]["train"]["eps"] == pytest.approx(0.1)  # every batch of the last epoch at the target
    main(["evaluate", str(out), "--limit", "16"])
    assert "training ε reached only" not in capsys.readouterr().err


def test_evaluate_warns_when_training_eps_stayed_below_the_evaluation_eps(tmp_path, capsys):
    out = tmp_path / "short"
    main(["train", "--preset", "digits-small", "--epochs", "2", "--set", "eps_length=10", "--set", "eval_limit=20",
          "--out", str(out)])
    capsys.readouterr()
    main(["evaluate", str(out), "--limit", "20"])
    captured = capsys.readouterr()
    assert "warning:" in captured.err and "training ε reached only" in captured.err and "ε=0.05" in captured.err
    assert "trained to ε=" in captured.out  # and the table marks the row
    ev = json.loads((out / "evaluation.json").read_text())
    assert ev["training"]["final_training_eps"] < 0.05
    main(["evaluate", str(out), "--limit", "20", "--eps", "0.001"])  # within what it trained for: no warning
    assert "training ε reached only" not in capsys.readouterr().err


# ---------------------------------------------------------------- --eps 2/255 everywhere

@pytest.mark.parametrize("command", ["train", "teacher"])
def test_eps_fraction_in_train_and_teacher(monkeypatch, tmp_path, command):
    calls = _capture_train(monkeypatch)
    main([command, "--preset", "digits-small", "--eps", "2/255", "--out", str(tmp_path / "r")])
    assert calls[0][0].eps == pytest.approx(2 / 255)


@pytest.mark.parametrize("command,extra", [("evaluate", []), ("verify", []),
                                           ("export", ["--onnx", "m.onnx", "--vnnlib-dir", "p"])])
def test_eps_fraction_in_evaluate_verify_export(command, extra):
    from certkd.cli import cli

    ctx = cli.commands[command].make_context(command, ["runs/x", "--eps", "8/255"] + extra)
    assert ctx.params["eps"] == pytest.approx(8 / 255)


def test_eps_fraction_in_sweep_set_and_grid(tmp_path):
    runs = plan_sweep(tmp_path, "digits-small", ["eps=2/255,8/255"], [0], ["alpha=1/2"])
    assert sorted(r.config.eps for r in runs) == pytest.approx([2 / 255, 8 / 255])
    assert runs[0].config.alpha == 0.5 and runs[0].name.startswith("eps=2-255")


@pytest.mark.parametrize("bad", ["2/0", "two", "1/2/3"])
def test_bad_eps_is_one_line(tmp_path, capsys, bad):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--preset", "digits-small", "--eps", bad, "--out", str(tmp_path / "r")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "2/255" in err


# ---------------------------------------------------------------- --threads

def test_threads_option_sets_torch_threads_for_train(monkeypatch, tmp_path):
    calls = _capture_train(monkeypatch)
    main(["train", "--preset", "digits-small", "--threads", "3", "--out", str(tmp_path / "r")])
    assert calls[0][3] == 3


@pytest.mark.parametrize("command", ["evaluate", "verify", "sweep", "demo"])
def test_threads_option_on_evaluate_verify_sweep_demo(monkeypatch, tmp_path, command):
    import certkd.evaluation
    import certkd.sweep
    import certkd.verification.pipeline as pipeline

    seen = []

    class Stop(Exception):
        pass

    def stop(*a, **k):
        seen.append(torch.get_num_threads())
        raise Stop

    monkeypatch.setattr(certkd.evaluation, "evaluate_run", stop)
    monkeypatch.setattr(pipeline, "verify_run", stop)
    monkeypatch.setattr(certkd.sweep, "run_sweep", stop)
    monkeypatch.setattr(certkd.training, "train", stop)
    argv = {"evaluate": ["evaluate", "runs/x"], "verify": ["verify", "runs/x", "--eps", "0.1"],
            "sweep": ["sweep", "--preset", "digits-small", "--out", str(tmp_path / "s")],
            "demo": ["demo", "--out", str(tmp_path / "d")]}[command]
    with pytest.raises(Stop):
        main(argv + ["--threads", "2"])
    assert seen == [2]


def test_default_threads(monkeypatch):
    monkeypatch.setenv("CERTKD_THREADS", "3")
    assert default_threads() == 3
    monkeypatch.delenv("CERTKD_THREADS")
    monkeypatch.setattr("certkd.threads.usable_cores", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (3.6, 3.0, 3.0))
    assert default_threads() == 1  # a busy 2-core machine: one thread
    monkeypatch.setattr(os, "getloadavg", lambda: (0.2, 0.1, 0.1))
    assert default_threads() == 2
    monkeypatch.setattr("certkd.threads.usable_cores", lambda: 64)
    assert default_threads() == 4
    monkeypatch.setenv("CERTKD_THREADS", "zero")
    with pytest.raises(CertkdError, match="CERTKD_THREADS"):
        default_threads()


# ---------------------------------------------------------------- presets and models describe themselves

def test_presets_and_models_print_one_line_descriptions(capsys):
    main(["presets"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(list_presets())
    for line in lines:
        name, _, description = line.partition("  ")
        assert name in list_presets() and len(description.strip()) > 10, line
    assert any(l.startswith("digits-small") and "digits" in l.split(None, 1)[1] for l in lines)
    main(["models"])
    assert all(len(line.split(None, 1)) == 2 for line in capsys.readouterr().out.splitlines())


# ---------------------------------------------------------------- logging

def test_no_progress_bar_when_stderr_is_not_a_terminal(tmp_path, capsys):
    main(["train", "--preset", "digits-small", "--epochs", "2", "--set", "eval_limit=20", "--out", str(tmp_path / "r")])
    captured = capsys.readouterr()
    assert "\r" not in captured.err and "it/s" not in captured.err  # no tqdm bar in a log file
    assert [l.split(":")[0] for l in captured.out.splitlines() if l.startswith("epoch ")] == ["epoch 1", "epoch 2"]


def test_subprocess_log_has_one_line_per_epoch(tmp_path):
    env = dict(os.environ, CERTKD_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "certkd", "train", "--preset", "digits-small", "--epochs", "2",
                           "--set", "eval_limit=20", "--out", str(tmp_path / "r")], capture_output=True, text=True,
                          env=env)
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stderr and len(proc.stderr) < 200, proc.stderr
    assert sum(l.startswith("epoch ") for l in proc.stdout.splitlines()) == 2


class _FakeWriter:
    instances = []

    def __init__(self, log_dir, purge_step=None):
        self.log_dir, self.purge_step, self.points, self.closed = log_dir, purge_step, [], False
        _FakeWriter.instances.append(self)

    def add_scalar(self, tag, value, global_step):
        self.points.append((tag, value, global_step))

    def flush(self):
        pass

    def close(self):
        self.closed = True


def test_tensorboard_writes_the_metrics_jsonl_scalars(tmp_path, monkeypatch):
    import certkd.training.tblog as tblog

    monkeypatch.setattr(tblog, "summary_writer_class", lambda: _FakeWriter)
    _FakeWriter.instances.clear()
    out = tmp_path / "r"
    main(["train", "--preset", "digits-small", "--epochs", "2", "--set", "eval_limit=20", "--tensorboard",
          "--out", str(out)])
    (writer,) = _FakeWriter.instances
    assert writer.log_dir == str(out / "tensorboard") and writer.closed
    got = {(tag, step): value for tag, value, step in writer.points}
    for rec in _records(out):
        assert got[("train/loss", rec["epoch"])] == pytest.approx(rec["train"]["loss"])
        assert got[("train/eps", rec["epoch"])] == pytest.approx(rec["train"]["eps"])
        assert got[("lr", rec["epoch"])] == pytest.approx(rec["lr"])
        for key, value in rec.get("test", {}).items():
            if isinstance(value, float):
                assert got[(f"test/{key}", rec["epoch"])] == pytest.approx(value)
    assert {tag for tag, _ in got} == {tag for rec in _records(out) for tag in tblog.scalars(rec)}


def test_tensorboard_with_the_real_package(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "r"
    main(["train", "--preset", "digits-small", "--epochs", "2", "--set", "eval_limit=20", "--tensorboard",
          "--out", str(out)])
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    loss = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert loss == [(r["epoch"], pytest.approx(r["train"]["loss"])) for r in _records(out)]


def test_tensorboard_missing_is_one_line_naming_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    with pytest.raises(SystemExit) as exc:
        main(["train", "--preset", "digits-small", "--epochs", "1", "--tensorboard", "--out", str(tmp_path / "r")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'certkd[tensorboard]'" in err
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------- the Python API names Python arguments

def test_python_api_error_names_resume_and_force_arguments(tmp_path):
    out = tmp_path / "cc"
    out.mkdir()
    (out / "something").write_text("x")
    with pytest.raises(CertkdError) as exc:
        certkd.training.train(resolve_config("digits-small", {"epochs": 1}), out, progress=False, log=lambda s: None)
    msg = str(exc.value)
    assert "resume=True" in msg and "force=True" in msg and "--resume" not in msg and "--force" not in msg


def test_sweep_devices_split_the_threads_between_workers(tmp_path, monkeypatch):
    import concurrent.futures

    from certkd.sweep import run_sweep

    seen = {}

    class FakePool:
        def __init__(self, max_workers, mp_context, initializer, initargs):
            seen["workers"], seen["threads"] = max_workers, initargs[1]
            raise RuntimeError("stop")

    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", FakePool)
    with pytest.raises(RuntimeError, match="stop"):
        main(["sweep", "--preset", "digits-small", "--grid", "lr=0.001,0.002", "--set", "epochs=1", "--devices",
              "cpu,cpu", "--threads", "4", "--out", str(tmp_path / "s")])
    assert seen == {"workers": 2, "threads": 2}
