"""Evaluate a trained run: the `certkd evaluate` command as a function."""
from __future__ import annotations

import contextlib
from typing import Dict, Optional

from certkd.checkpoints import checkpoint_eps, load_model, resolve_checkpoint
from certkd.choices import eps_error
from certkd.data import load_dataset
from certkd.data.subsets import describe_points, stratified_indices
from certkd.errors import CertkdError
from certkd.runs import (atomic_write_json, check_finite_weights, data_sha256, evaluation_path, fingerprint,
                         lock_run_dir, resolve_device, run_directory, training_progress)


def evaluate_run(path, *, eps: Optional[float] = None, limit: Optional[int] = None, data_dir: Optional[str] = None,
                 batch_size: int = 256, attack_steps: int = 40, attack_step_size: float = 0.1, device: str = "auto",
                 write: bool = True, progress: bool = False) -> Dict[str, float]:
    """Clean / PGD / IBP-verified accuracy of a run at its training ε over the test set.

    Writes ``evaluation.json`` into the run directory when ``write`` is true, holding the run's lock
    (:func:`certkd.runs.lock_run_dir`) from reading the checkpoint to writing: during a ``train`` or
    ``verify`` of the same run it raises a one-line CertkdError naming that writer.
    """
    dev = resolve_device(device)
    run = run_directory(path) if write else None
    with lock_run_dir(run, "certkd evaluate", "run") if run is not None else contextlib.nullcontext():
        return _evaluate(path, run, eps=eps, limit=limit, data_dir=data_dir, batch_size=batch_size,
                         attack_steps=attack_steps, attack_step_size=attack_step_size, dev=dev, progress=progress)


def _evaluate(path, run, *, eps: Optional[float], limit: Optional[int], data_dir: Optional[str], batch_size: int,
              attack_steps: int, attack_step_size: float, dev, progress: bool) -> Dict[str, float]:
    """:func:`evaluate_run` under its lock; writes into ``run`` unless it is None."""
    from certkd.verification import evaluate_accuracy

    ckpt = resolve_checkpoint(path)
    model = load_model(ckpt, device=dev)
    check_finite_weights(model, "evaluate")
    cfg = model.certkd_meta.get("config", {})
    eps = checkpoint_eps(model.certkd_meta, path) if eps is None else float(eps)
    if not 0.0 < eps <= 1.0:
        raise CertkdError(eps_error(eps))
    if batch_size < 1:
        raise CertkdError(f"--batch-size must be >= 1, got {batch_size}; pass e.g. --batch-size 256")
    if limit is not None and limit < 1:
        raise CertkdError(f"--limit must be >= 1, got {limit}; pass a positive number of test points or omit it for all")
    _, test_set, info = load_dataset(cfg.get("dataset", "digits"), data_dir or cfg.get("data_dir"))
    if info.input_size != model.spec.input_size or info.in_channels != model.spec.in_channels:
        raise CertkdError(f"model expects {model.spec.in_channels}×{model.spec.input_size}×{model.spec.input_size} "
                          f"inputs but the {info.name} data is {info.in_channels}×{info.input_size}×{info.input_size}; "
                          "pass the --data-dir of the dataset the model was trained on")
    result = evaluate_accuracy(model, test_set, eps, limit=limit, batch_size=batch_size, attack_steps=attack_steps,
                               attack_step_size=attack_step_size, device=dev, progress=progress)
    result.update(attack_steps=attack_steps, attack_step_size=attack_step_size, attack_restarts=1)
    result["method"] = cfg.get("method")
    result["checkpoint_epoch"] = model.certkd_meta.get("epoch")
    result["training"] = training_progress(model)
    index = stratified_indices(test_set.labels, limit)
    settings = {"attack_steps": attack_steps, "attack_step_size": attack_step_size, "attack_restarts": 1}
    result["certifies"] = fingerprint(model, eps=eps, dataset=info.name, split="test",
                                      points=describe_points(test_set.labels, index),
                                      data_digest=data_sha256(test_set.images[index], test_set.labels[index]),
                                      settings=settings, checkpoint=str(ckpt))
    if run is not None:
        try:
            atomic_write_json(evaluation_path(run), result)
        except OSError as e:
            raise CertkdError(f"cannot write {evaluation_path(run)} ({e.strerror}); make the run directory "
                              "writable") from None
    return result
