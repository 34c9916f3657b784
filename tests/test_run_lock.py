"""Issue 19, data loss: two writers of one run directory.

Two concurrent ``certkd train`` (or ``verify --force``) into one ``--out`` both used to exit 0, one
run's weights were lost and metrics.jsonl interleaved both. Now the folder is locked for writing
(:func:`certkd.runs.lock_run_dir`): exactly one writer runs, the other exits 2 with one line naming the
holder, and a lock left by a killed process blocks nothing.

The first tests hold the lock from a small child process (no torch: milliseconds); the ``slow`` ones
race the real CLI against itself.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List

import pytest

import certkd.run_lock as run_lock
from certkd.errors import CertkdError
from certkd.runs import LOCK_FILE, clear_run_dir, is_run_dir, lock_run_dir, run_entries

ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CERTKD_THREADS="1")
HOLDER = """
import sys
from certkd.run_lock import lock_run_dir  # not certkd.runs: no torch, a child that starts in milliseconds
with lock_run_dir(sys.argv[1], "certkd train"):
    print("locked", flush=True)
    sys.stdin.readline()
"""


def _hold(path: Path) -> subprocess.Popen:
    """A child process holding the lock on ``path`` until its stdin is closed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    assert proc.stdout.readline().strip() == "locked", proc.stderr.read()
    return proc


def _release(proc: subprocess.Popen) -> None:
    proc.stdin.close()
    assert proc.wait(timeout=30) == 0, proc.stderr.read()


def test_second_writer_gets_one_line_naming_the_holder(tmp_path):
    out = tmp_path / "run"
    holder = _hold(out)
    try:
        with pytest.raises(CertkdError) as e:
            with lock_run_dir(out, "certkd verify"):
                pass
        msg = str(e.value)
        assert "\n" not in msg
        assert msg.startswith(f"{out} is being written by pid {holder.pid} (certkd train, started ")
        assert msg.endswith("); wait for it to finish or choose another --out")
        started = msg.split("started ")[1].split(")")[0]
        assert time.strptime(started, "%H:%M:%S")  # today: the time of day only
        record = json.loads((out / LOCK_FILE).read_text())
        assert record["pid"] == holder.pid and record["command"] == "certkd train"
    finally:
        _release(holder)
    assert not (out / LOCK_FILE).exists()  # released: the holder removed its file...
    assert not out.exists()  # ...and the folder it created for the lock, which holds nothing else
    with lock_run_dir(out, "certkd verify") as lock:  # free again
        assert lock.held and json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()


