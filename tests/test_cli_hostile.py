"""Issue 19: the command line of `certkd verify --onnx/--vnnlib` and `--instances`, --threads, --set and
--seed against hostile values, each through the real CLI entry point.

The :data:`CASES` (the same shape as ``tests/test_bad_input.py`` and ``tests/test_hostile_inputs.py``;
``scripts/bad_input_catalogue.py`` lists them in docs/bad_inputs.md) end with exit code 2 and exactly one
line on stderr naming the problem and the fix, never a traceback, and change nothing in the workspace.
The thread cap is a warning, not an error: its tests follow the catalogue.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import pytest

from certkd.cli import main

DEEP = "[" * 5000 + "]" * 5000  # a --set value nested 5000 levels deep (YAML's parser recursed until it crashed)
HUGE_SEED = "99999999999999999999"  # > 2**64: torch.manual_seed failed with a traceback


def write_network(path: Path) -> Path:
    """The identity on 2 inputs (an ONNX MatMul, input (1, 2)), built with onnx.helper in milliseconds."""
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.eye(2, dtype=np.float32), "W")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path


PROPERTY = "\n".join(["(declare-const X_0 Real)", "(declare-const X_1 Real)", "(declare-const Y_0 Real)",
                      "(declare-const Y_1 Real)", "(assert (>= X_0 0.0))", "(assert (<= X_0 1.0))",
                      "(assert (>= X_1 0.0))", "(assert (<= X_1 1.0))", "(assert (>= Y_0 3.0))"]) + "\n"


def build_workspace(w: Path) -> Path:
    """Everything the cases refer to, under ``w``: a tiny ONNX network and property, instances CSVs (one with a
    NaN timeout, one with two columns), a folder, a plain file, and a file where a results folder goes."""
    w.mkdir(parents=True, exist_ok=True)
    write_network(w / "net.onnx")
    (w / "p.vnnlib").write_text(PROPERTY)
    (w / "ok.csv").write_text("net.onnx,p.vnnlib,5\n")
    (w / "nan.csv").write_text("net.onnx,p.vnnlib,5\nnet.onnx,p.vnnlib,nan\n")
    (w / "inf.csv").write_text("net.onnx,p.vnnlib,inf\n")
    (w / "cols.csv").write_text("net.onnx,p.vnnlib\n")
    (w / "adir").mkdir(exist_ok=True)
    (w / "afile").write_text("not a folder\n")
    (w / "taken_cex").write_text("not a folder either\n")
    (w / "deep.yaml").write_text(f"model_kwargs: {DEEP}\n")
    return w


@dataclass(frozen=True)
class Case:
    """A bad input expressible as one command in the workspace of :func:`build_workspace`."""

    name: str
    argv: Tuple[str, ...]   # "{w}" stands for the workspace folder
    problem: str            # phrase that names the problem
    fix: str                # phrase that names the fix

    def args(self, workspace: Path) -> List[str]:
        return [a.replace("{w}", str(workspace)) for a in self.argv]


_ONNX = ("verify", "--onnx", "{w}/net.onnx", "--vnnlib", "{w}/p.vnnlib")
_INST = ("verify", "--instances", "{w}/ok.csv")
_TRAIN = ("train", "--preset", "digits-small", "--method", "standard", "--model", "mlp", "--epochs", "1", "--quiet")
_OUT = ("--out", "{w}/out")
_T = "must be a positive finite number of seconds"

CASES: List[Case] = [
    Case("verify --onnx --timeout nan", _ONNX + ("--timeout", "nan"), f"--timeout nan {_T}", "pass e.g. --timeout 60"),
    Case("verify --onnx --timeout inf", _ONNX + ("--timeout", "inf"), f"--timeout inf {_T}", "pass e.g. --timeout 60"),
    Case("verify --onnx --timeout -1", _ONNX + ("--timeout", "-1"), f"--timeout -1.0 {_T}", "pass e.g. --timeout 60"),
    Case("verify --onnx --timeout 0", _ONNX + ("--timeout", "0"), f"--timeout 0.0 {_T}", "pass e.g. --timeout 60"),
    Case("verify --instances --timeout nan", _INST + ("--timeout", "nan") + ("--out", "{w}/r.csv"),
         f"--timeout nan {_T}", "pass e.g. --timeout 60"),
    Case("instances CSV row with timeout nan", ("verify", "--instances", "{w}/nan.csv", "--out", "{w}/r.csv"),
         f"nan.csv:2: timeout 'nan' {_T}", "write the seconds, e.g. 60, or pass --timeout"),
    Case("instances CSV row with timeout inf", ("verify", "--instances", "{w}/inf.csv", "--out", "{w}/r.csv"),
         f"inf.csv:1: timeout 'inf' {_T}", "write the seconds, e.g. 60, or pass --timeout"),
    Case("instances CSV row with two columns", ("verify", "--instances", "{w}/cols.csv", "--out", "{w}/r.csv"),
         "cols.csv:1: expected onnx,vnnlib,timeout, got 2 columns", "write one onnx,vnnlib,timeout row per instance"),
    Case("verify --onnx --out is a directory", _ONNX + ("--out", "{w}/adir"), "adir is a directory",
         "pass a file path, e.g. --out"),
    Case("verify --onnx --out under a file", _ONNX + ("--out", "{w}/afile/result.txt"),
         "afile is a file, not a folder", "e.g. --out result.txt"),
    Case("verify --instances --out is a directory", _INST + ("--out", "{w}/adir"), "adir is a directory",
         "pass a file path, e.g. --out"),
    Case("verify --instances --out under a file", _INST + ("--out", "{w}/afile/results.csv"),
         "afile is a file, not a folder", "e.g. --out results.csv"),
    Case("verify --instances: the counterexample folder is a file", _INST + ("--out", "{w}/taken.csv"),
         "taken_cex is a file, but the results of --out", "move it away or choose another --out"),
    Case("verify --retry-errors without --instances", _ONNX + ("--retry-errors",),
         "--retry-errors is for --instances", "drop it"),
    Case("train --set nested 5000 levels deep", _TRAIN + ("--set", f"model_kwargs={DEEP}") + _OUT,
         "nested more than 16 levels deep", "write a flat value, e.g. --set 'model_kwargs={hidden: [32, 32]}'"),
    Case("sweep --set nested 5000 levels deep", ("sweep", "--preset", "digits-small", "--set", f"hidden={DEEP}",
                                                "--quiet") + _OUT,
         "nested more than 16 levels deep", "write a flat value"),
    Case("preset nested 5000 levels deep", ("train", "--preset", "{w}/deep.yaml") + _OUT,
         "nests lists or mappings thousands of levels deep", "fix the file"),
    Case("train --seed 99999999999999999999", _TRAIN + ("--seed", HUGE_SEED) + _OUT,
         f"seed must be an integer in [0, 2**32), got {HUGE_SEED}", "pass e.g. --seed 0"),
    Case("train --seed -1", _TRAIN + ("--seed", "-1") + _OUT, "seed must be an integer in [0, 2**32), got -1",
         "pass e.g. --seed 0"),
    Case("train --set seed=2**64", _TRAIN + ("--set", f"seed={2 ** 64}") + _OUT,
         f"seed must be an integer in [0, 2**32), got {2 ** 64}", "pass e.g. --seed 0"),
    Case("sweep --seeds 99999999999999999999", ("sweep", "--preset", "digits-small", "--seeds", HUGE_SEED,
                                                "--quiet") + _OUT,
         f"seed must be an integer in [0, 2**32), got {HUGE_SEED}", "pass e.g. --seed 0"),
]


def snapshot(root: Path) -> Dict[str, str]:
    """Every file under ``root`` with the SHA-256 of its bytes (folders by name)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def run_cli(args: Sequence[str], capsys) -> tuple:
    """(exit code, stdout, stderr) of ``certkd ARGS`` run in this process (code 0: it returned normally)."""
    code = 0
    try:
        main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    pytest.importorskip("onnx")
    return build_workspace(tmp_path_factory.mktemp("cli-hostile"))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_catalogue_case_is_one_line_exit_2(workspace, capsys, case):
    before = snapshot(workspace)
    code, out, err = run_cli(case.args(workspace), capsys)
    assert code == 2, (code, out, err)
    assert "Traceback" not in out + err, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert case.problem in lines[0] and case.fix in lines[0], lines[0]
    assert snapshot(workspace) == before  # refused before anything was written


