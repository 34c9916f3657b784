"""certkd tune at the command line: one-line errors, Optuna missing included (no Optuna needed here)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parents[2] / "src")
# runs `certkd ARGS` in a fresh interpreter; NO_OPTUNA=1 makes `import optuna` fail as when it is not installed
CODE = ("import os, sys\nif os.environ.get('NO_OPTUNA'):\n    sys.modules['optuna'] = None\n"
        "from certkd.cli import main\nmain(sys.argv[1:])\n")


def _certkd(*args, no_optuna=False):
    env = dict(os.environ, PYTHONPATH=SRC, CERTKD_THREADS="1")
    if no_optuna:
        env["NO_OPTUNA"] = "1"
    return subprocess.run([sys.executable, "-c", CODE, *args], capture_output=True, text=True, env=env)


def test_tune_without_optuna_names_the_extra(tmp_path):
    (tmp_path / "space.yaml").write_text("lr: {low: 0.001, high: 0.01}\n")
    r = _certkd("tune", "--space", str(tmp_path / "space.yaml"), "--out", str(tmp_path / "t"), no_optuna=True)
    assert r.returncode == 2 and r.stderr == ("error: certkd tune needs Optuna, which is not installed: "
                                             "pip install 'certkd[tune]'\n")
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize("args, message", [
    (["--objective", "clean,ibp", "--pruner", "median"], "Optuna cannot prune a multi-objective (Pareto) study"),
    (["--objective", "verified"], "unknown metric 'verified'"),
    (["--trials", "0"], "--trials must be >= 1"),
    (["--set", "alpha=3"], "alpha must be in [0, 1]"),
    (["--storage", "nosuchdb://x"], "--storage nosuchdb://x: "),
])
def test_tune_bad_input_is_one_line(tmp_path, capsys, args, message):
    pytest.importorskip("optuna")
    from certkd.cli import main

    (tmp_path / "space.yaml").write_text("lr: {low: 0.001, high: 0.01}\n")
    with pytest.raises(SystemExit) as e:
        main(["tune", "--preset", "digits-small", "--space", str(tmp_path / "space.yaml"), "--out",
              str(tmp_path / "t"), *args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(err.splitlines()) == 1, err
    if "--storage" not in args:
        assert not (tmp_path / "t").exists()  # refused before anything was written