def test_lock_of_a_killed_process_blocks_nothing(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = _hold(out)
    holder.send_signal(signal.SIGKILL)
    assert holder.wait(timeout=30) == -signal.SIGKILL
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == holder.pid  # the file is left behind...
    with lock_run_dir(out, "certkd train") as lock:  # ...but the kernel released its flock
        assert lock.held and json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert list(out.iterdir()) == []  # the stale file is gone too; a folder that existed stays


def test_lock_file_is_not_part_of_a_run(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_FILE).write_text("")  # a stale, empty lock file (killed before it wrote its holder)
    assert not is_run_dir(out) and run_entries(out) == []
    (out / "metrics.jsonl").write_text("{}\n")
    (out / "checkpoints").mkdir()
    assert sorted(p.name for p in run_entries(out)) == ["checkpoints", "metrics.jsonl"]
    clear_run_dir(out)
    assert [p.name for p in out.iterdir()] == [LOCK_FILE]


def test_unreadable_holder_is_still_refused(tmp_path, monkeypatch):
    """A holder whose record cannot be read (it has just locked, or the file was emptied): still refused."""
    monkeypatch.setattr(run_lock, "_HOLDER_READ_TRIES", 2)
    holder = _hold(tmp_path / "run")
    try:
        (tmp_path / "run" / LOCK_FILE).write_text("")  # same file, record wiped
        with pytest.raises(CertkdError, match=r"run is being written by another process; wait for it to finish"):
            with lock_run_dir(tmp_path / "run", "certkd train"):
                pass
    finally:
        _release(holder)


def test_same_process_shares_one_lock(tmp_path):
    """``sweep`` locks a run, then trains it (which locks it again): one lock, released by the outer block."""
    with lock_run_dir(tmp_path / "r", "certkd sweep") as outer:
        with lock_run_dir(tmp_path / "r", "certkd train") as inner:
            assert inner is outer
        assert (tmp_path / "r" / LOCK_FILE).exists()
    assert not (tmp_path / "r").exists()


def test_failed_command_leaves_no_stub_folder(tmp_path):
    out = tmp_path / "a" / "b" / "run"
    with pytest.raises(CertkdError, match="bad flag"):
        with lock_run_dir(out, "certkd train"):
            assert (out / LOCK_FILE).exists()
            raise CertkdError("bad flag")
    assert list(tmp_path.iterdir()) == []
    with lock_run_dir(out, "certkd train"):
        (out / "config.yaml").write_text("{}")
    assert [p.name for p in out.iterdir()] == ["config.yaml"]  # results are kept, the lock file is not


def test_paths_that_cannot_be_locked_are_left_to_the_callers_checks(tmp_path):
    (tmp_path / "file").write_text("x")
    for path in (tmp_path / "file", tmp_path / "file" / "run"):
        with lock_run_dir(path, "certkd train") as lock:
            assert not lock.held
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


def test_without_fcntl_writing_goes_on_unlocked(tmp_path, monkeypatch):
    monkeypatch.setattr(run_lock, "fcntl", None)
    with lock_run_dir(tmp_path / "run", "certkd train") as lock:
        assert not lock.held and (tmp_path / "run").is_dir() and not (tmp_path / "run" / LOCK_FILE).exists()
    assert not (tmp_path / "run").exists()  # still no stub folder


def test_train_refuses_while_the_folder_is_locked(tmp_path, capsys):
    """The real ``certkd train``, ``verify`` and ``evaluate`` entry points meet the lock before anything else."""
    import yaml

    from certkd.checkpoints import save_checkpoint
    from certkd.cli import main
    from certkd.config import resolve_config
    from certkd.models import create_model

    run = tmp_path / "trained"  # an untrained 8×8 MLP saved as a run, in milliseconds
    net = create_model("mlp", 1, 8, 10, hidden=[8])
    cfg = resolve_config("digits-small", {"method": "standard", "model": "mlp", "model_kwargs": {"hidden": [8]},
                                          "epochs": 1})
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    save_checkpoint(run, 1, net, {"model": net.spec.to_dict(), "config": cfg.to_dict(), "dataset": "digits"})
    out = tmp_path / "run"
    verify = ["--force", "--quiet", "--limit", "2", "--engine", "none"]
    for locked, args in ((out, ["train", "--preset", "digits-small", "--epochs", "1", "--quiet", "--force", "--out", out]),
                         (out, ["verify", run, "--out", out] + verify),
                         (run, ["verify", run] + verify),  # in place: the run's own folder
                         (run, ["evaluate", run, "--limit", "2"])):  # writes evaluation.json there
        before = sorted(p.name for p in locked.iterdir()) if locked.exists() else []
        holder = _hold(locked)
        try:
            with pytest.raises(SystemExit) as e:
                main([str(a) for a in args])
            err = capsys.readouterr().err
            assert e.value.code == 2 and err.count("\n") == 1, err
            assert f"{locked} is being written by pid {holder.pid} (certkd train" in err
            assert sorted(p.name for p in locked.iterdir()) == sorted(before + [LOCK_FILE])  # nothing written
        finally:
            _release(holder)


# ------------------------------------------------------------------------------------- real races

TRAIN = ["train", "--preset", "digits-small", "--method", "standard", "--model", "mlp", "--set",
         "model_kwargs={hidden: [32, 32]}", "--set", "eval_limit=10", "--set", "test_interval=100", "--quiet"]


def _start(args: List[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "certkd", *map(str, args)], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _race(args: List[str]):
    """Start two identical commands at once; (winner, loser) with their (stdout, stderr)."""
    procs = [_start(args), _start(args)]
    results = [(p, *p.communicate(timeout=600)) for p in procs]
    codes = sorted(p.returncode for p, _, _ in results)
    assert codes == [0, 2], [(p.returncode, err[-2000:]) for p, _, err in results]
    winner = next(r for r in results if r[0].returncode == 0)
    loser = next(r for r in results if r[0].returncode == 2)
    line = loser[2]
    assert line.count("\n") == 1 and "Traceback" not in line, line
    assert f"is being written by pid {winner[0].pid} (certkd " in line and "choose another --out" in line, line
    return winner, loser


@pytest.mark.slow
def test_two_concurrent_trains_one_wins_intact(tmp_path):
    out = tmp_path / "run"
    epochs = 15
    _race(TRAIN + ["--epochs", epochs, "--force", "--out", out])
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["epoch"] for l in lines] == list(range(1, epochs + 1))  # one run's metrics, in order
    from certkd.checkpoints import load_model

    model = load_model(out)
    assert model.certkd_meta["epoch"] == epochs
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "config.yaml", "metrics.jsonl"]


