"""Issue 10: hostile inputs and hostile environments, each through the real CLI entry point.

Every case ends with the documented exit code (2 for a user's bad input, 130 for Ctrl-C) and
exactly one line on stderr naming the problem and the fix, never a traceback, and leaves no file
damaged or half-written: a refused command changes nothing in the workspace, a failed run leaves
no stub folder behind and keeps the previous checkpoint intact and loadable.

A. checkpoint metadata is untrusted (sizes, kwargs, eps, the ``latest`` pointer, tensor dtypes);
B. a full disk (ENOSPC) during train and verify; C. a BatchNorm model with a last batch of one
point; D. bad ``--set`` values; E. messages that used to mislead; F. file permissions.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
from pathlib import Path
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import pytest
import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import certkd.checkpoints as checkpoints
import certkd.training.loop as loop
import certkd.verification.pipeline as pipeline
from certkd.checkpoints import load_model, save_checkpoint
from certkd.cli import main
from certkd.config import parse_sets, resolve_config
from certkd.errors import CertkdError
from certkd.models import create_model

QUIET = dict(progress=False, log=lambda s: None)
# a tiny MLP on the bundled digits: an epoch takes well under a second
TRAIN = ["train", "--preset", "digits-small", "--method", "standard", "--model", "mlp", "--set",
         "model_kwargs={hidden: [32, 32]}", "--set", "eval_limit=10", "--quiet"]
VERIFY = ["--limit", "3", "--engine", "none", "--quiet"]
ENOSPC_TEXT = "Error while serializing: I/O error: No space left on device (os error 28)"  # what safetensors raises


# ------------------------------------------------------------------------------------------ helpers

def make_run(out: Path, **model_kwargs) -> Path:
    """A run directory with an untrained 8×8 MLP (config.yaml + one checkpoint), in milliseconds."""
    model_kwargs = model_kwargs or {"hidden": [32, 32]}
    net = create_model("mlp", 1, 8, 10, **model_kwargs)
    cfg = resolve_config("digits-small", {"method": "standard", "model": "mlp", "model_kwargs": model_kwargs,
                                          "epochs": 1})
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    save_checkpoint(out, 1, net, {"model": net.spec.to_dict(), "config": cfg.to_dict(), "dataset": "digits"})
    return out


def edit_meta(run: Path, edit) -> Path:
    path = run / "checkpoints" / "epoch-0001" / "meta.json"
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))
    return run


def snapshot(root: Path) -> Dict[str, str]:
    """Every file under ``root`` with the SHA-256 of its bytes (symlinks and folders by name)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "link"
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[rel + "/"] = "dir"
    return out


def leftovers(root: Path) -> List[str]:
    """Half-written files: temporary names of the atomic writers."""
    return [str(p) for p in root.rglob("*") if p.name.startswith(".") and (".tmp" in p.name or
                                                                          p.name.startswith(".epoch-"))]


def run_cli(args: Sequence[str], capsys) -> tuple:
    """(exit code, stdout, stderr) of ``certkd ARGS`` run in this process (code 0: it returned normally)."""
    code = 0
    try:
        main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line(code, out: str, err: str, expect_code: int, *phrases: str) -> str:
    assert code == expect_code, (code, out, err)
    assert "Traceback" not in out + err, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].strip(), err
    for phrase in phrases:
        assert phrase in lines[0], (phrase, lines[0])
    return lines[0]


def check_refused(args: Sequence[str], capsys, workspace: Path, *phrases: str) -> str:
    """A bad input: exit 2, one 'error: ...' line with ``phrases``, and nothing in ``workspace`` changed."""
    before = snapshot(workspace)
    line = one_line(*run_cli(args, capsys), 2, "error: ", *phrases)
    assert snapshot(workspace) == before
    return line


def _copy_run(ws: Path, name: str) -> Path:
    shutil.copytree(ws / "run", ws / name)
    return ws / name


@pytest.fixture
def ws(tmp_path) -> Path:
    w = tmp_path / "w"
    make_run(w / "run")
    return w




# ------------------------------------------------------------------------------------------ catalogue

@dataclass(frozen=True)
class Case:
    """A bad input expressible as one command in the workspace of :func:`build_workspace` (the same shape as
    ``tests/test_bad_input.py``'s cases; ``scripts/bad_input_catalogue.py`` lists both in docs/bad_inputs.md)."""

    name: str
    argv: Tuple[str, ...]   # "{w}" stands for the workspace folder
    problem: str            # phrase that names the problem
    fix: str                # phrase that names the fix

    def args(self, workspace: Path) -> List[str]:
        return [a.replace("{w}", str(workspace)) for a in self.argv]