def test_catalogue_is_listed_in_the_docs_script():
    from importlib.util import module_from_spec, spec_from_file_location

    spec = spec_from_file_location("bad_input_catalogue", Path(__file__).parents[1] / "scripts" /
                                   "bad_input_catalogue.py")
    module = module_from_spec(spec)
    spec.loader.exec_module(module)
    assert "test_cli_hostile.py" in module.CATALOGUES and "tests/test_cli_hostile.py" in module.HEADER


# ------------------------------------------------------------------------------------------ thread cap

@pytest.fixture
def two_cores(monkeypatch):
    monkeypatch.setattr("certkd.threads.usable_cores", lambda: 2)
    monkeypatch.delenv("CERTKD_THREADS", raising=False)


def test_threads_above_the_cap_are_capped_with_one_warning(two_cores, capsys):
    from certkd.threads import capped_threads

    assert capped_threads(100000) == 64
    err = capsys.readouterr().err
    assert err == ("warning: --threads 100000 capped at 64 threads (certkd uses at most max(64, usable cores); "
                   "this machine has 2 usable cores)\n")
    assert [capped_threads(n) for n in (1, 3, 64)] == [1, 3, 64]  # kept as given, on any machine
    assert capsys.readouterr().err == ""


def test_certkd_threads_env_is_capped_too(two_cores, monkeypatch, capsys):
    from certkd.threads import capped_threads

    monkeypatch.setenv("CERTKD_THREADS", "100000")
    assert capped_threads(None) == 64
    assert capsys.readouterr().err.startswith("warning: CERTKD_THREADS=100000 capped at 64 threads")