@pytest.mark.slow
def test_two_concurrent_verify_force_one_wins_complete(tmp_path):
    run = tmp_path / "run"
    assert subprocess.run([sys.executable, "-m", "certkd", *map(str, TRAIN + ["--epochs", "2", "--out", run])],
                          env=ENV, capture_output=True).returncode == 0
    out = tmp_path / "v"
    _race(["verify", run, "--limit", "120", "--engine", "none", "--quiet", "--force", "--out", out])
    summary = json.loads((out / "verification.json").read_text())
    assert summary["n"] == 120 and summary["complete"]
    rows = [json.loads(l) for l in (out / "verification.jsonl").read_text().splitlines()]
    assert len(rows) == 120 and len({r["index"] for r in rows}) == 120
    assert sorted(p.name for p in out.iterdir()) == ["verification.json", "verification.jsonl"]


def _kill_when(proc: subprocess.Popen, ready) -> None:
    deadline = time.monotonic() + 300
    while not ready():
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL


@pytest.mark.slow
def test_lock_left_by_killed_train_and_verify_blocks_nothing(tmp_path):
    out = tmp_path / "run"
    proc = _start(TRAIN + ["--epochs", "10000", "--out", out])
    _kill_when(proc, lambda: (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().count("\n") >= 1)
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == proc.pid  # left behind by the killed run
    done = subprocess.run([sys.executable, "-m", "certkd", *map(str, TRAIN + ["--epochs", "2", "--force", "--out", out])],
                          env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert not (out / LOCK_FILE).exists()

    v = tmp_path / "v"
    proc = _start(["verify", out, "--limit", "360", "--engine", "none", "--quiet", "--out", v])
    _kill_when(proc, lambda: any(p.stat().st_size for p in v.glob("verification.part*.jsonl")))
    assert json.loads((v / LOCK_FILE).read_text())["pid"] == proc.pid
    done = subprocess.run([sys.executable, "-m", "certkd", "verify", str(out), "--limit", "5", "--engine", "none",
                           "--quiet", "--force", "--out", str(v)], env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads((v / "verification.json").read_text())["n"] == 5
    assert sorted(p.name for p in v.iterdir()) == ["verification.json", "verification.jsonl"]


def test_sweep_records_a_locked_run_as_failed_and_goes_on(tmp_path):
    """Two sweeps sharing an --out: a run the other holds is `failed` with the holder's name; the
    train/resume/skip decision is taken again under the lock, so a run finished meanwhile is not retrained."""
    import certkd.sweep as sweep

    sets = ["method=standard", "model=mlp", "model_kwargs={hidden: [16]}", "epochs=1", "eval_limit=10",
            "test_attack_steps=2"]
    out = tmp_path / "s"
    holder = _hold(out / "seed=0")
    try:
        s = sweep.run_sweep(out, "digits-small", [], seeds="0,1", sets=sets, log=lambda line: None)
    finally:
        _release(holder)
    entries = {e["name"]: e for e in s["runs"]}
    assert entries["seed=0"]["status"] == "failed" and entries["seed=1"]["status"] == "complete"
    assert entries["seed=0"]["error"].startswith(f"{out / 'seed=0'} is being written by pid {holder.pid} (certkd train")
    assert not (out / "seed=0").exists()  # the holder created it for its lock only, and removed it

    run = sweep.plan_sweep(out, "digits-small", [], seeds="1", sets=sets)[0]
    before = (run.path / "metrics.jsonl").read_bytes()
    upd = sweep._run_one(run, "new", False, None, False, lambda line: None)  # "new" when the sweep started
    assert upd["action"] == "skipped" and (run.path / "metrics.jsonl").read_bytes() == before
    assert not (run.path / LOCK_FILE).exists()
