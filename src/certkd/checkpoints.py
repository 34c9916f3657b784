"""Checkpoints and atomic file writes.

The run directory as a whole (its other files, "is this a run?", its config) belongs to
:mod:`certkd.runs`, which also re-exports the atomic writers defined here. A run's checkpoints::

    RUN/checkpoints/epoch-0007/     model.safetensors, optimizer.safetensors, meta.json
    RUN/checkpoints/latest          name of the newest complete checkpoint (atomic pointer)

Weights and optimiser tensors are safetensors; everything else is JSON. Nothing is ever
unpickled, so loading a checkpoint cannot run code. A checkpoint directory is written under
a temporary name and renamed into place, and ``latest`` is replaced atomically after it, so a
crash at any moment leaves the previous checkpoint usable.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from certkd.errors import CertkdError

PathLike = Union[str, os.PathLike]
CHECKPOINTS_DIR = "checkpoints"  # RUN/checkpoints; certkd.runs re-exports it with the rest of the layout
FORMAT_VERSION = 1  # of the checkpoint layout; read_meta refuses a checkpoint with a newer one
META_MAX_BYTES = 64 << 20  # meta.json is a few kB (optimiser hyper-parameters); refuse to read gigabytes
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def current_umask() -> int:
    """The process umask, read when needed (not at import: a caller may change it later)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def share_like_umask(path: PathLike, directory: bool = False) -> None:
    """chmod ``path`` to what a plain open()/mkdir() would have made (0666/0777 & ~umask): tempfile's
    mkstemp/mkdtemp (and safetensors) create 0600/0700, but results are meant to be shared like any file."""
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


def _os_error_of(e: BaseException) -> Optional[OSError]:
    """The OSError behind ``e``: itself, a chained cause/context, or safetensors' "os error N" text."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno is not None:
            return e
        if isinstance(e, SafetensorError):
            m = re.search(r"os error (\d+)", str(e))
            if m:
                code = int(m.group(1))
                return OSError(code, os.strerror(code))
        e = e.__cause__ or e.__context__
    return None


def disk_full(e: BaseException) -> Optional[OSError]:
    """The ENOSPC/EDQUOT error behind ``e`` (also when chained or inside a SafetensorError), else None."""
    err = _os_error_of(e)
    return err if err is not None and err.errno in DISK_FULL_ERRNOS else None


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
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600; results are meant to be shared
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
    ckdir = Path(run_dir) / CHECKPOINTS_DIR
    ckdir.mkdir(parents=True, exist_ok=True)
    name = f"epoch-{epoch:04d}"
    for stale in [*ckdir.glob(".epoch-*"), *ckdir.glob(".latest.*.tmp")]:  # left by a writer killed mid-write
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=ckdir, prefix=f".{name}."))
    try:
        share_like_umask(tmp, directory=True)  # mkdtemp makes 0700
        _save_tensors(_state_to_tensors(model), tmp / "model.safetensors")
        meta = dict(meta, epoch=epoch, format_version=FORMAT_VERSION)
        if optimizer is not None:
            tensors, plain = optimizer_to_tensors(optimizer)
            tensors.update({f"extra.{k}": v.detach().cpu().contiguous() for k, v in (extra_tensors or {}).items()})
            _save_tensors(tensors, tmp / "optimizer.safetensors")
            meta["optimizer"] = plain
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        for f in tmp.iterdir():
            share_like_umask(f)  # safetensors writes 0600
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


def _save_tensors(tensors: Dict[str, torch.Tensor], path: Path) -> None:
    """safetensors' save_file, with its I/O failures (e.g. a full disk) raised as OSError."""
    try:
        save_file(tensors, str(path))
    except SafetensorError as e:
        err = _os_error_of(e)
        if err is None:
            raise
        raise OSError(err.errno, err.strerror, str(path)) from None


