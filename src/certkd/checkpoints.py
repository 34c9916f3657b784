"""Checkpoints and atomic file writes.

Layout of a run directory::

    RUN/config.yaml                 resolved configuration
    RUN/metrics.jsonl               one JSON object per epoch
    RUN/checkpoints/epoch-0007/     model.safetensors, optimizer.safetensors, meta.json
    RUN/checkpoints/latest          name of the newest complete checkpoint (atomic pointer)

Weights and optimiser tensors are safetensors; everything else is JSON. Nothing is ever
unpickled, so loading a checkpoint cannot run code. A checkpoint directory is written under
a temporary name and renamed into place, and ``latest`` is replaced atomically after it, so a
crash at any moment leaves the previous checkpoint usable.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from certkd.errors import CertkdError

PathLike = Union[str, os.PathLike]
FORMAT_VERSION = 1
_UMASK = os.umask(0)
os.umask(_UMASK)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file, fsync and rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; results are meant to be shared
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def append_jsonl(path: PathLike, obj: Any) -> None:
    """Append one line atomically: the file is rewritten whole, so a crash never leaves half a line."""
    path = Path(path)
    old = path.read_text() if path.exists() else ""
    atomic_write_text(path, old + json.dumps(obj, sort_keys=True) + "\n")


def _state_to_tensors(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Split an optimiser state dict into tensors (safetensors) and plain values (JSON)."""
    sd = optimizer.state_dict()
    tensors: Dict[str, torch.Tensor] = {}
    plain_state: Dict[str, Dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        plain_state[str(pid)] = {}
        for key, val in st.items():
            if torch.is_tensor(val):
                tensors[f"{pid}.{key}"] = val.detach().cpu().contiguous()
            else:
                plain_state[str(pid)][key] = val
    return tensors, {"param_groups": sd["param_groups"], "plain_state": plain_state}


def optimizer_from_tensors(optimizer: torch.optim.Optimizer, tensors: Dict[str, torch.Tensor],
                           plain: Dict[str, Any]) -> None:
    state: Dict[int, Dict[str, Any]] = {int(k): dict(v) for k, v in plain["plain_state"].items()}
    for name, val in tensors.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = val
    optimizer.load_state_dict({"state": state, "param_groups": plain["param_groups"]})


def save_checkpoint(run_dir: PathLike, epoch: int, model: nn.Module, meta: Dict[str, Any],
                    optimizer: Optional[torch.optim.Optimizer] = None,
                    extra_tensors: Optional[Dict[str, torch.Tensor]] = None, keep: int = 1) -> Path:
    """Write ``RUN/checkpoints/epoch-NNNN`` atomically and point ``latest`` at it."""
    ckdir = Path(run_dir) / "checkpoints"
    ckdir.mkdir(parents=True, exist_ok=True)
    name = f"epoch-{epoch:04d}"
    for stale in [*ckdir.glob(".epoch-*"), *ckdir.glob(".latest.*.tmp")]:  # left by a writer killed mid-write
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=ckdir, prefix=f".{name}."))
    try:
        save_file(_state_to_tensors(model), str(tmp / "model.safetensors"))
        meta = dict(meta, epoch=epoch, format_version=FORMAT_VERSION)
        if optimizer is not None:
            tensors, plain = optimizer_to_tensors(optimizer)
            tensors.update({f"extra.{k}": v.detach().cpu().contiguous() for k, v in (extra_tensors or {}).items()})
            save_file(tensors, str(tmp / "optimizer.safetensors"))
            meta["optimizer"] = plain
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        final = ckdir / name
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(ckdir)
    atomic_write_text(ckdir / "latest", name + "\n")
    older = sorted(p for p in ckdir.glob("epoch-*") if p.name != name)
    for old in older[: max(0, len(older) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: PathLike) -> Optional[Path]:
    """The newest complete checkpoint of a run, or None."""
    ckdir = Path(run_dir) / "checkpoints"
    pointer = ckdir / "latest"
    if pointer.exists():
        cand = ckdir / pointer.read_text().strip()
        if (cand / "meta.json").exists():
            return cand
    return None


def resolve_checkpoint(path: PathLike) -> Path:
    """Accept a run directory, a checkpoint directory or a release folder; return the folder
    that holds ``model.safetensors`` and ``meta.json``."""
    p = Path(path)
    if not p.exists():
        raise CertkdError(f"no such run or checkpoint: {p}")
    if p.is_file():
        if p.name in ("model.safetensors", "meta.json"):
            p = p.parent
        else:
            raise CertkdError(f"{p} is not a certkd checkpoint: pass a run directory or a folder with "
                              "model.safetensors and meta.json (pickled .pt/.pth files are refused)")
    if (p / "model.safetensors").exists() and (p / "meta.json").exists():
        return p
    ck = latest_checkpoint(p)
    if ck is None:
        raise CertkdError(f"no checkpoint in {p}: expected checkpoints/latest or model.safetensors + meta.json")
    return ck


def read_meta(ckpt: Path) -> Dict[str, Any]:
    try:
        meta = json.loads((ckpt / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise CertkdError(f"corrupted checkpoint metadata {ckpt / 'meta.json'}: {e}; retrain or restore it") from None
    if not isinstance(meta, dict) or "model" not in meta:
        raise CertkdError(f"{ckpt / 'meta.json'} is not certkd checkpoint metadata (no 'model' entry)")
    return meta


def read_tensors(path: Path) -> Dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CertkdError(f"corrupted checkpoint file {path}: {e}; retrain or restore it") from None


def _state_mismatch(model: nn.Module, tensors: Dict[str, torch.Tensor]) -> Optional[str]:
    """The first difference between a model's state and checkpoint tensors, in words (None: they fit)."""
    expected = model.state_dict()
    shape = lambda t: "×".join(str(d) for d in t.shape) or "scalar"  # noqa: E731
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    if missing:
        return f"missing {missing[0]}" + (f" and {len(missing) - 1} more tensors" if len(missing) > 1 else "")
    if unexpected:
        return f"unexpected {unexpected[0]}" + (f" and {len(unexpected) - 1} more tensors" if len(unexpected) > 1 else "")
    for k, v in expected.items():
        if tensors[k].shape != v.shape:
            return f"{k} is {shape(tensors[k])} in the file but {shape(v)} in the model"
    return None


def load_weights(model: nn.Module, path: Path) -> None:
    tensors = read_tensors(path)
    problem = _state_mismatch(model, tensors)
    if problem is None:
        try:
            model.load_state_dict(tensors, strict=True)
        except RuntimeError as e:
            problem = (str(e).strip().splitlines() or ["shape mismatch"])[-1].strip()
    if problem is not None:
        spec = getattr(model, "spec", None)
        arch = f"a {spec.name} model for {spec.in_channels}×{spec.input_size}×{spec.input_size} inputs" if spec \
            else "this model"
        raise CertkdError(f"checkpoint {path} does not fit {arch}: {problem}; the weights belong to another "
                          "architecture, restore the matching model.safetensors or retrain")


def load_model(path: PathLike, device: Union[str, torch.device] = "cpu") -> nn.Module:
    """Load a trained model in eval mode from a run directory, checkpoint or release folder.

    The returned :class:`~certkd.models.CertifiableNet` takes pixel-space inputs in [0, 1].
    """
    from certkd.models import ModelSpec, create_model_from_spec

    ckpt = resolve_checkpoint(path)
    meta = read_meta(ckpt)
    try:
        spec = ModelSpec.from_dict(meta["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise CertkdError(f"{ckpt / 'meta.json'} has an invalid model description ({e})") from None
    model = create_model_from_spec(spec)
    load_weights(model, ckpt / "model.safetensors")
    model.to(device).eval()
    model.certkd_meta = meta  # provenance for reports (config, epoch)
    return model