_V = ("--limit", "3", "--engine", "none", "--quiet")
_TRAIN = ("train", "--preset", "digits-small", "--method", "standard", "--model", "mlp", "--epochs", "1", "--quiet")
_OUT = ("--out", "{w}/out")
_BN = ("train", "--preset", "digits-small", "--model", "cnn7", "--set", "model_kwargs={width: 4, linear: 16}",
       "--epochs", "1", "--quiet")

CASES: List[Case] = [
    Case("checkpoint meta.json: input_size 1000000", ("verify", "{w}/huge-input") + _V,
         "input_size 1000000 is not an integer in [1, 4096]", "restore the checkpoint's meta.json or retrain"),
    Case("checkpoint meta.json: input_size ≠ the weights", ("evaluate", "{w}/other-input-size"),
         "does not fit a mlp model for 1×28×28 inputs", "restore the matching model.safetensors or retrain"),
    Case("checkpoint meta.json: unknown model kwargs", ("verify", "{w}/unknown-kwargs") + _V,
         "unknown model_kwargs key 'foo' for model 'mlp'", "restore the checkpoint's meta.json or retrain"),
    Case("checkpoint meta.json: eps not a number", ("evaluate", "{w}/eps-abc"), "invalid config.eps 'abc'",
         "pass --eps"),
    Case("checkpoint meta.json without config (no eps)", ("verify", "{w}/no-config") + _V, "has no eps recorded",
         "pass --eps"),
    Case("checkpoints/latest is a directory", ("evaluate", "{w}/latest-dir"), "latest is not a file",
         "delete it and pass the checkpoint folder"),
    Case("int32 weights with the right shapes", ("evaluate", "{w}/int32-weights"),
         "is int32 (not floating point) in the file but float32 in the model",
         "restore the matching model.safetensors or retrain"),
    Case("--set with invalid YAML (train)", _TRAIN + ("--set", "alpha=[1,") + _OUT,
         "--set alpha=[1,: not a valid YAML value", "close the brackets or quote the value"),
    Case("--set with invalid YAML (sweep)", ("sweep", "--preset", "digits-small", "--set", "alpha=[1,", "--quiet") + _OUT,
         "--set alpha=[1,: not a valid YAML value", "close the brackets or quote the value"),
    Case("unknown key in model_kwargs", ("train", "--preset", "digits-small", "--model", "cnn7", "--set",
                                        "model_kwargs={widht: 16}", "--quiet") + _OUT,
         "unknown model_kwargs key 'widht' for model 'cnn7' (did you mean 'width'?)",
         "the model_kwargs of 'cnn7' are: width (default 64), linear (default 512)"),
    Case("model_kwargs value out of range", ("train", "--preset", "digits-small", "--model", "cnn7", "--set",
                                            "model_kwargs={width: 1000000000}", "--quiet") + _OUT,
         "model_kwargs width=1000000000 for model 'cnn7' is not an integer in [1, 65536]",
         "--set 'model_kwargs={width: 64}'"),
    Case("--preset is a text file, not YAML", ("train", "--preset", "{w}/passwd") + _OUT,
         "is not a YAML preset file (preset files end in .yaml or .yml)", "pass a .yaml preset file or a preset name"),
    Case("--preset is a directory", ("train", "--preset", "{w}") + _OUT, "is a directory, not a YAML preset file",
         "pass a .yaml preset file or a preset name"),
    Case("--preset is a device (/dev/zero)", ("train", "--preset", "/dev/zero") + _OUT, "is not a regular file",
         "pass a .yaml preset file or a preset name"),
    Case("BatchNorm model with --batch-size 1", _BN + ("--batch-size", "1") + _OUT,
         "batch_size 1 cannot train cnn7: its BatchNorm layers need at least 2 points per batch",
         "pass --batch-size 2 or more"),
]


def _retype_weights(run: Path, dtype: torch.dtype) -> Path:
    path = run / "checkpoints" / "epoch-0001" / "model.safetensors"
    save_file({k: v.to(dtype) for k, v in load_file(str(path)).items()}, str(path))
    return run


