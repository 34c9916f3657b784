"""CLI behaviour: bad input exits with code 2 and one line naming the problem."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from certkd.cli import main

BAD_INPUTS = [
    (["train", "--preset", "digits-small", "--method", "foo", "--out", "{tmp}/a"], "unknown method 'foo'"),
    (["train", "--dataset", "imagenet", "--out", "{tmp}/a"], "unknown dataset 'imagenet'"),
    (["train", "--preset", "digits-small", "--eps", "-0.1", "--out", "{tmp}/a"], "eps must be in (0, 1]"),
    (["train", "--preset", "digits-small", "--eps", "1.5", "--out", "{tmp}/a"], "eps must be in (0, 1]"),
    (["train", "--dataset", "mnist", "--data-dir", "{tmp}/missing", "--out", "{tmp}/a"], "does not exist"),
    (["train", "--preset", "digits-small", "--out", "{tmp}/never", "--resume"], "--resume: no checkpoint"),
    (["train", "--preset", "nope", "--out", "{tmp}/a"], "unknown preset 'nope'"),
    (["train", "--preset", "digits-small", "--set", "alpah=0.3", "--out", "{tmp}/a"], "did you mean 'alpha'"),
    (["train", "--preset", "digits-small", "--alpha", "1.5", "--out", "{tmp}/a"], "alpha must be in [0, 1]"),
    (["train", "--preset", "digits-small", "--method", "cc-dist", "--out", "{tmp}/a"], "--teacher"),
    (["train", "--preset", "digits-small", "--model", "resnet", "--out", "{tmp}/a"], "unknown model 'resnet'"),
    (["train", "--bogus"], "No such option"),
    (["evaluate", "{tmp}/nothing"], "no such run or checkpoint"),
    (["export", "{tmp}/nothing", "--onnx", "{tmp}/m.onnx", "--vnnlib-dir", "{tmp}/p"], "no such run or checkpoint"),
]


@pytest.mark.parametrize("argv,expected", BAD_INPUTS, ids=[" ".join(a[:3]) + "…" + e[:20] for a, e in BAD_INPUTS])
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, argv, expected):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ")
    assert expected in err


def test_existing_output_dir_needs_resume_or_force(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "something").write_text("x")
    with pytest.raises(SystemExit) as exc:
        main(["train", "--preset", "digits-small", "--out", str(out)])
    assert exc.value.code == 2
    assert "--resume" in capsys.readouterr().err and (out / "something").exists()


def test_help_on_every_command(capsys):
    for cmd in ["train", "teacher", "evaluate", "verify", "export", "report", "card", "sweep", "tune", "demo",
                "presets", "models"]:
        main([cmd, "--help"])  # returns normally (exit code 0)
        assert "Usage" in capsys.readouterr().out


def test_console_script_prints_no_traceback(tmp_path):
    exe = Path(sys.executable).parent / "certkd"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "certkd"]
    proc = subprocess.run(cmd + ["train", "--preset", "digits-small", "--eps", "-1", "--out", str(tmp_path / "a")],
                          capture_output=True, text=True, env=dict(os.environ))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path, capsys):
    """certkd demo: teacher → CC-IBP and CC-Dist students → table with a complete-verifier column."""
    main(["demo", "--out", str(tmp_path / "demo"), "--epochs", "4", "--verify-limit", "20", "--verify-timeout", "2",
          "--quiet"])
    out = capsys.readouterr().out
    table = [line for line in out.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in table[0].split("|")[1:-1]]
    assert header[:7] == ["run", "clean", "PGD", "IBP-verified", "verified", "n", "verified n"]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in table[1:]}
    assert set(rows) == {"teacher", "cc-ibp", "cc-dist"}
    assert rows["teacher"][3] == "–" and rows["cc-ibp"][3].endswith("%") and rows["cc-dist"][3].endswith("%")
    assert rows["cc-ibp"][4:6] == ["360", "20"]  # IBP on the whole test set, the complete verifier on 20 points
    for name in ("cc-ibp", "cc-dist"):
        v = json.loads((tmp_path / "demo" / name / "verification.json").read_text())
        assert v["n"] == 20 and f"{100 * v['verified_accuracy']:.1f}%" == rows[name][3]
        # complete verification never certifies fewer points than IBP on the same ones
        assert v["verified_accuracy"] >= v["ibp_verified_accuracy"]
