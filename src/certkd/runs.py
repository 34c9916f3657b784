"""The run directory, owned in one place: everything else asks here (issue #13).

Layout of a run (file names :data:`CONFIG_FILE` ..., paths :func:`config_path` ...)::

    RUN/config.yaml            resolved configuration, read only by :func:`read_config`
    RUN/metrics.jsonl          one JSON object per epoch
    RUN/checkpoints/           epoch-NNNN/ folders and the ``latest`` pointer (format: certkd.checkpoints)
    RUN/evaluation.json        ``certkd evaluate``
    RUN/verification.json      ``certkd verify`` summary; rows in verification.jsonl (+ part files)

Also here: "is this a run?" (:func:`is_run_dir`: a folder with a config.yaml file; :func:`run_directory`:
the run owning a checkpoint path), the one writable-directory check (:func:`ensure_writable_dir`),
device resolution (:func:`resolve_device`), and what a stored result certifies.

Writers lock the folder they write (``train``, ``verify``, ``sweep``): :func:`lock_run_dir` holds
``RUN/.certkd.lock`` and refuses a second writer with one line naming the holder. It lives in
:mod:`certkd.run_lock` (re-exported here, with :data:`LOCK_FILE`, :func:`run_entries` and
:func:`clear_run_dir`); the lock file is never part of a run.

A verification or evaluation result is only meaningful for the exact weights, radius, test
points and settings it was computed with. Every ``verification.json`` and ``evaluation.json``
therefore carries a ``certifies`` record (:func:`fingerprint`), and ``verify --resume`` reuses
rows only when the stored record equals the new one (:func:`check_same_subject`): rows computed
for other weights must never be reported as certificates of these (docs/bad_inputs.md lists the
refusals).

The atomic writers (:func:`atomic_write_json`, ...) and :data:`CHECKPOINTS_DIR` are re-exported from
:mod:`certkd.checkpoints`, which implements them: it writes the checkpoint files with them and sits below this module
(:func:`run_directory` needs its ``resolve_checkpoint``), so moving them here would be an import
cycle. This module imports :mod:`certkd.config`, :mod:`certkd.checkpoints` and :mod:`certkd.run_lock`, never training,
reporting, sweep, verification or the CLI, which all sit above it.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Dict, Mapping, NamedTuple, Optional, Union

import torch
import yaml
from torch import nn

from certkd._version import __version__
from certkd.checkpoints import (CHECKPOINTS_DIR, append_jsonl, atomic_write_bytes,  # noqa: F401  (re-exported)
                                atomic_write_json, atomic_write_text, resolve_checkpoint)
from certkd.config import TrainConfig, apply_overrides
from certkd.errors import CertkdError
from certkd.run_lock import LOCK_FILE, RunLock, clear_run_dir, lock_run_dir, run_entries  # noqa: F401  (re-exported)

PathLike = Union[str, os.PathLike]


# ---------------------------------------------------------------------------------------------
# Layout
# ---------------------------------------------------------------------------------------------

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
# CHECKPOINTS_DIR ("checkpoints") is re-exported from certkd.checkpoints, whose writer sits below this module
EVALUATION_FILE = "evaluation.json"
VERIFICATION_FILE = "verification.json"
VERIFICATION_ROWS_FILE = "verification.jsonl"
VERIFICATION_PARTS_GLOB = "verification.part*.jsonl"  # one per worker while a verification runs
SWEEP_FILE = "sweep.json"  # in a sweep folder, next to its runs


def config_path(run_dir: PathLike) -> Path:
    """``RUN/config.yaml``."""
    return Path(run_dir) / CONFIG_FILE


def metrics_path(run_dir: PathLike) -> Path:
    """``RUN/metrics.jsonl``."""
    return Path(run_dir) / METRICS_FILE


def checkpoints_dir(run_dir: PathLike) -> Path:
    """``RUN/checkpoints``."""
    return Path(run_dir) / CHECKPOINTS_DIR


def evaluation_path(run_dir: PathLike) -> Path:
    """``RUN/evaluation.json``."""
    return Path(run_dir) / EVALUATION_FILE


def verification_path(run_dir: PathLike) -> Path:
    """``OUT/verification.json`` (OUT: the run, or verify's ``--out``)."""
    return Path(run_dir) / VERIFICATION_FILE


def verification_rows_path(run_dir: PathLike) -> Path:
    """``OUT/verification.jsonl``."""
    return Path(run_dir) / VERIFICATION_ROWS_FILE


def verification_part_path(run_dir: PathLike, worker: int) -> Path:
    """``OUT/verification.partK.jsonl``: the rows worker K appends while a verification runs."""
    return Path(run_dir) / f"verification.part{worker}.jsonl"


def is_run_dir(path: PathLike) -> bool:
    """Whether ``path`` is a run directory: a folder holding a ``config.yaml`` file."""
    p = Path(path)
    return p.is_dir() and (p / CONFIG_FILE).is_file()


def run_directory(path: PathLike) -> Optional[Path]:
    """The run directory owning a checkpoint path (a run, one of its checkpoints, or a folder with weights and
    a config.yaml); None for a bare release folder. Raises CertkdError when ``path`` holds no checkpoint."""
    ck = resolve_checkpoint(path)
    if ck.parent.name == CHECKPOINTS_DIR:
        return ck.parent.parent
    return ck if Path(path).resolve() == ck.resolve() and is_run_dir(ck) else None


def first_missing(path: PathLike) -> Optional[Path]:
    """The topmost folder of ``path`` that does not exist yet (what creating it would add); None if it exists."""
    p = Path(path)
    if p.exists():
        return None
    while not p.parent.exists() and p.parent != p.parent.parent:
        p = p.parent
    return p


def ensure_writable_dir(path: PathLike, what: str = "output directory", option: str = "--out", *,
                        create: bool = True, probe: bool = False) -> None:
    """Make sure ``path`` is (or can become) a folder this process may write into; a one-line CertkdError if not.

    Args:
        path: the folder.
        what: how messages name it ("output directory", "--vnnlib-dir").
        option: the option that chooses it, for the fix ("choose a writable --out").
        create: create it (with its parents); False checks without touching the disk: the nearest existing
            ancestor must be a folder this process may write into.
        probe: also write and delete a file in it (catches what ``os.access`` misses, e.g. root on a
            read-only mount).
    """
    p = Path(path)
    if not create:
        missing = first_missing(p)
        parent = p if missing is None else missing.parent
        if not parent.is_dir():
            raise CertkdError(f"cannot create {what} {p} ({parent} is a file); choose another {option}")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise CertkdError(f"cannot write to {what} {p} (Permission denied); choose a writable {option}")
        return
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CertkdError(f"cannot create {what} {p} ({e.strerror or e}); choose a writable {option}") from None
    if not p.is_dir():
        raise CertkdError(f"{what} {p} is not a directory; choose another {option}")
    if not os.access(p, os.W_OK | os.X_OK):
        raise CertkdError(f"cannot write to {what} {p} (Permission denied); choose a writable {option}")
    if probe:
        test = p / ".write-test"
        try:
            test.write_text("")
            test.unlink()
        except OSError as e:
            raise CertkdError(f"cannot write to {what} {p} ({e.strerror or e}); choose a writable {option}") from None


# ---------------------------------------------------------------------------------------------
# The stored config
# ---------------------------------------------------------------------------------------------

CONFIG_MAX_BYTES = 1 << 20  # a run config is a few kB; never read an unbounded file (a link to /dev/zero)
DEFAULT_FIX = "restore it, or retrain the run"


class StoredConfig(NamedTuple):
    """A run's configuration and the preset it was made from (recorded by newer versions; not a config key)."""

    config: TrainConfig
    preset: Optional[str]


def read_stored_config(run_dir: PathLike, fix: str = DEFAULT_FIX) -> StoredConfig:
    """``RUN/config.yaml`` as a :class:`StoredConfig` (not validated: ``.config.validate()`` checks it).

    The file is untrusted: read as a bounded regular file, decoded as UTF-8, parsed as a YAML mapping
    and applied key by key. Every failure is one line naming the file and the fix.

    Args:
        run_dir: the run directory.
        fix: what the message tells the user to do about a missing or broken file.
    Raises:
        CertkdError: the file is missing, unreadable, not UTF-8, not YAML, not a mapping, or holds an
            unknown key or a bad value (then the message is the key's, prefixed by the path).
    """
    path = config_path(run_dir)
    try:
        if path.exists() and not path.is_file():
            raise CertkdError(f"{path} is not a regular file; {fix}")
        with open(path, "rb") as f:
            raw = f.read(CONFIG_MAX_BYTES + 1)
    except OSError as e:
        raise CertkdError(f"cannot read {path} ({e.strerror or e}); {fix}") from None
    if len(raw) > CONFIG_MAX_BYTES:
        raise CertkdError(f"{path} is larger than {CONFIG_MAX_BYTES >> 20} MB, not a certkd run config; {fix}")
    try:
        values = yaml.safe_load(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise CertkdError(f"{path} is not a text file (not UTF-8); {fix}") from None
    except yaml.YAMLError:
        raise CertkdError(f"{path} is not valid YAML; {fix}") from None
    if not isinstance(values, dict):
        raise CertkdError(f"{path} is not a mapping of config keys; {fix}")
    values = dict(values)
    preset = values.pop("preset", None)
    try:
        cfg = apply_overrides(TrainConfig(), values)
    except CertkdError as e:
        raise CertkdError(f"{path}: {e}") from None
    return StoredConfig(cfg, str(preset) if preset else None)


def read_config(run_dir: PathLike, fix: str = DEFAULT_FIX) -> TrainConfig:
    """The :class:`TrainConfig` in ``RUN/config.yaml`` (errors as :func:`read_stored_config`)."""
    return read_stored_config(run_dir, fix).config


def write_config(run_dir: PathLike, cfg: TrainConfig) -> Path:
    """Write ``RUN/config.yaml`` atomically: the config keys in field order, what :func:`read_config`
    reads back and what makes the folder a run (:func:`is_run_dir`). Returns the file's path."""
    path = config_path(run_dir)
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return path


def find_config(run_dir: PathLike, fix: str = DEFAULT_FIX) -> Optional[TrainConfig]:
    """As :func:`read_config`, but None when ``RUN/config.yaml`` does not exist (a broken one still raises)."""
    if not config_path(run_dir).exists():
        return None
    return read_config(run_dir, fix)


# ---------------------------------------------------------------------------------------------
# Devices
# ---------------------------------------------------------------------------------------------

def resolve_device(name: str) -> torch.device:
    """The torch device for ``auto``, ``cpu`` or ``cuda[:N]``; a one-line CertkdError otherwise."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CertkdError(f"device '{name}' requested but CUDA is not available; use --device cpu or auto")
    try:
        return torch.device(name)
    except RuntimeError:
        raise CertkdError(f"unknown device '{name}'; use auto, cpu or cuda[:N]") from None


# ---------------------------------------------------------------------------------------------
# What a stored result certifies
# ---------------------------------------------------------------------------------------------

# Keys compared on resume, in the order a mismatch is reported, with the words used for them.
_COMPARED = (
    ("weights_sha256", "other weights"),
    ("model", "another model description"),
    ("eps", "another eps"),
    ("dataset", "another dataset"),
    ("split", "another data split"),
    ("indices_sha256", "other test points"),
    ("data_sha256", "other data (another --data-dir?)"),
    ("settings", "other engine settings"),
    ("certkd_version", "another certkd version"),
)


def weights_sha256(weights: Union[nn.Module, Mapping[str, torch.Tensor]]) -> str:
    """SHA-256 over a state dict (a module's, or tensors read from model.safetensors): every
    tensor's name, dtype, shape and bytes, by name. Equal for a model and the file it was loaded from."""
    state = weights.state_dict() if isinstance(weights, nn.Module) else weights
    h = hashlib.sha256()
    for name, t in sorted(state.items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def data_sha256(images: torch.Tensor, labels: torch.Tensor) -> str:
    """SHA-256 of the selected points' stored images (any dtype) and labels."""
    h = hashlib.sha256()
    for t in (images, labels):
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def fingerprint(model: nn.Module, *, eps: float, dataset: str, split: str, points: Mapping[str, Any],
                data_digest: str, settings: Optional[Mapping[str, Any]] = None,
                checkpoint: Optional[str] = None) -> Dict[str, Any]:
    """The ``certifies`` record of a result.

    Args:
        model: the loaded network (its ``certkd_meta`` supplies the model description and epoch).
        eps: L∞ radius in pixel units.
        dataset, split: dataset name and split ("test").
        points: :func:`certkd.data.subsets.describe_points` of the selected points.
        data_digest: :func:`data_sha256` of those points.
        settings: engine / attack settings.
        checkpoint: path of the checkpoint folder, for the reader (not compared).
    """
    meta = getattr(model, "certkd_meta", {}) or {}
    return {
        "weights_sha256": weights_sha256(model),
        "model": meta.get("model"),
        "checkpoint": checkpoint,
        "checkpoint_epoch": meta.get("epoch"),
        "eps": float(eps),
        "dataset": dataset,
        "split": split,
        "points": points.get("points"),
        "n": points.get("n"),
        "indices_sha256": points.get("indices_sha256"),
        "data_sha256": data_digest,
        "settings": dict(settings or {}),
        "certkd_version": __version__,
    }


def subject_mismatch(old: Mapping[str, Any], new: Mapping[str, Any]) -> Optional[str]:
    """The first way two ``certifies`` records differ, in words; None when they match."""
    for key, words in _COMPARED:
        if old.get(key) != new.get(key):
            a, b = old.get(key), new.get(key)
            if key.endswith("sha256") and isinstance(a, str) and isinstance(b, str):
                a, b = a[:12], b[:12]
            elif key in ("model", "settings"):
                diff = sorted(k for k in set(a or {}) | set(b or {}) if (a or {}).get(k) != (b or {}).get(k))
                return f"{words} ({', '.join(diff) or 'missing'})"
            return f"{words} ({a} then, {b} now)"
    return None


def check_same_subject(stored: Any, new: Mapping[str, Any], path: str) -> None:
    """Refuse to resume ``path`` unless its ``certifies`` record equals ``new``.

    Raises:
        CertkdError: one line naming the first mismatch and the fix (``--force``).
    """
    old = stored.get("certifies") if isinstance(stored, dict) else None
    if not isinstance(old, dict):
        raise CertkdError(f"--resume: {path} does not record which weights it certifies (made by an older certkd); "
                          "pass --force to start over")
    problem = subject_mismatch(old, new)
    if problem is not None:
        raise CertkdError(f"--resume: {path} was computed for {problem}; pass --force to start over, or --out to "
                          "keep it and write elsewhere")


def check_finite_weights(model: nn.Module, action: str) -> None:
    """Refuse a model with NaN/Inf weights: its numbers would be garbage (evaluate) or unsound (verify)."""
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CertkdError(f"model weights contain NaN/Inf ({name}); refusing to {action}, restore the checkpoint "
                              "or retrain")


def training_progress(model: nn.Module) -> Dict[str, Any]:
    """``{"epoch": e, "epochs": E, "finished": e >= E, "final_training_eps": ε}`` of a loaded checkpoint
    (None where unknown): ε is the training ε reached at the end of epoch e (None for standard training)."""
    meta = getattr(model, "certkd_meta", {}) or {}
    epoch = meta.get("epoch")
    config = meta.get("config") or {}
    epochs = config.get("epochs")
    ok = isinstance(epoch, int) and isinstance(epochs, int)
    out = {"epoch": epoch, "epochs": epochs, "finished": (epoch >= epochs) if ok else None}
    if isinstance(epoch, int) and isinstance(config, dict):
        from certkd.schedules import training_eps_reached

        try:
            out["final_training_eps"] = training_eps_reached(config, epoch)
        except (TypeError, ValueError):  # untrusted metadata: no number rather than a crash
            out["final_training_eps"] = None
    return out


COLLAPSE_SHARE = 0.9  # one class predicted for >= 90% of >= 20 points: a constant classifier


def collapse(predicted: torch.Tensor, num_classes: int) -> Dict[str, Any]:
    """How concentrated the predictions are: ``{"top_class", "top_share", "collapsed"}``.

    Args:
        predicted: (n,) int64 predicted classes on the evaluated points.
        num_classes: number of classes (a 2-class model is never called collapsed).
    """
    n = int(predicted.numel())
    if n == 0:
        return {"top_class": None, "top_share": None, "collapsed": False}
    counts = torch.bincount(predicted.reshape(-1).cpu(), minlength=num_classes)
    top = int(counts.argmax())
    share = float(counts[top]) / n
    return {"top_class": top, "top_share": round(share, 4),
            "collapsed": bool(n >= 20 and num_classes > 2 and share >= COLLAPSE_SHARE)}


def result_warnings(result: Mapping[str, Any]) -> list:
    """One-line warnings for a stored result: unfinished training, collapsed predictions, low training ε."""
    out = []
    prog = result.get("training") or {}
    if prog.get("finished") is False:
        out.append(f"unfinished run: measured at epoch {prog.get('epoch')} of {prog.get('epochs')}")
    final, eps = prog.get("final_training_eps"), result.get("eps")
    if isinstance(final, (int, float)) and isinstance(eps, (int, float)) and final < float(eps) * (1 - 1e-3):
        out.append(f"training ε reached only {final:.4g} by epoch {prog.get('epoch')} but it is evaluated at "
                   f"ε={float(eps):g}, beyond what it was trained for; retrain with a ramp that ends within the "
                   "epochs (--epochs rescales it; or --set eps_length=N) or evaluate at a smaller --eps")
    col = result.get("predictions") or {}
    if col.get("collapsed"):
        out.append(f"collapsed model: it predicts class {col.get('top_class')} for {100 * col['top_share']:.0f}% of "
                   "the points; retrain it (lower lr or eps, longer warm-up)")
    return out
