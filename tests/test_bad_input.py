"""Issue 6: a catalogue of bad inputs, each through the real CLI entry point.

Every case must end with exit code 2 and exactly one line on stderr that names the problem
and a fix, and never a traceback. The workspace the cases point at (tiny crafted runs, fake
MNIST files, a broken YAML file, a malicious pickle, ...) is built without any training, so
the whole catalogue takes a few seconds.

``scripts/bad_input_catalogue.py`` runs the same :data:`CASES` through ``python -m certkd`` and
writes the table in ``docs/bad_inputs.md``.
"""
from __future__ import annotations

import gzip
import os
import json
import pickle
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Tuple

import numpy as np
import pytest
import yaml

from certkd.checkpoints import save_checkpoint
from certkd.cli import main
from certkd.config import resolve_config
from certkd.models import create_model

MARKER = "PWNED"  # what the malicious pickles would create if anything unpickled them


@dataclass(frozen=True)
class Case:
    name: str
    argv: Tuple[str, ...]   # "{w}" stands for the workspace folder
    problem: str            # phrase that names the problem
    fix: str                # phrase that names the fix (or the valid range)

    def args(self, workspace: Path) -> List[str]:
        return [a.replace("{w}", str(workspace)) for a in self.argv]


_T = ("train", "--preset", "digits-small", "--method", "standard", "--model", "mlp", "--epochs", "1", "--quiet")
_OUT = ("--out", "{w}/out")
_V = ("--quiet", "--out", "{w}/vout")