def build_workspace(w: Path) -> Path:
    """Everything the cases refer to, under ``w`` (tiny untrained runs with altered files), in milliseconds."""
    w.mkdir(parents=True, exist_ok=True)
    make_run(w / "run")
    edit_meta(_copy_run(w, "huge-input"), lambda m: m["model"].update(input_size=1_000_000))
    edit_meta(_copy_run(w, "other-input-size"), lambda m: m["model"].update(input_size=28))
    edit_meta(_copy_run(w, "unknown-kwargs"), lambda m: m["model"]["kwargs"].update(foo=1))
    edit_meta(_copy_run(w, "eps-abc"), lambda m: m["config"].update(eps="abc"))
    edit_meta(_copy_run(w, "no-config"), lambda m: m.pop("config"))
    latest = _copy_run(w, "latest-dir") / "checkpoints" / "latest"
    latest.unlink()
    latest.mkdir()
    _retype_weights(_copy_run(w, "int32-weights"), torch.int32)
    (w / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    return w


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return build_workspace(tmp_path_factory.mktemp("hostile"))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_catalogue_case_is_one_line_exit_2(workspace, capsys, case):
    if "/dev/zero" in case.argv and not os.path.exists("/dev/zero"):
        pytest.skip("no /dev/zero")
    check_refused(case.args(workspace), capsys, workspace, case.problem, case.fix)


# ------------------------------------------------------------------------------------------ A. metadata

def test_huge_input_size_is_refused_before_allocating(ws, capsys):
    run = edit_meta(_copy_run(ws, "big"), lambda m: m["model"].update(input_size=1_000_000))
    for cmd in (["verify", run, "--out", ws / "v"] + VERIFY, ["evaluate", run]):
        check_refused(cmd, capsys, ws, "input_size 1000000 is not an integer in [1, 4096]",
                      "restore the checkpoint's meta.json or retrain")
    assert not (ws / "v").exists()


@pytest.mark.parametrize("edit,phrase", [
    (lambda m: m["model"].update(input_size=28), "features.2.weight is 32×64 in the file but 32×784 in the model"),
    (lambda m: m["model"].update(num_classes=1000), "head.weight is 10×32 in the file but 1000×32 in the model"),
    (lambda m: m["model"].update(in_channels=3, mean=[0.0] * 3, std=[1.0] * 3), "features.0.mean is 1 in the file"),
    (lambda m: m["model"]["kwargs"].update(hidden=[4096, 4096]), "32×64 in the file but 4096×64 in the model"),
    (lambda m: m["model"].update(num_classes="10"), "num_classes '10' is not an integer"),
    (lambda m: m["model"].update(std=[0.0]), "std [0.0] has a value <= 0"),
    (lambda m: m["model"].update(name="resnet"), "names an unknown model 'resnet'"),
])
def test_metadata_that_does_not_describe_the_weights(ws, capsys, edit, phrase):
    run = edit_meta(_copy_run(ws, "bad"), edit)
    check_refused(["verify", run, "--out", ws / "v"] + VERIFY, capsys, ws, phrase, "restore")
    assert not (ws / "v").exists()


def test_unknown_model_kwargs_in_metadata(ws, capsys):
    run = edit_meta(_copy_run(ws, "kw"), lambda m: m["model"]["kwargs"].update(foo=1))
    check_refused(["verify", run] + VERIFY, capsys, ws, "unknown model_kwargs key 'foo' for model 'mlp'",
                  "hidden (default [100, 100])", "restore the checkpoint's meta.json or retrain")


def test_non_numeric_eps_in_metadata(ws, capsys):
    run = edit_meta(_copy_run(ws, "eps"), lambda m: m["config"].update(eps="abc"))
    for cmd in (["verify", run] + VERIFY, ["evaluate", run], ["verify", run, "--eps", "0.1"] + VERIFY):
        check_refused(cmd, capsys, ws, "invalid config.eps 'abc'", "pass --eps")


def test_metadata_without_config_asks_for_eps(ws, capsys):
    """It used to say 'eps must be in (0, 1], got 0.0' for an eps the user never passed."""
    run = edit_meta(_copy_run(ws, "noconf"), lambda m: m.pop("config"))
    for cmd in (["verify", run] + VERIFY, ["evaluate", run]):
        line = check_refused(cmd, capsys, ws, "has no eps recorded", "pass --eps")
        assert "0.0" not in line


def test_latest_pointer_that_is_a_directory(ws, capsys):
    run = _copy_run(ws, "latestdir")
    (run / "checkpoints" / "latest").unlink()
    (run / "checkpoints" / "latest").mkdir()
    for cmd in (["verify", run] + VERIFY, ["evaluate", run], TRAIN + ["--out", run, "--resume"]):
        check_refused(cmd, capsys, ws, "latest is not a file", "delete it",
                      str(run / "checkpoints" / "epoch-0001"))


@pytest.mark.parametrize("content", [b"../../../etc\n", b"\xff\xfe\x00binary", b"epoch-0001/../../x\n"])
def test_latest_pointer_with_garbage(ws, capsys, content):
    run = _copy_run(ws, "garbage")
    (run / "checkpoints" / "latest").write_bytes(content)
    check_refused(["evaluate", run], capsys, ws, "latest", "delete it")


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.float64, torch.float16])
def test_weights_of_the_wrong_dtype_are_refused(ws, capsys, dtype):
    run = _copy_run(ws, "dtype")
    path = run / "checkpoints" / "epoch-0001" / "model.safetensors"
    tensors = load_file(str(path))
    save_file({k: v.to(dtype) for k, v in tensors.items()}, str(path))
    kind = "" if dtype.is_floating_point else " (not floating point)"
    want = f"is {str(dtype).replace('torch.', '')}{kind} in the file but float32 in the model"
    for cmd in (["verify", run] + VERIFY, ["evaluate", run]):
        check_refused(cmd, capsys, ws, want, "restore")
    with pytest.raises(CertkdError, match="float32 in the model"):
        load_model(run)