def latest_checkpoint(run_dir: PathLike) -> Optional[Path]:
    """The newest complete checkpoint of a run, or None.

    ``checkpoints/latest`` holds a folder name written by :func:`save_checkpoint`; anything else
    there (a directory, a binary file, a path leading elsewhere) is refused with a CertkdError.
    """
    ckdir = Path(run_dir) / CHECKPOINTS_DIR
    pointer = ckdir / "latest"
    if not os.path.lexists(pointer):
        return None
    newest = sorted(p.name for p in ckdir.glob("epoch-*") if (p / "meta.json").is_file())
    fix = (f"delete it and pass the checkpoint folder {ckdir / newest[-1]} instead, or rewrite it to hold that "
           "name" if newest else "delete it and retrain")
    if not pointer.is_file():
        raise CertkdError(f"{pointer} is not a file (it should name the newest checkpoint folder); {fix}")
    try:
        with open(pointer, "rb") as f:
            name = f.read(4097).decode("utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise CertkdError(f"cannot read {pointer} ({getattr(e, 'strerror', None) or e}); {fix}") from None
    if not re.fullmatch(r"epoch-\d{1,12}", name):
        raise CertkdError(f"{pointer} does not name a checkpoint folder (expected e.g. epoch-0003, got "
                          f"{name[:40]!r}); {fix}")
    cand = ckdir / name
    if (cand / "meta.json").is_file():
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
    """A checkpoint's meta.json, checked as untrusted input: a JSON object of bounded size whose
    ``model``, ``config`` and ``epoch`` entries have the right types and whose ``format_version`` (absent:
    :data:`FORMAT_VERSION`) is one this certkd reads (a one-line CertkdError otherwise)."""
    path = ckpt / "meta.json"
    restore = "restore the checkpoint's meta.json or retrain"
    try:
        if not path.is_file():
            raise CertkdError(f"{path} is not a regular file; {restore}")
        with open(path, "rb") as f:
            raw = f.read(META_MAX_BYTES + 1)
        if len(raw) > META_MAX_BYTES:
            raise CertkdError(f"{path} is larger than {META_MAX_BYTES >> 20} MB, not certkd checkpoint metadata; "
                              f"{restore}")
        meta = json.loads(raw.decode("utf-8"))
    except (OSError, ValueError) as e:
        raise CertkdError(f"corrupted checkpoint metadata {path}: {e}; retrain or restore it") from None
    if not isinstance(meta, dict) or "model" not in meta:
        raise CertkdError(f"{path} is not certkd checkpoint metadata (no 'model' entry); {restore}")
    if not isinstance(meta["model"], dict):
        raise CertkdError(f"{path} has an invalid model description (not a mapping); {restore}")
    version = meta.get("format_version", FORMAT_VERSION)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CertkdError(f"{path} has an invalid format_version {version!r} (not an integer >= 1); {restore}")
    if version > FORMAT_VERSION:
        raise CertkdError(f"{path} has checkpoint format {version}, newer than this certkd reads "
                          f"(format {FORMAT_VERSION}); upgrade certkd (pip install -U certkd) to load it")
    if "config" in meta:
        cfg = meta["config"]
        if not isinstance(cfg, dict):
            raise CertkdError(f"{path} has an invalid config (not a mapping); {restore}")
        eps = cfg.get("eps")
        if eps is not None and (isinstance(eps, bool) or not isinstance(eps, (int, float))
                                or not 0.0 < eps <= 1.0):
            raise CertkdError(f"{path} has an invalid config.eps {eps!r} (not a number in (0, 1]); pass --eps "
                              f"explicitly, or {restore}")
        for key in ("dataset", "data_dir", "method"):
            if cfg.get(key) is not None and not isinstance(cfg[key], str):
                raise CertkdError(f"{path} has an invalid config.{key} {cfg[key]!r} (not a string); {restore}")
    if "epoch" in meta and (isinstance(meta["epoch"], bool) or not isinstance(meta["epoch"], int)
                            or meta["epoch"] < 0):
        raise CertkdError(f"{path} has an invalid epoch {meta['epoch']!r} (not an integer >= 0); {restore}")
    return meta


def checkpoint_eps(meta: Dict[str, Any], where: PathLike) -> float:
    """The training ε recorded in checkpoint metadata (checked by :func:`read_meta`), or a CertkdError
    asking for --eps when the checkpoint has none."""
    eps = (meta.get("config") or {}).get("eps")
    if eps is None:
        raise CertkdError(f"checkpoint {where} has no eps recorded (its meta.json has no config.eps); "
                          "pass --eps, e.g. --eps 0.1")
    return float(eps)


def read_tensors(path: Path) -> Dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CertkdError(f"corrupted checkpoint file {path}: {e}; retrain or restore it") from None


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}
Layout = Dict[str, Tuple[Tuple[int, ...], Union[torch.dtype, str]]]  # name -> (shape, dtype)


def _layout(tensors: Dict[str, torch.Tensor]) -> Layout:
    return {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}


