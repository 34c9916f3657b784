"""certkd.runs owns the run directory: layout, the config reader, "is this a run?", the writable-dir check."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml

import certkd.runs as runs
from certkd import checkpoints
from certkd.checkpoints import save_checkpoint
from certkd.config import TrainConfig, resolve_config
from certkd.errors import CertkdError
from certkd.models import create_model
from certkd.runs import (CONFIG_FILE, ensure_writable_dir, find_config, first_missing, is_run_dir, read_config,
                         read_stored_config, run_directory)

ROOT_IGNORES_PERMISSIONS = not hasattr(os, "geteuid") or os.geteuid() == 0


def _config(**over) -> TrainConfig:
    return resolve_config("digits-small", dict({"method": "standard", "model": "mlp", "epochs": 1}, **over))


def _write_config(run: Path, text, binary: bool = False) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    path = run / CONFIG_FILE
    path.write_bytes(text) if binary else path.write_text(text)
    return path


def _make_run(out: Path) -> Path:
    cfg = _config(model_kwargs={"hidden": [16]})
    net = create_model("mlp", 1, 8, 10, hidden=[16])
    _write_config(out, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    save_checkpoint(out, 1, net, {"model": net.spec.to_dict(), "config": cfg.to_dict(), "dataset": "digits"},
                    optimizer=torch.optim.Adam(net.parameters()))
    return out


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


# ------------------------------------------------------------------------------------------- layout

def test_layout_paths(tmp_path):
    run = tmp_path / "r"
    assert runs.config_path(run) == run / "config.yaml"
    assert runs.config_path(str(run)) == run / "config.yaml"
    assert runs.metrics_path(run) == run / "metrics.jsonl"
    assert runs.checkpoints_dir(run) == run / "checkpoints"
    assert runs.evaluation_path(run) == run / "evaluation.json"
    assert runs.verification_path(run) == run / "verification.json"
    assert runs.verification_rows_path(run) == run / "verification.jsonl"
    assert runs.verification_part_path(run, 3) == run / "verification.part3.jsonl"
    assert runs.verification_part_path(run, 3).match(runs.VERIFICATION_PARTS_GLOB)
    assert runs.SWEEP_FILE == "sweep.json"


def test_layout_matches_what_training_writes(tmp_path):
    run = _make_run(tmp_path / "run")
    assert runs.checkpoints_dir(run).is_dir()
    assert checkpoints.latest_checkpoint(run).parent == runs.checkpoints_dir(run)


def test_first_missing(tmp_path):
    assert first_missing(tmp_path) is None
    assert first_missing(tmp_path / "a" / "b" / "c") == tmp_path / "a"
    assert first_missing(str(tmp_path / "a")) == tmp_path / "a"


def test_atomic_writers_are_reexported():
    assert runs.atomic_write_json is checkpoints.atomic_write_json
    assert runs.atomic_write_text is checkpoints.atomic_write_text
    assert runs.atomic_write_bytes is checkpoints.atomic_write_bytes
    assert runs.append_jsonl is checkpoints.append_jsonl


# ------------------------------------------------------------------------------------------- is_run_dir

def test_is_run_dir(tmp_path):
    run = _make_run(tmp_path / "run")
    assert is_run_dir(run) and is_run_dir(str(run))
    (tmp_path / "empty").mkdir()
    assert not is_run_dir(tmp_path / "empty")
    assert not is_run_dir(tmp_path / "missing")
    (tmp_path / "file.txt").write_text("x")
    assert not is_run_dir(tmp_path / "file.txt")
    (tmp_path / "odd" / CONFIG_FILE).mkdir(parents=True)  # config.yaml that is a folder
    assert not is_run_dir(tmp_path / "odd")


def test_run_directory(tmp_path):
    run = _make_run(tmp_path / "run")
    ck = checkpoints.latest_checkpoint(run)
    assert run_directory(run) == run
    assert run_directory(ck) == run
    release = tmp_path / "release"  # weights without config.yaml: no run to write into
    release.mkdir()
    for name in ("model.safetensors", "meta.json"):
        (release / name).write_bytes((ck / name).read_bytes())
    assert run_directory(release) is None
    with pytest.raises(CertkdError, match="no such run or checkpoint"):
        run_directory(tmp_path / "nothing")


# ------------------------------------------------------------------------------------------- read_config

def test_read_config_good(tmp_path):
    cfg = _config(alpha=0.3)
    _write_config(tmp_path / "run", yaml.safe_dump(dict(cfg.to_dict(), preset="digits-small"), sort_keys=False))
    assert read_config(tmp_path / "run") == cfg
    assert read_config(str(tmp_path / "run")) == cfg
    stored = read_stored_config(tmp_path / "run")
    assert stored.config == cfg and stored.preset == "digits-small"
    assert find_config(tmp_path / "run") == cfg


def test_read_config_missing(tmp_path):
    (tmp_path / "run").mkdir()
    with pytest.raises(CertkdError) as e:
        read_config(tmp_path / "run")
    msg = _one_line(e)
    assert f"cannot read {tmp_path / 'run' / 'config.yaml'} (No such file or directory)" in msg
    assert msg.endswith("; restore it, or retrain the run")
    assert find_config(tmp_path / "run") is None
    assert find_config(tmp_path / "nowhere") is None


@pytest.mark.parametrize("content,binary,fragment", [
    ("dataset: [digits\n", False, "is not valid YAML"),
    ("- a list\n- not a mapping\n", False, "is not a mapping of config keys"),
    ("", False, "is not a mapping of config keys"),
    (b"method: \xff\xfe standard\n", True, "is not a text file (not UTF-8)"),
    (b"\x00\x01\x02\xff" * 64, True, "is not a text file (not UTF-8)"),
    ("alpah: 0.3\n", False, "did you mean 'alpha'"),
    ("epochs: many\n", False, "invalid value 'many' for 'epochs'"),
], ids=["bad-yaml", "list", "empty", "latin-1", "binary", "unknown-key", "bad-value"])
def test_read_config_corrupt(tmp_path, content, binary, fragment):
    path = _write_config(tmp_path / "run", content, binary)
    with pytest.raises(CertkdError) as e:
        read_config(tmp_path / "run", fix="do the fix")
    msg = _one_line(e)
    assert fragment in msg and str(path) in msg
    with pytest.raises(CertkdError):  # a broken config is not a missing one
        find_config(tmp_path / "run")


def test_read_config_refuses_non_regular_and_huge_files(tmp_path):
    (tmp_path / "dir" / CONFIG_FILE).mkdir(parents=True)
    with pytest.raises(CertkdError, match="is not a regular file; restore it"):
        read_config(tmp_path / "dir")
    _write_config(tmp_path / "big", "# " + "x" * runs.CONFIG_MAX_BYTES + "\n")
    with pytest.raises(CertkdError, match="larger than 1 MB"):
        read_config(tmp_path / "big")


def test_resume_names_the_option_in_its_fix(tmp_path):
    """train --resume reads through runs.read_config, with its own fix (docs/bad_inputs.md)."""
    from certkd.training.loop import _stored_config

    path = _write_config(tmp_path / "run", "dataset: [digits\n")
    with pytest.raises(CertkdError) as e:
        _stored_config(tmp_path / "run")
    assert _one_line(e) == f"--resume: {path} is not valid YAML; restore it, or start afresh with --force"


# ------------------------------------------------------------------------------------------- ensure_writable_dir

def test_ensure_writable_dir_creates(tmp_path):
    target = tmp_path / "a" / "b"
    ensure_writable_dir(target, probe=True)
    assert target.is_dir() and list(target.iterdir()) == []


def test_ensure_writable_dir_check_only_touches_nothing(tmp_path):
    ensure_writable_dir(tmp_path / "a" / "b", create=False)
    assert not (tmp_path / "a").exists()


def test_ensure_writable_dir_under_a_file(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(CertkdError) as e:
        ensure_writable_dir(tmp_path / "afile" / "run", create=False)
    assert _one_line(e) == (f"cannot create output directory {tmp_path / 'afile' / 'run'} ({tmp_path / 'afile'} is "
                            "a file); choose another --out")
    with pytest.raises(CertkdError) as e:
        ensure_writable_dir(tmp_path / "afile" / "v")
    assert _one_line(e) == (f"cannot create output directory {tmp_path / 'afile' / 'v'} (Not a directory); choose a "
                            "writable --out")
    with pytest.raises(CertkdError, match=r"cannot create --vnnlib-dir .*; choose a writable --vnnlib-dir$"):
        ensure_writable_dir(tmp_path / "afile" / "p", "--vnnlib-dir", "--vnnlib-dir")


def _refused_write(tmp_path, monkeypatch) -> Path:
    """A read-only folder: chmod where that binds, else (root) os.access and writes refused."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if ROOT_IGNORES_PERMISSIONS:
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: False if Path(p) == locked and mode & os.W_OK
                            else real_access(p, mode, *a, **k))
    return locked


