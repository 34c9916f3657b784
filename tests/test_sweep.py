"""certkd sweep: cartesian grid × seeds, sequential, resumable, sweep.json."""
import json

import pytest
import torch

import certkd.evaluation
import certkd.training
from certkd import reporting
from certkd.cli import cli, main
from certkd.errors import CertkdError
from certkd.sweep import parse_grid, plan_sweep, run_sweep, split_values

# the cheapest runs: standard training, 1 epoch, in-training test on 10 points with PGD-2
SETS = ["method=standard", "epochs=1", "eval_limit=10", "test_attack_steps=2"]


def _quiet(_):
    pass


@pytest.fixture
def counters(monkeypatch):
    calls = {"train": [], "evaluate": []}
    train, evaluate = certkd.training.train, certkd.evaluation.evaluate_run

    def counting_train(cfg, out, **kw):
        calls["train"].append((out.name, kw.get("resume", False)))
        return train(cfg, out, **kw)

    def counting_evaluate(path, **kw):
        calls["evaluate"].append(path.name)
        return evaluate(path, **kw)

    monkeypatch.setattr(certkd.training, "train", counting_train)
    monkeypatch.setattr(certkd.evaluation, "evaluate_run", counting_evaluate)
    return calls


def test_grid_runs_once_then_skips(tmp_path, counters):
    out = tmp_path / "sweep"
    grid = ["lr=0.001,0.003", "alpha=0.1,0.5"]
    s = run_sweep(out, "digits-small", grid, seeds=None, sets=SETS + ["seed=3"], evaluate=True, eval_limit=10,
                  log=_quiet)
    names = ["lr=0.001_alpha=0.1_seed=3", "lr=0.001_alpha=0.5_seed=3", "lr=0.003_alpha=0.1_seed=3",
             "lr=0.003_alpha=0.5_seed=3"]
    assert [r["name"] for r in s["runs"]] == names
    assert sorted(counters["train"]) == [(n, False) for n in names]
    assert sorted(counters["evaluate"]) == names
    stored = json.loads((out / "sweep.json").read_text())
    assert stored["counts"] == {"complete": 4} and stored["grid"] == {"lr": [0.001, 0.003], "alpha": [0.1, 0.5]}
    assert all(r["action"] == "trained" and r["epoch"] == 1 and r["evaluation"]["n"] == 10 for r in stored["runs"])
    assert stored["runs"][2]["overrides"] == {"lr": 0.003, "alpha": 0.1}
    cfg = reporting.load_run(out / names[2]).config
    assert (cfg.lr, cfg.alpha, cfg.seed, cfg.method) == (0.003, 0.1, 3, "standard")
    assert "certkd sweep --preset digits-small --grid lr=0.001,0.003 --grid alpha=0.1,0.5" in stored["command"]

    counters["train"].clear()
    counters["evaluate"].clear()
    s = run_sweep(out, "digits-small", grid, sets=SETS + ["seed=3"], evaluate=True, eval_limit=10, log=_quiet)
    assert counters["train"] == [] and counters["evaluate"] == []
    assert [r["action"] for r in s["runs"]] == ["skipped"] * 4 and s["counts"] == {"complete": 4}

    # the sweep folder reports as one folder of runs, grouped by the grid keys
    rep = reporting.write_report([out], tmp_path / "report")
    assert rep["groups"] == ["standard α=0.1 lr=0.001", "standard α=0.1 lr=0.003", "standard α=0.5 lr=0.001",
                             "standard α=0.5 lr=0.003"]

    md = (tmp_path / "report" / "report.md").read_text()
    assert md.count(stored["command"]) == 1  # the sweep's one command instead of four train commands
    assert not [line for line in md.splitlines() if line.startswith("certkd train")]

    # the same folder with another configuration is refused before anything trains
    with pytest.raises(CertkdError, match="another configuration"):
        run_sweep(out, "digits-small", grid, sets=["method=standard", "epochs=2", "eval_limit=10", "seed=3"],
                  log=_quiet)
    assert counters["train"] == []


class Stop(Exception):
    pass


def test_partial_run_is_resumed(tmp_path, counters):
    out = tmp_path / "sweep"
    sets = ["method=standard", "epochs=2", "eval_limit=10", "test_attack_steps=2"]

    def stop_after_first_epoch(line):
        if line.startswith("epoch 1:"):
            raise Stop

    with pytest.raises(Stop):
        run_sweep(out, "digits-small", [], seeds="0", sets=sets, log=stop_after_first_epoch)
    assert json.loads((out / "sweep.json").read_text())["runs"][0]["status"] == "failed"
    counters["train"].clear()
    s = run_sweep(out, "digits-small", [], seeds=[0], sets=sets, log=_quiet)
    assert counters["train"] == [("seed=0", True)]
    assert s["runs"][0]["action"] == "resumed" and s["runs"][0]["epoch"] == 2


