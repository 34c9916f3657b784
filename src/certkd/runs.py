"""What a stored result certifies: the fingerprint of weights, data points and settings.

A verification or evaluation result is only meaningful for the exact weights, radius, test
points and settings it was computed with. Every ``verification.json`` and ``evaluation.json``
therefore carries a ``certifies`` record (:func:`fingerprint`), and ``verify --resume`` reuses
rows only when the stored record equals the new one (:func:`check_same_subject`): rows computed
for other weights must never be reported as certificates of these (docs/bad_inputs.md lists the
refusals).
"""
from __future__ import annotations

import hashlib
from typing import Any, Dict, Mapping, Optional, Union

import torch
from torch import nn

from certkd._version import __version__
from certkd.errors import CertkdError

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