def test_valid_checkpoint_still_loads_and_metadata_checks_allocate_nothing(ws, monkeypatch):
    model = load_model(ws / "run")
    assert model.spec.input_size == 8 and next(model.parameters()).dtype == torch.float32
    # the shape check builds the model on the meta device: a refused checkpoint never reaches a real allocation
    built = []
    real = checkpoints.load_weights
    monkeypatch.setattr(checkpoints, "load_weights", lambda m, p: (built.append(m), real(m, p)))
    run = edit_meta(_copy_run(ws, "big2"), lambda m: m["model"].update(input_size=4000))
    with pytest.raises(CertkdError, match="does not fit a mlp model for 1×4000×4000"):
        load_model(run)
    assert built == []


# ------------------------------------------------------------------------------------------ B. disk full

def _enospc(path="") -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def _full_disk_for_atomic_writes(monkeypatch, names: Optional[Sequence[str]] = None, after: int = 0):
    """Every atomic write (of a file named in ``names``, after ``after`` successes) fails with ENOSPC."""
    real = checkpoints.atomic_write_bytes
    calls = {"n": 0}

    def full(path, data):
        if names is None or Path(path).name in names:
            calls["n"] += 1
            if calls["n"] > after:
                raise _enospc(path)
        return real(path, data)

    monkeypatch.setattr(checkpoints, "atomic_write_bytes", full)


def _full_disk_for_safetensors(monkeypatch, after: int = 0):
    """safetensors writes fail after ``after`` successes, as on a real full disk: part of the file is written,
    then a SafetensorError with 'os error 28'."""
    real = checkpoints.save_file
    calls = {"n": 0}

    def full(tensors, filename, *a, **k):
        calls["n"] += 1
        if calls["n"] > after:
            Path(filename).write_bytes(b"\x00" * 100)  # the part that fitted
            raise SafetensorError(ENOSPC_TEXT)
        return real(tensors, filename, *a, **k)

    monkeypatch.setattr(checkpoints, "save_file", full)


@pytest.mark.parametrize("where", ["config.yaml", "first checkpoint", "metrics.jsonl"])
def test_train_on_a_full_disk_leaves_no_stub_folder(tmp_path, capsys, monkeypatch, where):
    if where == "first checkpoint":
        _full_disk_for_safetensors(monkeypatch)
    else:
        _full_disk_for_atomic_writes(monkeypatch, [where])
    before = snapshot(tmp_path)
    out = tmp_path / "new" / "run"
    one_line(*run_cli(TRAIN + ["--epochs", "1", "--out", out], capsys), 2,
             f"error: disk full while writing the run {out} (No space left on device)",
             "nothing was saved; free space or choose another --out")
    assert not (tmp_path / "new").exists()  # the folders it created are gone
    assert snapshot(tmp_path) == before