def read_layout(path: Path) -> Layout:
    """Names, shapes and dtypes of the tensors in a safetensors file, from its header only (no data read)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            out: Layout = {}
            for k in f.keys():
                sl = f.get_slice(k)
                out[k] = (tuple(sl.get_shape()), _ST_DTYPES.get(sl.get_dtype(), sl.get_dtype()))
            return out
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CertkdError(f"corrupted checkpoint file {path}: {e}; retrain or restore it") from None


def _state_mismatch(expected: Layout, found: Layout) -> Optional[str]:
    """The first difference between a model's state and checkpoint tensors, in words (None: they fit)."""
    shape = lambda s: "×".join(str(d) for d in s) or "scalar"  # noqa: E731
    dtype = lambda d: str(d).replace("torch.", "")  # noqa: E731
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    if missing:
        return f"missing {missing[0]}" + (f" and {len(missing) - 1} more tensors" if len(missing) > 1 else "")
    if unexpected:
        return f"unexpected {unexpected[0]}" + (f" and {len(unexpected) - 1} more tensors" if len(unexpected) > 1 else "")
    for k, (s, _) in expected.items():
        if tuple(found[k][0]) != tuple(s):
            return f"{k} is {shape(found[k][0])} in the file but {shape(s)} in the model"
    for k, (_, d) in expected.items():
        if found[k][1] != d:
            kind = "" if isinstance(found[k][1], torch.dtype) and found[k][1].is_floating_point else \
                " (not floating point)"
            return f"{k} is {dtype(found[k][1])}{kind} in the file but {dtype(d)} in the model"
    return None


def _fit_problem(model: nn.Module, path: Path, problem: str) -> CertkdError:
    spec = getattr(model, "spec", None)
    arch = f"a {spec.name} model for {spec.in_channels}×{spec.input_size}×{spec.input_size} inputs" if spec \
        else "this model"
    return CertkdError(f"checkpoint {path} does not fit {arch}: {problem}; the weights "
                       "belong to another architecture or one of the files was altered, restore the matching "
                       "model.safetensors or retrain")


def load_weights(model: nn.Module, path: Path) -> None:
    """Load ``path`` into ``model``: names, shapes and dtypes must all match (no silent casts)."""
    problem = _state_mismatch(_layout(model.state_dict()), read_layout(path))
    if problem is not None:
        raise _fit_problem(model, path, problem)
    tensors = read_tensors(path)
    problem = _state_mismatch(_layout(model.state_dict()), _layout(tensors))
    if problem is None:
        try:
            model.load_state_dict(tensors, strict=True)
        except RuntimeError as e:
            problem = (str(e).strip().splitlines() or ["shape mismatch"])[-1].strip()
    if problem is not None:
        raise _fit_problem(model, path, problem)


def load_model(path: PathLike, device: Union[str, torch.device] = "cpu") -> nn.Module:
    """Load a trained model in eval mode from a run directory, checkpoint or release folder.

    The returned :class:`~certkd.models.CertifiableNet` takes pixel-space inputs in [0, 1].
    """
    from certkd.models import ModelSpec, create_model_from_spec, list_models, model_kwargs_problem

    ckpt = resolve_checkpoint(path)
    meta = read_meta(ckpt)
    where, restore = ckpt / "meta.json", "restore the checkpoint's meta.json or retrain"
    # the metadata is untrusted: check it, and that it describes the tensors in the file, before allocating
    try:
        spec = ModelSpec.from_dict(meta["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise CertkdError(f"{where} has an invalid model description ({e}); {restore}") from None
    if spec.name not in list_models():
        raise CertkdError(f"{where} names an unknown model '{spec.name}' (this certkd has: "
                          f"{', '.join(list_models())}); {restore}, or use the certkd version that wrote it")
    bad = model_kwargs_problem(spec.name, spec.kwargs)
    if bad:
        raise CertkdError(f"{where} has invalid model kwargs: {bad[0]} ({bad[1]}); {restore}")
    weights = ckpt / "model.safetensors"
    found = read_layout(weights)
    with torch.device("meta"):  # shapes and dtypes only: no memory is allocated
        skeleton = create_model_from_spec(spec)
    problem = _state_mismatch(_layout(skeleton.state_dict()), found)
    if problem is not None:
        raise _fit_problem(skeleton, weights, problem)
    model = create_model_from_spec(spec)
    load_weights(model, weights)
    model.to(device).eval()
    model.certkd_meta = meta  # provenance for reports (config, epoch)
    return model