def test_the_cap_grows_with_the_cores(monkeypatch, capsys):
    from certkd.threads import capped_threads

    monkeypatch.setattr("certkd.threads.usable_cores", lambda: 128)
    assert capped_threads(128) == 128 and capped_threads(129) == 128
    assert capsys.readouterr().err.count("\n") == 1


def test_apply_threads_sets_the_capped_count(two_cores, monkeypatch, capsys):
    import torch

    from certkd.threads import apply_threads

    seen = []
    monkeypatch.setattr(torch, "set_num_threads", seen.append)
    assert apply_threads(100000) == 64 and seen == [64]


def test_cli_threads_100000_runs_with_the_cap(two_cores, monkeypatch, capsys):
    import torch

    import certkd.verification.pipeline as pipeline

    seen = []

    class Stop(Exception):
        pass

    def stop(*a, **k):
        seen.append(torch.get_num_threads())
        raise Stop

    monkeypatch.setattr(pipeline, "verify_run", stop)
    try:
        with pytest.raises(Stop):
            main(["verify", "runs/x", "--eps", "0.1", "--threads", "100000"])
    finally:
        torch.set_num_threads(1)  # the rest of the suite runs with one thread
    assert seen == [64]
    assert capsys.readouterr().err.startswith("warning: --threads 100000 capped at 64 threads")


def test_help_says_what_the_thread_cap_is(capsys):
    main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "more than max(64, usable cores) is capped there, with a warning" in text


# ------------------------------------------------------------------------------------------ --set / --seed

def test_set_depth_limit_is_exact():
    from certkd.config import MAX_SET_DEPTH, parse_sets
    from certkd.errors import CertkdError

    ok = "[" * MAX_SET_DEPTH + "]" * MAX_SET_DEPTH
    assert parse_sets([f"x={ok}"])["x"] is not None
    with pytest.raises(CertkdError, match=f"nested more than {MAX_SET_DEPTH} levels deep"):
        parse_sets([f"x=[{ok}]"])
    with pytest.raises(CertkdError, match="nested more than"):
        parse_sets(["x=" + "{a: " * 40 + "1" + "}" * 40])


@pytest.mark.parametrize("seed,ok", [(0, True), (2 ** 32 - 1, True), (2 ** 32, False), (-1, False)])
def test_seed_range_is_exact(seed, ok):
    from certkd.config import resolve_config
    from certkd.errors import CertkdError

    if ok:
        assert resolve_config("digits-small", {"seed": seed}).seed == seed
    else:
        with pytest.raises(CertkdError, match=r"seed must be an integer in \[0, 2\*\*32\)"):
            resolve_config("digits-small", {"seed": seed})


def test_largest_seed_seeds_torch_and_numpy():
    """The stated range is what the seeding calls accept, including the per-epoch batch seed."""
    import torch

    from certkd.config import MAX_SEED

    seed = MAX_SEED - 1
    np.random.seed(seed)
    torch.Generator().manual_seed(seed * 1000 + 10_000)
    with pytest.raises(ValueError):
        np.random.seed(MAX_SEED)
