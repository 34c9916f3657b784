"""certkd tune end to end on digits with tiny trials: pruning, report, resume after SIGKILL, two processes."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")

from certkd.config import TrainConfig, resolve_config  # noqa: E402
from certkd.errors import CertkdError  # noqa: E402
from certkd.reporting.tune import load_tune_study, write_tune_report  # noqa: E402
from certkd.tuning.objective import parse_objective  # noqa: E402
from certkd.tuning.space import parse_space  # noqa: E402
from certkd.tuning.study import TuneSettings, retry_cls_or_old, run_tune  # noqa: E402

SRC = str(Path(__file__).resolve().parents[2] / "src")
# tiny trials: a 16-unit MLP, PGD with 2 steps, on digits (1150 training, 287 validation points)
TINY = {"model": "mlp", "model_kwargs": {"hidden": [16]}, "test_attack_steps": 2, "test_interval": 100,
        "method": "standard"}
TINY_FLAGS = ["--preset", "digits-small", "--set", "model=mlp", "--set", "model_kwargs={hidden: [16]}",
              "--set", "test_attack_steps=2", "--set", "test_interval=100", "--set", "method=standard"]
STATES = optuna.trial.TrialState


def _settings(out, space, n, epochs=2, **kw):
    return TuneSettings(out=Path(out), space=parse_space(space), objective=parse_objective(kw.pop("objective", "clean")),
                        n_trials=n, preset="digits-small", sets=dict(TINY, epochs=epochs), **kw)


@pytest.fixture(scope="module")
def pruned_study(tmp_path_factory):
    """4 trials: lr 1e-9 cannot reach 30% validation accuracy in its first epoch and is pruned there by the
    threshold pruner; lr 0.05 passes it and completes both epochs. The seeded sampler picks both."""
    out = tmp_path_factory.mktemp("tune") / "t"
    s = _settings(out, {"lr": {"choices": [1.0e-9, 0.05]}}, 4, pruner="threshold:0.3", prune_warmup=0,
                  sampler_seed=0)
    summary = run_tune(s, log=lambda line: None)
    return out, summary


def test_pruning_cuts_weak_trials_at_their_first_epoch(pruned_study):
    out, summary = pruned_study
    study = load_tune_study(out)
    trials = study.get_trials()
    assert summary["done"] == 4 and len(trials) == 4 and summary["ran"] == 4
    by_lr = {lr: [t for t in trials if t.params["lr"] == lr] for lr in (1e-9, 0.05)}
    assert by_lr[1e-9] and by_lr[0.05]  # the seeded sampler tried both
    for t in by_lr[1e-9]:
        assert t.state == STATES.PRUNED and list(t.intermediate_values) == [1]
        assert t.intermediate_values[1] < 0.3
        assert (out / t.user_attrs["run_dir"] / "checkpoints" / "epoch-0001").is_dir()  # kept when pruned
    for t in by_lr[0.05]:
        assert t.state == STATES.COMPLETE and list(t.intermediate_values) == [1, 2]
        assert t.value == t.intermediate_values[2] == t.user_attrs["val"]["clean"] >= 0.3
        assert t.user_attrs["config"]["val_fraction"] == 0.2  # the default validation split
        assert (out / t.user_attrs["run_dir"] / "checkpoints" / "epoch-0002").is_dir()
    # rerunning the finished study runs nothing more
    assert run_tune(_settings(out, {"lr": {"choices": [1.0e-9, 0.05]}}, 4, pruner="threshold:0.3", prune_warmup=0),
                    log=lambda line: None)["ran"] == 0


def test_rerun_with_other_settings_is_refused(pruned_study):
    out, _ = pruned_study
    with pytest.raises(CertkdError, match="was started with another space"):
        run_tune(_settings(out, {"lr": {"choices": [0.01, 0.05]}}, 4), log=lambda line: None)


def test_report_writes_plots_and_a_best_preset_that_reloads(pruned_study, tmp_path):
    out, _ = pruned_study
    s = write_tune_report(out, tmp_path / "report")
    for name in ("report.md", "history.png", "intermediate.png", "best.yaml", "trials.csv"):
        assert (tmp_path / "report" / name).is_file(), name
    # fANOVA ranks lr, or says in a note why it cannot (too few complete trials)
    assert (tmp_path / "report" / "importances.png").is_file() or any("importances" in n for n in s["notes"])
    best = load_tune_study(out).best_trial
    cfg = resolve_config(str(tmp_path / "report" / "best.yaml"))
    assert cfg == TrainConfig.from_dict(best.user_attrs["config"]) and cfg.lr == 0.05
    rows = (tmp_path / "report" / "trials.csv").read_text().splitlines()
    assert rows[0].startswith("number,state,clean,epochs_reported,lr") and len(rows) == 5


def test_pareto_study_and_its_report(tmp_path):
    out = tmp_path / "p"
    s = _settings(out, {"lr": {"low": 0.01, "high": 0.1, "log": True}}, 2, objective="clean,ibp", sampler_seed=0)
    run_tune(s, log=lambda line: None)
    study = load_tune_study(out)
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MAXIMIZE"]
    assert all(t.state == STATES.COMPLETE and not t.intermediate_values for t in study.trials)
    r = write_tune_report(out, tmp_path / "report")
    assert (tmp_path / "report" / "pareto.png").is_file() and r["best"]
    for path in r["best"]:
        resolve_config(path)
    with pytest.raises(CertkdError, match="cannot prune a multi-objective"):
        run_tune(_settings(tmp_path / "q", {"lr": {"low": 0.01, "high": 0.1}}, 2, objective="clean,ibp",
                           pruner="median"), log=lambda line: None)


def _tune_cmd(out, n, epochs, extra=()):
    return [sys.executable, "-m", "certkd", "tune", *TINY_FLAGS, "--set", f"epochs={epochs}", "--space",
            str(out.parent / "space.yaml"), "--objective", "clean", "--trials", str(n), "--out", str(out),
            "--pruner", "none", "--heartbeat", "1", "--threads", "1", *extra]


def _env():
    return dict(os.environ, PYTHONPATH=SRC, OMP_NUM_THREADS="1", CERTKD_THREADS="1")


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_resume_after_a_kill_retries_the_killed_trial(tmp_path):
    (tmp_path / "space.yaml").write_text("lr: {low: 0.01, high: 0.1, log: true}\n")
    out = tmp_path / "t"
    cmd = _tune_cmd(out, 2, 10)
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = out / "trials" / "trial-0000" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.is_file() and metrics.read_text().strip()) and time.time() < deadline:
        time.sleep(0.2)
    assert metrics.is_file(), "the first trial never finished an epoch"
    proc.send_signal(signal.SIGKILL)  # mid-trial: epoch 1 (or 2) of 10 done
    proc.wait()
    study = load_tune_study(out)
    assert [t.state for t in study.trials] == [STATES.RUNNING]
    killed_params = study.trials[0].params
    time.sleep(2.5)  # past the grace period (2 heartbeats): the killed trial is stale
    done = subprocess.run(_tune_cmd(out, 2, 3), env=_env(), capture_output=True, text=True)
    # another epochs: the study's settings differ, so the rerun is refused
    assert done.returncode == 2 and "was started with another sets" in done.stderr
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    trials = load_tune_study(out).trials
    assert trials[0].state == STATES.FAIL
    assert sum(t.state == STATES.COMPLETE for t in trials) == 2 and len(trials) == 3
    retry = retry_cls_or_old(optuna.storages)
    retried = [t for t in trials if retry.retried_trial_number(t) == 0]
    assert len(retried) == 1 and retried[0].params == killed_params and retried[0].state == STATES.COMPLETE


@pytest.mark.slow
def test_two_processes_share_one_sqlite_study(tmp_path):
    (tmp_path / "space.yaml").write_text("lr: {low: 0.01, high: 0.1, log: true}\n")
    out = tmp_path / "t"
    procs = [subprocess.Popen(_tune_cmd(out, 6, 3), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [r[1] for r in results]
    trials = load_tune_study(out).trials
    assert [t.number for t in trials] == list(range(6)) and all(t.state == STATES.COMPLETE for t in trials)
    dirs = [t.user_attrs["run_dir"] for t in trials]
    assert len(set(dirs)) == 6 and all((out / d / "checkpoints" / "epoch-0003").is_dir() for d in dirs)
    ran = [int(r[0].split("(")[-1].split(" run by")[0]) for r in results]
    assert sum(ran) == 6, [r[0] for r in results]
    # each trial was run once: its number appears in one process's log only
    starts = [{int(line.split()[1].rstrip(":")) for line in r[0].splitlines() if "→" in line} for r in results]
    assert not (starts[0] & starts[1]) and starts[0] | starts[1] == set(range(6))
