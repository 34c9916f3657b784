"""Checkpoints: untrusted files are never unpickled, mismatches are one-line errors, writes are atomic."""
from __future__ import annotations

import pickle
import re
from pathlib import Path

import pytest
import torch
import yaml

from certkd.checkpoints import load_model, load_weights, save_checkpoint
from certkd.cli import main
from certkd.config import resolve_config
from certkd.errors import CertkdError
from certkd.models import create_model

SRC = Path(__file__).resolve().parents[1] / "src" / "certkd"


class _Evil:
    """Unpickling this creates ``path``: what a malicious checkpoint would do."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _payloads(marker: Path, tmp: Path):
    """A raw pickle and a torch.save zip, both of which run code when unpickled."""
    zipped = tmp / "zipped.bin"
    torch.save({"state_dict": _Evil(marker)}, zipped)
    return {"pickle": pickle.dumps(_Evil(marker)), "torch.save": zipped.read_bytes()}


def _make_run(out: Path, **model_kwargs) -> Path:
    net = create_model("mlp", 1, 8, 10, **model_kwargs)
    cfg = resolve_config("digits-small", {"method": "standard", "model": "mlp", "model_kwargs": model_kwargs,
                                          "epochs": 1})
    out.mkdir(parents=True)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    save_checkpoint(out, 1, net, {"model": net.spec.to_dict(), "config": cfg.to_dict(), "dataset": "digits"},
                    optimizer=torch.optim.Adam(net.parameters()), extra_tensors={"rng_cpu": torch.get_rng_state()})
    return out


def _cli_exit_2(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert exc.value.code == 2, captured
    assert "Traceback" not in captured.out + captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    return lines[0]


@pytest.mark.parametrize("kind", ["pickle", "torch.save"])
@pytest.mark.parametrize("target", ["model.safetensors", "optimizer.safetensors", "meta.json"])
def test_pickle_inside_a_run_dir_is_never_unpickled(tmp_path, capsys, kind, target):
    marker = tmp_path / "PWNED"
    run = _make_run(tmp_path / "run", hidden=[16])
    (run / "checkpoints" / "epoch-0001" / target).write_bytes(_payloads(marker, tmp_path)[kind])
    if target == "optimizer.safetensors":  # read only when resuming
        line = _cli_exit_2(["train", "--out", run, "--resume", "--quiet"], capsys)
        assert "corrupted checkpoint file" in line
    else:
        with pytest.raises(CertkdError, match="corrupted checkpoint"):
            load_model(run)
        for argv in (["evaluate", run], ["verify", run, "--quiet", "--limit", "1"],
                     ["train", "--preset", "digits-small", "--method", "cc-dist", "--teacher", run, "--out",
                      tmp_path / "student", "--quiet"]):
            assert "corrupted checkpoint" in _cli_exit_2(argv, capsys)
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["pickle", "torch.save"])
@pytest.mark.parametrize("suffix", [".pt", ".pth", ".ckpt", ".bin"])
def test_pickled_checkpoint_files_are_refused(tmp_path, capsys, kind, suffix):
    marker = tmp_path / "PWNED"
    path = tmp_path / f"model{suffix}"
    path.write_bytes(_payloads(marker, tmp_path)[kind])
    with pytest.raises(CertkdError, match="pickled .pt/.pth files are refused"):
        load_model(path)
    for argv in (["evaluate", path], ["verify", path, "--quiet", "--out", tmp_path / "v"],
                 ["export", path, "--onnx", tmp_path / "m.onnx", "--vnnlib-dir", tmp_path / "p"],
                 ["train", "--preset", "digits-small", "--method", "cc-dist", "--teacher", path, "--out",
                  tmp_path / "student", "--quiet"]):
        assert "is not a certkd checkpoint" in _cli_exit_2(argv, capsys)
    assert not marker.exists()


def _calls(text: str, name: str):
    """Source of every ``name(...)`` call in ``text`` (parentheses balanced)."""
    for m in re.finditer(re.escape(name) + r"\s*\(", text):
        depth, i = 0, m.end() - 1
        while i < len(text):
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            if depth == 0:
                break
            i += 1
        yield text[m.start(): i + 1]


def test_no_unsafe_deserialisation_in_the_package():
    sources = {p.relative_to(SRC).as_posix(): p.read_text() for p in SRC.rglob("*.py")}
    assert "checkpoints.py" in sources
    for path, text in sources.items():
        for call in _calls(text, "torch.load"):
            assert re.search(r"weights_only\s*=\s*True", call), f"{path}: {call}"
        for pattern in (r"\bpickle\.loads?\(", r"allow_pickle\s*=\s*True", r"\bdill\b", r"\bjoblib\b",
                        r"\bmarshal\.loads?\(", r"yaml\.load\(", r"yaml\.unsafe_load", r"(?<![.\w])(eval|exec)\("):
            assert not re.search(pattern, text), f"{path} matches {pattern}"
        if path != "data/cifar.py":
            assert not re.search(r"^\s*(import|from)\s+(c?pickle|_pickle)\b", text, re.M), f"{path} imports pickle"
    # the one unpickler: CIFAR-10's official batches, through an allow-list of numpy globals
    cifar = sources["data/cifar.py"]
    assert "class RestrictedUnpickler(pickle.Unpickler):" in cifar
    assert "def find_class" in cifar and "is forbidden" in cifar
    assert re.findall(r"\.load\(\)", cifar) == [".load()"] and "RestrictedUnpickler(f, encoding=" in cifar


def test_weights_of_another_architecture_name_the_mismatch(tmp_path):
    run = _make_run(tmp_path / "run", hidden=[32, 32])
    small = create_model("mlp", 1, 8, 10, hidden=[16, 32])
    with pytest.raises(CertkdError) as exc:
        load_weights(small, run / "checkpoints" / "epoch-0001" / "model.safetensors")
    msg = str(exc.value)
    assert "\n" not in msg
    assert "features.2.weight is 32×64 in the file but 16×64 in the model" in msg
    assert "restore the matching model.safetensors or retrain" in msg
    cnn = create_model("cnn-small", 1, 8, 10)
    with pytest.raises(CertkdError, match="does not fit a cnn-small model for 1×8×8 inputs: missing features.1.weight"):
        load_weights(cnn, run / "checkpoints" / "epoch-0001" / "model.safetensors")


def test_checkpoint_temp_dirs_of_a_killed_writer_are_removed(tmp_path):
    run = _make_run(tmp_path / "run")
    stale = run / "checkpoints" / ".epoch-0002.abc123"  # as left by SIGKILL during save_checkpoint
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    net = create_model("mlp", 1, 8, 10)
    save_checkpoint(run, 2, net, {"model": net.spec.to_dict()})
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["epoch-0002", "latest"]
    assert load_model(run).certkd_meta["epoch"] == 2


def test_checkpoint_of_a_newer_format_is_refused_in_one_line(tmp_path):
    import json

    from certkd.checkpoints import FORMAT_VERSION

    run = _make_run(tmp_path / "run")
    meta_path = run / "checkpoints" / "epoch-0001" / "meta.json"
    meta = json.loads(meta_path.read_text())
    assert meta["format_version"] == FORMAT_VERSION
    assert load_model(run).certkd_meta["format_version"] == FORMAT_VERSION
    meta_path.write_text(json.dumps(dict(meta, format_version=FORMAT_VERSION + 1)))
    with pytest.raises(CertkdError) as exc:
        load_model(run)
    msg = str(exc.value)
    assert "\n" not in msg
    assert f"checkpoint format {FORMAT_VERSION + 1}, newer than this certkd reads" in msg
    assert "upgrade certkd" in msg
    meta_path.write_text(json.dumps(dict(meta, format_version="one")))
    with pytest.raises(CertkdError, match="invalid format_version 'one'"):
        load_model(run)