def test_bad_grids_fail_before_training(tmp_path, counters):
    with pytest.raises(CertkdError, match="did you mean 'alpha'"):
        run_sweep(tmp_path / "s", "digits-small", ["alpah=0.1,0.5"], seeds="0,1", sets=SETS, log=_quiet)
    with pytest.raises(CertkdError, match="alpha must be in"):  # the second combination is invalid
        run_sweep(tmp_path / "s", "digits-small", ["alpha=0.5,2"], sets=SETS, log=_quiet)
    with pytest.raises(CertkdError, match="--seeds"):
        run_sweep(tmp_path / "s", "digits-small", ["seed=0,1"], sets=SETS, log=_quiet)
    with pytest.raises(CertkdError, match="integers"):
        run_sweep(tmp_path / "s", "digits-small", [], seeds="0,x", sets=SETS, log=_quiet)
    with pytest.raises(CertkdError, match="KEY=V1"):
        run_sweep(tmp_path / "s", "digits-small", ["alpha"], sets=SETS, log=_quiet)
    with pytest.raises(CertkdError, match="both in --grid and --set"):
        run_sweep(tmp_path / "s", "digits-small", ["epochs=1,2"], sets=SETS, log=_quiet)
    with pytest.raises(CertkdError, match="unknown preset"):
        run_sweep(tmp_path / "s", "nope", ["alpha=0.1"], log=_quiet)
    assert counters["train"] == []


def test_grid_parsing():
    assert split_values("0.1,[30, 36],{a: 1}") == ["0.1", "[30, 36]", "{a: 1}"]
    assert parse_grid(["lr-milestones=[1,2],[3]"]) == [("lr_milestones", [("[1,2]", [1, 2]), ("[3]", [3])])]
    assert parse_grid({"beta": [0.1, 3]}) == [("beta", [("0.1", 0.1), ("3", 3)])]
    runs = plan_sweep("out", "digits-small", ["beta=0.1,1"], seeds=[0, 1],
                      sets={"method": "cc-dist", "teacher": "t"})
    assert [r.name for r in runs] == ["beta=0.1_seed=0", "beta=0.1_seed=1", "beta=1_seed=0", "beta=1_seed=1"]
    assert [r.config.beta for r in runs] == [0.1, 0.1, 1.0, 1.0]


@pytest.mark.skipif("sweep" not in cli.commands, reason="certkd sweep not registered in cli.py yet")
def test_cli_sweep(tmp_path, capsys):
    argv = ["sweep", "--preset", "digits-small", "--seeds", "0"] + [a for s in SETS for a in ("--set", s)]
    main(argv + ["--out", str(tmp_path / "s"), "--quiet"])
    assert (tmp_path / "s" / "seed=0" / "checkpoints" / "latest").exists()
    with pytest.raises(SystemExit) as exc:
        main(["sweep", "--preset", "digits-small", "--grid", "alpah=0.1", "--out", str(tmp_path / "t")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "did you mean 'alpha'" in err and len(err.splitlines()) == 1


def test_devices_run_in_worker_processes_and_match_sequential(tmp_path, capsys):
    """--devices cpu,cpu: two spawned workers share the queue; weights equal the in-process sweep."""
    from safetensors.torch import load_file

    from certkd.checkpoints import latest_checkpoint

    grid = ["lr=0.001,0.002"]
    seq = run_sweep(tmp_path / "seq", "digits-small", grid, [0], SETS, log=_quiet)
    par = run_sweep(tmp_path / "par", "digits-small", grid, [0], SETS, log=_quiet, devices="cpu,cpu")
    assert par["devices"] == ["cpu", "cpu"] and par["counts"] == {"complete": 2}
    for a, b in zip(seq["runs"], par["runs"]):
        assert b["action"] == "trained" and b["device"] == "cpu"
        assert (tmp_path / "par" / f"{b['name']}.log").read_text().startswith(f"{b['name']} on cpu")
        wa = load_file(str(latest_checkpoint(tmp_path / "seq" / a["dir"]) / "model.safetensors"))
        wb = load_file(str(latest_checkpoint(tmp_path / "par" / b["dir"]) / "model.safetensors"))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    again = run_sweep(tmp_path / "par", "digits-small", grid, [0], SETS, log=_quiet, devices="cpu,cpu")
    assert [r["action"] for r in again["runs"]] == ["skipped", "skipped"]
    with pytest.raises(SystemExit) as exc:
        main(["sweep", "--preset", "digits-small", "--out", str(tmp_path / "x"), "--devices", "cuda:7"])
    assert exc.value.code == 2
    assert "CUDA is not available" in capsys.readouterr().err or torch.cuda.is_available()