CASES: List[Case] = [
    Case("train: eps = 0", _T + ("--eps", "0") + _OUT, "eps must be in (0, 1]", "e.g. --eps 0.1"),
    Case("train: eps > 1", _T + ("--eps", "1.5") + _OUT, "eps must be in (0, 1]", "e.g. --eps 0.1"),
    Case("verify: eps = 0", ("verify", "{w}/run", "--eps", "0") + _V, "eps must be in (0, 1]", "(0, 1]"),
    Case("verify: eps < 0", ("verify", "{w}/run", "--eps", "-0.1") + _V, "eps must be in (0, 1]", "(0, 1]"),
    Case("verify: eps > 1", ("verify", "{w}/run", "--eps", "2") + _V, "eps must be in (0, 1]", "(0, 1]"),
    Case("evaluate: eps = 0", ("evaluate", "{w}/run", "--eps", "0"), "eps must be in (0, 1]", "(0, 1]"),
    Case("unknown dataset", _T + ("--dataset", "mnsit") + _OUT, "unknown dataset 'mnsit'", "did you mean 'mnist'"),
    Case("unknown model", _T + ("--model", "mlpp") + _OUT, "unknown model 'mlpp'", "did you mean 'mlp'"),
    Case("unknown method", _T + ("--method", "cc-ibb") + _OUT, "unknown method 'cc-ibb'", "did you mean 'cc-ibp'"),
    Case("unknown preset", ("train", "--preset", "digits-smal") + _OUT, "unknown preset 'digits-smal'",
         "did you mean 'digits-small'"),
    Case("data dir does not exist", _T + ("--dataset", "mnist", "--data-dir", "{w}/nowhere") + _OUT,
         "data directory", "pass --data-dir"),
    Case("data files missing (empty --data-dir)", _T + ("--dataset", "mnist", "--data-dir", "{w}/empty") + _OUT,
         "MNIST-format files not found", "pass --data-dir"),
    Case("truncated IDX .gz file", _T + ("--dataset", "mnist", "--data-dir", "{w}/mnist-truncated") + _OUT,
         "train-images-idx3-ubyte.gz is truncated or corrupt", "re-download it"),
    Case("image size ≠ model input (verify)", ("verify", "{w}/run28", "--data-dir", "{w}/mnist16") + _V,
         "model expects 1×28×28 inputs but the mnist data is 1×16×16", "pass the --data-dir"),
    Case("image size ≠ model input (evaluate)", ("evaluate", "{w}/run28", "--data-dir", "{w}/mnist16"),
         "model expects 1×28×28 inputs but the mnist data is 1×16×16", "pass the --data-dir"),
    Case("teacher of another image size", _T + ("--dataset", "mnist", "--data-dir", "{w}/mnist28", "--method",
                                                "cc-dist", "--teacher", "{w}/run", "--set", "model_kwargs={hidden: [32, 32]}")
         + _OUT, "teacher expects 8×8 inputs but mnist has 28×28", "use a teacher of this dataset"),
    Case("teacher with other classes", _T + ("--method", "cc-dist", "--teacher", "{w}/teacher5") + _OUT,
         "predicts 5 classes but the student 10", "use a teacher trained on the same dataset"),
    Case("teacher with other feature size", _T + ("--method", "cc-dist", "--teacher", "{w}/run", "--set",
                                                  "model_kwargs={hidden: [16]}") + _OUT,
         "teacher features have 32 dimensions but student features have 16", "pass --feature-adapter linear"),
    Case("checkpoint of another architecture", ("evaluate", "{w}/mlp-weights-in-cnn"),
         "does not fit a cnn-small model", "restore the matching model.safetensors or retrain"),
    Case("truncated safetensors checkpoint", ("verify", "{w}/truncated-ckpt") + _V, "corrupted checkpoint file",
         "retrain or restore it"),
    Case("pickle in place of model.safetensors", ("evaluate", "{w}/pickle-run"), "corrupted checkpoint file",
         "retrain or restore it"),
    Case("pickled .pt file as checkpoint", ("verify", "{w}/evil.pt") + _V, "is not a certkd checkpoint",
         "pass a run directory"),
    Case("pickled .pth file as teacher", _T + ("--method", "cc-dist", "--teacher", "{w}/evil.pth") + _OUT,
         "is not a certkd checkpoint", "pass a run directory"),
    Case("output dir exists", _T + ("--out", "{w}/existing"), "already exists",
         "pass --resume to continue it or --force to overwrite"),
    Case("--out under a file (train)", _T + ("--out", "{w}/afile/run"), "is a file",
         "choose another --out"),
    Case("--out under a file (verify)", ("verify", "{w}/run", "--quiet", "--out", "{w}/afile/v"),
         "cannot create output directory", "choose a writable --out"),
    Case("invalid YAML preset", ("train", "--preset", "{w}/broken.yaml") + _OUT, "invalid YAML in", "fix the file"),
    Case("preset file does not exist", ("train", "--preset", "{w}/missing.yaml") + _OUT, "missing.yaml does not exist",
         "pass an existing YAML file or a preset name"),
    Case("unknown config key", _T + ("--set", "alpah=0.1") + _OUT, "unknown config key 'alpah'",
         "did you mean 'alpha'"),
    Case("--set without =", _T + ("--set", "alpha") + _OUT, "--set expects KEY=VALUE", "KEY=VALUE"),
    Case("--workers 0", ("verify", "{w}/run", "--workers", "0") + _V, "--workers must be >= 1", ">= 1"),
    Case("--timeout 0", ("verify", "{w}/run", "--timeout", "0") + _V, "timeout must be > 0", "> 0 seconds"),
    Case("--timeout < 0", ("verify", "{w}/run", "--timeout", "-5") + _V, "timeout must be > 0", "> 0 seconds"),
    Case("alpha > 1", _T + ("--alpha", "1.5") + _OUT, "alpha must be in [0, 1]", "[0, 1]"),
    Case("alpha < 0", _T + ("--alpha", "-0.1") + _OUT, "alpha must be in [0, 1]", "[0, 1]"),
    Case("beta < 0", _T + ("--beta", "-1") + _OUT, "beta must be >= 0", ">= 0"),
    Case("verify --limit 0", ("verify", "{w}/run", "--limit", "0") + _V, "--limit must be >= 1", ">= 1"),
    Case("evaluate --limit 0", ("evaluate", "{w}/run", "--limit", "0"), "--limit must be >= 1", ">= 1"),
    Case("--epochs 0", _T[:-3] + ("--epochs", "0") + _OUT, "epochs must be >= 1", ">= 1"),
    Case("--eps not a number", _T + ("--eps", "abc") + _OUT, "'abc' is not a radius", "2/255"),
    Case("unknown device", _T + ("--device", "tpu") + _OUT, "unknown device 'tpu'", "use auto, cpu or cuda"),
    Case("--resume without a checkpoint", _T + ("--out", "{w}/empty", "--resume"), "--resume: no checkpoint",
         "start a new run without --resume"),
    Case("--resume with --force", _T + ("--out", "{w}/run", "--resume", "--force"), "contradict each other",
         "pass only one"),
    Case("--resume with a broken config.yaml", ("train", "--out", "{w}/broken-config", "--resume", "--quiet"),
         "config.yaml is not valid YAML", "start afresh with --force"),
    Case("evaluate --batch-size 0", ("evaluate", "{w}/run", "--batch-size", "0"), "--batch-size must be >= 1",
         "pass e.g. --batch-size"),
    Case("verify --resume of rows computed for other weights", ("verify", "{w}/run", "--out", "{w}/vx-other",
                                                                 "--resume", "--quiet"), "computed for other weights",
         "--force to start over"),
    Case("verify into a folder that holds a verification", ("verify", "{w}/run", "--out", "{w}/vx-other", "--quiet"),
         "already holds a verification", "pass --resume to continue it"),
    Case("verify --resume with a corrupt verification.json", ("verify", "{w}/corrupt-summary", "--resume",
                                                               "--quiet"),
         "verification.json is corrupt", "--force to start over"),
]