@pytest.mark.parametrize("create", [True, False])
def test_ensure_writable_dir_read_only(tmp_path, monkeypatch, create):
    locked = _refused_write(tmp_path, monkeypatch)
    try:
        target = locked if create else locked / "run"
        with pytest.raises(CertkdError) as e:
            ensure_writable_dir(target, create=create)
        assert _one_line(e) == f"cannot write to output directory {target} (Permission denied); choose a writable --out"
    finally:
        locked.chmod(0o700)


@pytest.mark.skipif(ROOT_IGNORES_PERMISSIONS, reason="root ignores directory permissions")
def test_ensure_writable_dir_read_only_for_real(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(CertkdError, match="cannot write to output directory .* choose a writable --out"):
            ensure_writable_dir(locked / "run")
    finally:
        locked.chmod(0o700)


def test_ensure_writable_dir_probe_catches_what_access_misses(tmp_path, monkeypatch):
    """As root on a read-only mount os.access says yes; the probe write says no."""
    real_write = Path.write_text

    def refuse(self, *a, **k):
        if self.name == ".write-test":
            raise PermissionError(13, "Read-only file system")
        return real_write(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", refuse)
    ensure_writable_dir(tmp_path / "x")  # no probe: passes
    with pytest.raises(CertkdError) as e:
        ensure_writable_dir(tmp_path / "y", probe=True)
    assert _one_line(e) == f"cannot write to output directory {tmp_path / 'y'} (Read-only file system); choose a " \
                           "writable --out"
