"""certkd.run_plan: one planning of a command line for the CLI and for the commands that reports write.

The expected command lines below were produced by the code before the planning moved out of the
command line (reporting then parsed each candidate back through cli_train's click commands): the
commands that reproduce existing runs must not change.
"""
import json
import subprocess
import sys

import pytest

from certkd.config import resolve_config
from certkd.reporting import commands
from certkd.run_plan import SET, TrainRequest, parse_sweep_command
from certkd.sweep import sweep_command

# (preset, overrides, teacher, preset recorded by the run, out) -> the line the old code wrote
REPRODUCED = [
    (None, {"method": "cc-ibp", "epochs": 3}, False, None, "runs/plain", "certkd train --epochs 3 --out runs/plain"),
    ("digits-small", {"method": "cc-dist", "teacher": "runs/t", "beta": 0.3}, False, "digits-small", "runs/d",
     "certkd train --preset digits-small --method cc-dist --teacher runs/t --beta 0.3 --out runs/d"),
    ("digits-small", {"method": "sabr", "alpha": 0.2, "epochs": 5}, False, None, "runs/s",  # preset inferred
     "certkd train --preset digits-small --method sabr --alpha 0.2 --epochs 5 --out runs/s"),
    (None, {"method": "trades", "eps": 2 / 255, "dataset": "cifar10", "data_dir": "data/c"}, True, None, "runs/t",
     "certkd teacher --dataset cifar10 --data-dir data/c --method trades --eps 0.00784313725490196 --out runs/t"),
    ("mnist-0.1-cpu", {}, True, "mnist-0.1-cpu", "runs/p", "certkd teacher --preset mnist-0.1-cpu --out runs/p"),
    ("digits-small", {"model": "mlp", "model_kwargs": {"hidden": [32, 32]}, "lr_milestones": [3]}, False,
     "digits-small", "runs/k", "certkd train --preset digits-small --model mlp --set 'model_kwargs={\"hidden\": "
     "[32, 32]}' --set 'lr_milestones=[3]' --out runs/k"),
]


@pytest.mark.parametrize("preset, values, teacher, recorded, out, expected", REPRODUCED)
def test_reproduce_commands_are_unchanged(preset, values, teacher, recorded, out, expected):
    cfg = resolve_config(preset, values, teacher=teacher)
    assert commands.train_command(cfg, out, recorded) == expected


def test_a_request_is_the_line_and_the_config_the_cli_resolves():
    r = TrainRequest("train", "digits-small", (("method", "sabr"), (SET, "alpha=0.3"), ("alpha", 0.2),
                                               ("allow_tf32", True)))
    assert r.argv() == ["--preset", "digits-small", "--method", "sabr", "--set", "alpha=0.3", "--alpha", "0.2",
                        "--tf32"]
    cfg = r.config()
    assert (cfg.method, cfg.alpha, cfg.allow_tf32) == ("sabr", 0.3, True)  # --set wins, as on the command line
    params = {"preset": "digits-small", "method": "sabr", "alpha": 0.2, "allow_tf32": True, "sets": ("alpha=0.3",),
              "eps": None}
    assert TrainRequest.from_params("train", params).config() == cfg


def test_a_sweep_line_reads_back_as_written(tmp_path):
    line = sweep_command(tmp_path / "s w", "digits-small", ["lr=0.001,3e-3", "alpha=0.1,0.5"], "0,1",
                         ["method=cc-ibp", "model_kwargs={hidden: [8]}"], True, 20)
    assert parse_sweep_command(line) == {"preset": "digits-small", "grid": ["lr=0.001,3e-3", "alpha=0.1,0.5"],
                                         "seeds": "0,1", "sets": ["method=cc-ibp", "model_kwargs={hidden: [8]}"]}
    for foreign in ("certkd train --out x", "certkd sweep --devices cuda:0 --out x", "certkd sweep --preset"):
        with pytest.raises(ValueError):
            parse_sweep_command(foreign)


def test_a_sweeps_runs_are_planned_from_its_line(tmp_path):
    sweep = tmp_path / "sw"
    sweep.mkdir()
    line = ("certkd sweep --preset digits-small --grid lr=0.001,0.003 --grid alpha=0.1,0.5 --seeds 0,1 "
            "--set method=cc-ibp --set epochs=2 --out sw --evaluate --eval-limit 20")
    runs = ["lr=0.001_alpha=0.1_seed=0", "lr=0.003_alpha=0.5_seed=1"]
    (sweep / "sweep.json").write_text(json.dumps({"command": line, "runs": [{"name": n} for n in runs]}))
    st = (sweep / "sweep.json").stat()
    got, planned = commands._planned_sweep(str(sweep / "sweep.json"), st.st_mtime_ns, st.st_size)
    assert got == line and sorted(planned) == runs
    assert [(planned[n]["lr"], planned[n]["alpha"], planned[n]["seed"], planned[n]["epochs"]) for n in runs] == \
        [(0.001, 0.1, 0, 2), (0.003, 0.5, 1, 2)]


def test_the_library_does_not_import_the_command_line(tmp_path):
    """Writing a run's commands (a train line, a sweep read back) loads no certkd.cli* module."""
    code = f"""
import json, sys
from pathlib import Path
import certkd.reporting
from certkd.config import resolve_config
from certkd.reporting import commands
print(commands.train_command(resolve_config("digits-small", {{"epochs": 3}}, teacher=True), "runs/t"))
p = Path({str(tmp_path)!r}) / "sweep.json"
p.write_text(json.dumps({{"command": "certkd sweep --preset digits-small --grid lr=0.1,0.2 --out s", "runs": []}}))
print(commands._planned_sweep(str(p), 0, 0)[0])
print(sorted(m for m in sys.modules if m.startswith("certkd.cli")))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines == ["certkd teacher --preset digits-small --epochs 3 --out runs/t",
                     "certkd sweep --preset digits-small --grid lr=0.1,0.2 --out s", "[]"]