# ------------------------------------------------------------------------------------------ workspace

class _Evil:
    """Unpickling this creates ``path`` (a pickle's __reduce__ runs arbitrary callables)."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def malicious_pickle(marker: Path) -> bytes:
    return pickle.dumps(_Evil(marker))


def write_idx_gz(path: Path, array: np.ndarray, magic: int) -> None:
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def fake_mnist(folder: Path, size: int, n: int = 32) -> Path:
    """Four MNIST-format .gz files with ``n`` random ``size``×``size`` training images."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(0)
    for split, k in (("train", n), ("t10k", n // 2)):
        write_idx_gz(folder / f"{split}-images-idx3-ubyte.gz", rng.randint(0, 256, (k, size, size)), 0x803)
        write_idx_gz(folder / f"{split}-labels-idx1-ubyte.gz", rng.randint(0, 10, (k,)), 0x801)
    return folder


def make_run(out: Path, model: str = "mlp", input_size: int = 8, num_classes: int = 10, dataset: str = "digits",
             data_dir=None, **model_kwargs) -> Path:
    """A run directory with an untrained model (config.yaml + one checkpoint), in milliseconds."""
    net = create_model(model, 1, input_size, num_classes, **model_kwargs)
    cfg = resolve_config("digits-small", {"method": "standard", "model": model, "dataset": dataset,
                                          "data_dir": data_dir, "model_kwargs": model_kwargs, "epochs": 1})
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    save_checkpoint(out, 1, net, {"model": net.spec.to_dict(), "config": cfg.to_dict(), "dataset": dataset})
    return out


def build_workspace(w: Path) -> Path:
    """Everything the cases refer to, under ``w``."""
    w.mkdir(parents=True, exist_ok=True)
    fake_mnist(w / "mnist28", 28)
    fake_mnist(w / "mnist16", 16)
    shutil.copytree(w / "mnist28", w / "mnist-truncated")
    gz = w / "mnist-truncated" / "train-images-idx3-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[: gz.stat().st_size // 2])
    (w / "empty").mkdir()
    make_run(w / "run", hidden=[32, 32])
    make_run(w / "run28", input_size=28, dataset="mnist", data_dir=str(w / "mnist28"), hidden=[32, 32])
    make_run(w / "teacher5", num_classes=5, hidden=[32, 32])
    ck = make_run(w / "mlp-weights-in-cnn", model="cnn-small") / "checkpoints" / "epoch-0001"
    shutil.copy(w / "run" / "checkpoints" / "epoch-0001" / "model.safetensors", ck / "model.safetensors")
    ck = make_run(w / "truncated-ckpt", hidden=[32, 32]) / "checkpoints" / "epoch-0001" / "model.safetensors"
    ck.write_bytes(ck.read_bytes()[:100])
    ck = make_run(w / "pickle-run", hidden=[32, 32]) / "checkpoints" / "epoch-0001" / "model.safetensors"
    ck.write_bytes(malicious_pickle(w / MARKER))
    (w / "evil.pt").write_bytes(malicious_pickle(w / MARKER))
    (w / "evil.pth").write_bytes(malicious_pickle(w / MARKER))
    (w / "existing").mkdir()
    (w / "existing" / "notes.txt").write_text("precious\n")
    (w / "afile").write_text("a file, not a folder\n")
    (w / "broken.yaml").write_text("dataset: digits\nmodel: [mlp\n")
    make_run(w / "broken-config", hidden=[32, 32])
    (w / "broken-config" / "config.yaml").write_text("dataset: [digits\n")
    make_run(w / "corrupt-summary", hidden=[32, 32])
    (w / "corrupt-summary" / "verification.json").write_text('{"settings": {"eps"')
    (w / "vx-other").mkdir()  # a verification that certifies other weights (issue #10 §1)
    (w / "vx-other" / "verification.json").write_text(json.dumps({"certifies": {"weights_sha256": "0" * 64}}))
    return w


# ------------------------------------------------------------------------------------------ tests

@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return build_workspace(tmp_path_factory.mktemp("bad-input"))


def check_one_line(code, out: str, err: str, case: Case) -> str:
    assert code == 2, (code, out, err)
    assert "Traceback" not in out + err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].strip(), err
    line = lines[0]
    assert line.startswith("error: "), line
    assert case.problem in line, line
    assert case.fix in line, line
    return line


def _files(root: Path) -> dict:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_one_line_exit_2(workspace, capsys, case):
    before = _files(workspace)
    with pytest.raises(SystemExit) as exc:
        main(case.args(workspace))
    captured = capsys.readouterr()
    check_one_line(exc.value.code, captured.out, captured.err, case)
    assert not (workspace / MARKER).exists()
    assert _files(workspace) == before  # a refused command writes no file (it may leave an empty --out)
    assert (workspace / "existing" / "notes.txt").read_text() == "precious\n"


@pytest.mark.parametrize("name", ["truncated IDX .gz file", "pickled .pt file as checkpoint"])
def test_bad_input_through_python_m_certkd(workspace, name):
    case = next(c for c in CASES if c.name == name)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "certkd"] + case.args(workspace), capture_output=True, text=True,
                          env=env, timeout=120)
    check_one_line(proc.returncode, proc.stdout, proc.stderr, case)
    assert not (workspace / MARKER).exists()


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root ignores directory permissions")
def test_unwritable_output_directory(tmp_path, capsys):
    w = build_workspace(tmp_path / "w")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        cases = [Case("train into a read-only dir", _T + ("--out", str(locked / "run")),
                      "cannot write to output directory", "choose a writable --out"),
                 Case("verify into a read-only dir", ("verify", "{w}/run", "--quiet", "--out", str(locked)),
                      "cannot write to output directory", "choose a writable --out")]
        for case in cases:
            with pytest.raises(SystemExit) as exc:
                main(case.args(w))
            captured = capsys.readouterr()
            check_one_line(exc.value.code, captured.out, captured.err, case)
    finally:
        locked.chmod(0o700)


def test_catalogue_is_large_enough():
    assert len(CASES) >= 18
    assert len({c.name for c in CASES}) == len(CASES)