def test_train_force_into_an_empty_existing_folder_on_a_full_disk_keeps_the_folder(tmp_path, capsys, monkeypatch):
    out = tmp_path / "mine"
    out.mkdir()
    _full_disk_for_safetensors(monkeypatch)
    one_line(*run_cli(TRAIN + ["--epochs", "1", "--out", out], capsys), 2, "disk full", "free space")
    assert out.is_dir() and list(out.iterdir()) == []


@pytest.mark.parametrize("fail", ["model.safetensors", "optimizer.safetensors", "latest"])
def test_enospc_in_the_middle_of_epoch_2_checkpoint_keeps_epoch_1(tmp_path, capsys, monkeypatch, fail):
    """The epoch-2 checkpoint write hits a full disk: epoch 1 stays intact and loadable, and --resume finishes
    the run with the weights of an uninterrupted one."""
    out = tmp_path / "run"
    snap: Dict[str, str] = {}
    real_save = loop.save_checkpoint

    def save_and_snapshot(run_dir, epoch, *a, **k):
        path = real_save(run_dir, epoch, *a, **k)
        if epoch == 1:
            snap.update(snapshot(Path(run_dir) / "checkpoints"))
        return path

    monkeypatch.setattr(loop, "save_checkpoint", save_and_snapshot)
    if fail == "latest":
        _full_disk_for_atomic_writes(monkeypatch, ["latest"], after=1)
    else:
        _full_disk_for_safetensors(monkeypatch, after=2 if fail == "model.safetensors" else 3)
    args = TRAIN + ["--epochs", "3", "--out", out]
    one_line(*run_cli(args, capsys), 2, f"error: disk full while writing the run {out}",
             "the checkpoint of epoch 1 is intact; free space and rerun with --resume, or choose another --out")
    ckdir = out / "checkpoints"
    assert (ckdir / "latest").read_text().strip() == "epoch-0001"
    assert leftovers(out) == []
    now = snapshot(ckdir)
    if fail == "latest":  # epoch 2 was complete, only the pointer did not move: resume redoes epoch 2
        now = {k: v for k, v in now.items() if not k.startswith("epoch-0002")}
    assert snap and now == snap  # epoch 1 untouched
    assert [json.loads(l)["epoch"] for l in (out / "metrics.jsonl").read_text().splitlines()][0] == 1
    assert all(torch.isfinite(t).all() for t in load_model(out).state_dict().values())

    monkeypatch.undo()
    code, stdout, err = run_cli(args + ["--resume"], capsys)
    assert code == 0, err
    assert (ckdir / "latest").read_text().strip() == "epoch-0003"
    assert [json.loads(l)["epoch"] for l in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    code, _, err = run_cli(TRAIN + ["--epochs", "3", "--out", tmp_path / "ref"], capsys)
    assert code == 0, err
    a, b = load_model(out).state_dict(), load_model(tmp_path / "ref").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_enospc_resume_keeps_the_checkpoint(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    train_cfg = resolve_config("digits-small", {"method": "standard", "model": "mlp", "epochs": 2, "eval_limit": 10,
                                                "model_kwargs": {"hidden": [32, 32]}})
    loop.train(train_cfg, out, **QUIET)
    train_cfg = resolve_config("digits-small", {"method": "standard", "model": "mlp", "epochs": 3, "eval_limit": 10,
                                                "model_kwargs": {"hidden": [32, 32]}})
    (out / "config.yaml").write_text(yaml.safe_dump(train_cfg.to_dict(), sort_keys=False))  # one more epoch
    before = snapshot(out / "checkpoints")
    _full_disk_for_safetensors(monkeypatch)
    one_line(*run_cli(["train", "--out", out, "--resume", "--quiet"], capsys), 2,
             "disk full", "the checkpoint of epoch 2 is intact", "--resume")
    assert snapshot(out / "checkpoints") == before and out.is_dir()


@pytest.mark.parametrize("new_out", [True, False])
def test_verify_on_a_full_disk_saves_nothing_and_leaves_no_stub(ws, capsys, monkeypatch, new_out):
    _full_disk_for_atomic_writes(monkeypatch)
    before = snapshot(ws)
    target = ["--out", ws / "new" / "v"] if new_out else []
    where = ws / "new" / "v" if new_out else ws / "run"
    one_line(*run_cli(["verify", ws / "run"] + target + VERIFY, capsys), 2,
             f"error: disk full while writing the verification results to {where} (No space left on device)",
             "free space or choose another --out")
    assert snapshot(ws) == before  # no stub folder, the run untouched
    assert load_model(ws / "run") is not None


def test_verify_on_a_disk_that_fills_up_keeps_the_rows_and_resumes(ws, capsys, monkeypatch):
    real = pipeline.verify_sample
    calls = {"n": 0}

    def fills_up(*a, **k):  # the 3rd row's write hits the full disk
        calls["n"] += 1
        if calls["n"] == 3:
            raise _enospc(ws / "v" / "verification.part0.jsonl")
        return real(*a, **k)

    monkeypatch.setattr(pipeline, "verify_sample", fills_up)
    args = ["verify", ws / "run", "--out", ws / "v", "--limit", "5", "--engine", "none", "--quiet"]
    one_line(*run_cli(args, capsys), 2, "disk full while writing the verification results",
             "the 2 points verified so far are kept; free space and rerun with --resume")
    assert leftovers(ws) == []
    monkeypatch.undo()
    code, stdout, err = run_cli(args + ["--resume"], capsys)
    assert code == 0, err
    rows = [json.loads(l) for l in (ws / "v" / "verification.jsonl").read_text().splitlines()]
    assert len(rows) == 5


# ------------------------------------------------------------------------------------------ C. BatchNorm

BN = ["train", "--preset", "digits-small", "--method", "ibp", "--model", "cnn7", "--set",
      "model_kwargs={width: 4, linear: 16}", "--set", "eval_limit=10", "--set", "eps_length=1", "--quiet"]


def test_batchnorm_model_with_a_last_batch_of_one_point_trains(tmp_path, capsys):
    """65 points in batches of 64 left one point for the last batch: BatchNorm's (and IBP's) batch statistics
    crashed mid-epoch. The last batch of one is now dropped (a different point every epoch)."""
    out = tmp_path / "run"
    code, stdout, err = run_cli(BN + ["--set", "train_limit=65", "--batch-size", "64", "--epochs", "2", "--out", out],
                                capsys)
    assert code == 0, err
    assert "last batch of 1 point" in stdout and "Traceback" not in err
    assert (out / "checkpoints" / "latest").read_text().strip() == "epoch-0002"
    assert all(torch.isfinite(t).all() for t in load_model(out).state_dict().values() if t.is_floating_point())


def test_batchnorm_without_a_remainder_of_one_keeps_every_batch(tmp_path, monkeypatch):
    seen = []
    real = loop.training_loss
    monkeypatch.setattr(loop, "training_loss", lambda model, x, *a, **k: (seen.append(len(x)), real(model, x, *a, **k))[1])
    cfg = resolve_config("digits-small", {"method": "ibp", "model": "cnn7", "model_kwargs": {"width": 4, "linear": 16},
                                          "train_limit": 66, "batch_size": 64, "epochs": 1, "eval_limit": 10})
    loop.train(cfg, tmp_path / "run", **QUIET)
    assert seen == [64, 2]
    seen.clear()
    loop.train(resolve_config("digits-small", dict(cfg.to_dict(), train_limit=65)), tmp_path / "run1", **QUIET)
    assert seen == [64]


@pytest.mark.parametrize("extra,phrase,fix", [
    (["--batch-size", "1", "--set", "train_limit=8"], "batch_size 1 cannot train cnn7", "--batch-size 2 or more"),
    (["--set", "train_limit=1"], "the training set has 1", "raise train_limit to 2 or more"),
])
def test_batchnorm_with_single_point_batches_is_a_clear_error(tmp_path, capsys, extra, phrase, fix):
    before = snapshot(tmp_path)
    one_line(*run_cli(BN + extra + ["--epochs", "1", "--out", tmp_path / "run"], capsys), 2, phrase, fix)
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------------------------------ D. --set

@pytest.mark.parametrize("value", ["alpha=[1,", "model_kwargs={hidden: [32", "alpha='x"])
def test_invalid_yaml_in_set_is_one_line_in_train_and_sweep(tmp_path, capsys, value):
    key = value.split("=")[0]
    lines = []
    for cmd in (TRAIN, ["sweep", "--preset", "digits-small", "--quiet"]):
        lines.append(check_refused(list(cmd) + ["--set", value, "--out", tmp_path / "out"], capsys, tmp_path,
                                   f"--set {value}: not a valid YAML value", "close the brackets or quote the value"))
        assert key in lines[-1]
    assert lines[0] == lines[1]  # one parser


def test_set_parser_is_shared():
    import certkd.cli as cli
    import certkd.sweep as sweep

    assert cli._parse_sets(["alpha=0.5", "model_kwargs={hidden: [8]}", "teacher="]) == \
        sweep.parse_sets(["alpha=0.5", "model_kwargs={hidden: [8]}", "teacher="]) == \
        {"alpha": 0.5, "model_kwargs": {"hidden": [8]}, "teacher": None}
    with pytest.raises(CertkdError, match="has no key"):
        parse_sets(["=1"])


@pytest.mark.parametrize("model,kwargs,phrase,fix", [
    ("cnn7", "{widht: 16}", "unknown model_kwargs key 'widht' for model 'cnn7' (did you mean 'width'?)",
     "the model_kwargs of 'cnn7' are: width (default 64), linear (default 512)"),
    ("mlp", "{foo: 1}", "unknown model_kwargs key 'foo' for model 'mlp'", "hidden (default [100, 100])"),
    ("cnn7", "{width: 0}", "model_kwargs width=0 for model 'cnn7' is not an integer", "model_kwargs={width: 64}"),
    ("cnn7", "{width: 1000000000}", "is not an integer in [1, 65536]", "model_kwargs={width: 64}"),
    ("mlp", "{hidden: [32, abc]}", "is not a list of at most 64 integers", "model_kwargs={hidden: [100, 100]}"),
])
def test_bad_model_kwargs_list_the_valid_ones(tmp_path, capsys, model, kwargs, phrase, fix):
    args = ["train", "--preset", "digits-small", "--model", model, "--set", f"model_kwargs={kwargs}", "--quiet",
            "--out", tmp_path / "out"]
    check_refused(args, capsys, tmp_path, phrase, fix)
    check_refused(["sweep", "--preset", "digits-small", "--set", f"model={model}", "--set", f"model_kwargs={kwargs}",
                   "--out", tmp_path / "s", "--quiet"], capsys, tmp_path, phrase, fix)


# ------------------------------------------------------------------------------------------ E. messages

def test_preset_that_exists_but_is_not_a_preset(tmp_path, capsys):
    text = tmp_path / "passwd"
    text.write_text("root:x:0:0:root:/root:/bin/bash\n")
    (tmp_path / "adir.yaml").mkdir()
    cases = [(text, "is not a YAML preset file (preset files end in .yaml or .yml)"),
             (tmp_path, "is a directory, not a YAML preset file"),
             (tmp_path / "adir.yaml", "is a directory, not a YAML preset file")]
    if Path("/etc/passwd").is_file():
        cases.append((Path("/etc/passwd"), "is not a YAML preset file"))
    if os.path.exists("/dev/zero"):  # a device: never read (it is endless)
        cases.append((Path("/dev/zero"), "is not a regular file"))
        (tmp_path / "zero.yaml").symlink_to("/dev/zero")
        cases.append((tmp_path / "zero.yaml", "is not a regular file"))
    for path, phrase in cases:
        line = check_refused(["train", "--preset", path, "--out", tmp_path / "out", "--quiet"], capsys, tmp_path,
                             f"preset {path} {phrase}", "pass a .yaml preset file or a preset name")
        assert "does not exist" not in line


def test_huge_or_binary_preset_is_refused(tmp_path, capsys):
    big = tmp_path / "big.yaml"
    big.write_text("# padding\n" * 200_000)
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00\x01" * 10)
    check_refused(["train", "--preset", big, "--out", tmp_path / "out"], capsys, tmp_path, "larger than 1 MB",
                  "pass a .yaml preset file")
    check_refused(["train", "--preset", binary, "--out", tmp_path / "out"], capsys, tmp_path, "is not a text file",
                  "pass a .yaml preset file")


def _nan_loss_at(monkeypatch, call: int):
    real = loop.training_loss
    calls = {"n": 0}

    def wrapped(model, *a, **k):
        loss, logs = real(model, *a, **k)
        calls["n"] += 1
        if calls["n"] == call:
            loss, logs = loss * float("nan"), dict(logs, ce_clean=float("nan"))
        return loss, logs

    monkeypatch.setattr(loop, "training_loss", wrapped)


def test_nonfinite_loss_in_the_first_epoch_does_not_suggest_resume(tmp_path, capsys, monkeypatch):
    _nan_loss_at(monkeypatch, 3)
    before = snapshot(tmp_path)
    out = tmp_path / "run"
    line = one_line(*run_cli(TRAIN + ["--epochs", "2", "--out", out], capsys), 2,
                    "non-finite loss at epoch 1, batch 3", "no checkpoint was saved yet", "lower --lr",
                    "rerun the command")
    assert "--resume" not in line and "checkpoint is kept" not in line
    assert snapshot(tmp_path) == before and not out.exists()  # the same command can simply be rerun


def test_nonfinite_loss_after_a_checkpoint_still_suggests_resume(tmp_path, capsys, monkeypatch):
    _nan_loss_at(monkeypatch, 23 + 3)  # digits: 23 batches of 64 per epoch
    one_line(*run_cli(TRAIN + ["--epochs", "2", "--out", tmp_path / "run"], capsys), 2,
             "non-finite loss at epoch 2", "the last good checkpoint is kept", "rerun with --resume")


def _interrupt_at(monkeypatch, call: int):
    real = loop.training_loss
    calls = {"n": 0}

    def wrapped(*a, **k):
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(loop, "training_loss", wrapped)


def test_ctrl_c_during_train_prints_the_resume_hint(tmp_path, capsys, monkeypatch):
    """click's Abort used to pre-empt the handler: 'aborted' and nothing else."""
    out = tmp_path / "run"
    _interrupt_at(monkeypatch, 23 + 5)  # epoch 2
    line = one_line(*run_cli(TRAIN + ["--epochs", "3", "--out", out], capsys), 130,
                    "interrupted; the checkpoint of epoch 1", "rerun the command with --resume")
    assert "aborted" not in line
    assert (out / "checkpoints" / "latest").read_text().strip() == "epoch-0001" and leftovers(out) == []
    load_model(out)
    monkeypatch.undo()
    code, _, err = run_cli(TRAIN + ["--epochs", "3", "--out", out, "--resume"], capsys)
    assert code == 0, err


def test_ctrl_c_in_the_first_epoch_says_nothing_was_kept(tmp_path, capsys, monkeypatch):
    _interrupt_at(monkeypatch, 2)
    before = snapshot(tmp_path)
    line = one_line(*run_cli(TRAIN + ["--epochs", "3", "--out", tmp_path / "run"], capsys), 130,
                    "interrupted before the first checkpoint was saved", "rerun the same command")
    assert "with --resume" not in line
    assert snapshot(tmp_path) == before


def test_ctrl_c_during_verify_prints_the_resume_hint(ws, capsys, monkeypatch):
    real = pipeline.verify_sample
    calls = {"n": 0}

    def wrapped(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(pipeline, "verify_sample", wrapped)
    args = ["verify", ws / "run", "--out", ws / "v", "--limit", "5", "--engine", "none", "--quiet"]
    one_line(*run_cli(args, capsys), 130, "interrupted; the 2 points verified so far are kept",
             "rerun the same command with --resume")
    calls["n"] = -100
    code, _, err = run_cli(args + ["--resume"], capsys)
    assert code == 0, err

    calls["n"] = 2  # the very first point: nothing to keep, no stub folder
    before = snapshot(ws)
    one_line(*run_cli(["verify", ws / "run", "--out", ws / "v2"] + VERIFY, capsys), 130,
             "interrupted before any point was verified", "rerun the same command")
    assert snapshot(ws) == before


# ------------------------------------------------------------------------------------------ F. permissions

@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_every_result_follows_the_umask(tmp_path, capsys, umask):
    old = os.umask(umask)
    try:
        out = tmp_path / "run"
        code, _, err = run_cli(TRAIN + ["--epochs", "1", "--out", out], capsys)
        assert code == 0, err
        code, _, err = run_cli(["verify", out] + VERIFY, capsys)
        assert code == 0, err
    finally:
        os.umask(old)
    modes = {str(p.relative_to(out)): stat.S_IMODE(p.stat().st_mode) for p in [out, *out.rglob("*")]}
    assert modes, "nothing written"
    for name, mode in modes.items():
        want = (0o777 if (out / name).is_dir() else 0o666) & ~umask
        assert mode == want, (name, oct(mode), oct(want))
    assert "checkpoints/epoch-0001/model.safetensors" in modes and "verification.json" in modes
