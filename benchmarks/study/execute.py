"""Train, verify and evaluate the study's runs (one torch thread per process, resumable).

Validation points are verified into ``validation.jsonl`` of a tuning run, test points into ``test.jsonl``
of a final run, both by certkd's per-point pipeline (``verify_sample``: clean, PGD with 5 restarts,
IBP, CROWN, α-CROWN, branch and bound within the per-point time). A rows file starts over when the
weights, the points or the time limit changed (``*.meta.json`` names them).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from study.design import SETTINGS, Setting
from study.planner import (StudyError, final_dir, student_config, teacher_config, teacher_dir, tune_dir,
                           validation_indices)
from study.provenance import record, run_weights_sha256


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


def train_run(cfg, path: Path) -> bool:
    """Train ``cfg`` into ``path`` unless its last checkpoint is already at cfg.epochs; True if trained."""
    from certkd import train
    from certkd.checkpoints import latest_checkpoint, read_meta

    ck = latest_checkpoint(path) if path.exists() else None
    if ck is not None and int(read_meta(ck)["epoch"]) >= cfg.epochs:
        return False
    train(cfg, path, resume=ck is not None, force=ck is None and path.exists(), progress=False, log=lambda s: None)
    record(path, "train", cfg.to_dict())
    return True


def _points(run: Path, split: str, setting: Setting, data_dir: Optional[str]):
    """(dataset, indices) of the validation or test points of ``setting`` for the run's model."""
    from certkd.data import load_dataset
    from certkd.data.subsets import stratified_indices
    from certkd.runs import read_config

    cfg = read_config(run)
    train_set, test_set, _ = load_dataset(cfg.dataset, data_dir or cfg.data_dir)
    if split == "validation":
        return train_set, validation_indices(len(train_set), setting.held_out_start(), setting.n_val)
    if split == "test":
        return test_set, stratified_indices(test_set.labels, setting.test_limit)
    raise ValueError(split)


def verify_points(run: Path, split: str, setting: Setting, timeout: float, data_dir: Optional[str] = None,
                  limit: Optional[int] = None, name: Optional[str] = None) -> Dict[str, Any]:
    """Verify the run's model on its ``split`` points (the first ``limit`` of them); resumable.

    Returns the summary (certkd.verification.pipeline.summarize_rows, plus n_requested, complete,
    timeout_s, split, timeouts) and writes it to ``run/{name}.json``, rows to ``run/{name}.jsonl``.
    """
    import hashlib

    from certkd.checkpoints import atomic_write_json, append_jsonl, latest_checkpoint, load_model
    from certkd.verification.pipeline import VerifyConfig, read_rows, summarize_rows, verify_sample

    _one_thread()
    name = name or split
    data, indices = _points(run, split, setting, data_dir)
    indices = indices[:limit] if limit is not None else indices
    model = load_model(latest_checkpoint(run)).eval()
    eps = float(model.certkd_meta["config"]["eps"])
    vcfg = VerifyConfig(eps=eps, timeout=timeout, attack_restarts=5).validate()
    meta = {"split": split, "timeout_s": timeout, "weights_sha256": run_weights_sha256(run),
            "indices_sha256": hashlib.sha256(indices.numpy().tobytes()).hexdigest(), "eps": eps}
    rows_path, meta_path = run / f"{name}.jsonl", run / f"{name}.meta.json"
    if not meta_path.exists() or json.loads(meta_path.read_text()) != meta:
        rows_path.unlink(missing_ok=True)
        atomic_write_json(meta_path, meta)
    done = {r["index"] for r in read_rows(rows_path)}
    for i in indices.tolist():
        if i not in done:
            x, y = data.get(torch_index(i))
            append_jsonl(rows_path, verify_sample(model, x, int(y[0]), vcfg, index=i))
    rows = read_rows(rows_path)
    summary = {**summarize_rows(rows), "n_requested": len(indices), "complete": len(rows) == len(indices), **meta}
    summary["timeouts"] = summary["counts"].get("timeout", 0)
    atomic_write_json(run / f"{name}.json", summary)
    return summary


def torch_index(i: int):
    import torch

    return torch.tensor([i])


def read_summary(run: Path, name: str) -> Optional[Dict[str, Any]]:
    """A complete ``run/{name}.json`` summary, else None."""
    path = run / f"{name}.json"
    if not path.exists():
        return None
    s = json.loads(path.read_text())
    return s if s.get("complete") else None


def evaluate_teacher(run: Path, setting: Setting, data_dir: Optional[str] = None) -> Dict[str, Any]:
    """Clean and PGD-40 accuracy of a teacher on the setting's test points (``teacher_eval.json``)."""
    from certkd.checkpoints import atomic_write_json, latest_checkpoint, load_model
    from certkd.verification import evaluate_accuracy

    _one_thread()
    out = run / "teacher_eval.json"
    weights = run_weights_sha256(run)
    if out.exists() and json.loads(out.read_text()).get("weights_sha256") == weights:
        return json.loads(out.read_text())
    data, _ = _points(run, "test", setting, data_dir)
    model = load_model(latest_checkpoint(run)).eval()
    eps = float(model.certkd_meta["config"]["eps"])
    res = evaluate_accuracy(model, data, eps, limit=setting.test_limit, attack_steps=40, attack_step_size=0.1)
    res = {k: res[k] for k in ("clean_accuracy", "pgd_accuracy", "n")} | {"weights_sha256": weights,
                                                                          "attack": "PGD-40, step 0.1, 1 restart"}
    atomic_write_json(out, res)
    record(run, "teacher-eval")
    return res


def teacher_features(runs: Sequence[Path], setting: Setting, points: int, data_dir: Optional[str] = None):
    """Features (model.features) of each teacher on the first ``points`` validation points: a list of
    (points, m) numpy arrays."""
    import torch

    from certkd.checkpoints import latest_checkpoint, load_model

    data, indices = _points(runs[0], "validation", setting, data_dir)
    x, _ = data.get(indices[:points])
    out = []
    for r in runs:
        model = load_model(latest_checkpoint(r)).eval()
        with torch.no_grad():
            out.append(model.features(x).double().numpy())
    return out


# ------------------------------------------------------------------------------------------ jobs

def job(kind: str, setting_name: str, root: str, data_dir: Optional[str], arm: str, value: Optional[float],
        seed: int, alpha: Optional[float], timeout: Optional[float]) -> str:
    """One unit of work in a worker process; returns the run folder.

    kinds: teacher (train), train (a tuning run), validate (verify a tuning run's validation points),
    pilot (the first pilot_points validation points at the largest candidate time), final (train the
    selected config and verify the test points), teacher-eval.
    """
    _one_thread()
    st, rootp = SETTINGS[setting_name], Path(root)
    if kind in ("teacher", "teacher-eval"):
        path = teacher_dir(rootp, st, arm, seed)
        if kind == "teacher":
            train_run(teacher_config(st, arm, seed, data_dir), path)
        else:
            evaluate_teacher(path, st, data_dir)
        return str(path)
    if kind == "final":
        path = final_dir(rootp, st, arm, seed)
        train_run(student_config(st, arm, value, seed, rootp, alpha, data_dir), path)
        if read_summary(path, "test") is None or read_summary(path, "test")["timeout_s"] != timeout:
            verify_points(path, "test", st, timeout, data_dir)
            record(path, "test")
        return str(path)
    path = tune_dir(rootp, st, arm, value, seed)
    if kind == "train":
        train_run(student_config(st, arm, value, seed, rootp, alpha, data_dir), path)
    elif kind == "validate":
        s = read_summary(path, "validation")
        if s is None or s["timeout_s"] != timeout or s["weights_sha256"] != run_weights_sha256(path):
            verify_points(path, "validation", st, timeout, data_dir)
            record(path, "validate")
    elif kind == "pilot":
        verify_points(path, "validation", st, timeout, data_dir, limit=st.pilot_points, name="pilot")
    else:
        raise ValueError(kind)
    return str(path)


def _job_star(args: tuple) -> str:
    return job(*args)


def run_jobs(jobs: List[tuple], workers: int, log, fn: Optional[Callable[..., str]] = None) -> None:
    """Run ``jobs`` (argument tuples of ``fn``, default :func:`job`; ``fn`` a module-level function) on
    ``workers`` processes, in order when 1."""
    if not jobs:
        return
    fn = fn or job
    if workers <= 1:
        for j in jobs:
            log(f"  {j[0]} {fn(*j)}")
        return
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(workers) as pool:
        results = pool.map(_job_star, jobs) if fn is job else pool.map(fn, *zip(*jobs))
        for path, j in zip(results, jobs):
            log(f"  {j[0]} {path}")


def reproduce(path: Path, cfg, tmp: Path) -> Dict[str, Any]:
    """Retrain ``cfg`` into ``tmp`` and compare the weights with the run in ``path``."""
    from study.provenance import config_sha256, read_record

    _one_thread()
    original = run_weights_sha256(path)
    if original is None:
        raise StudyError(f"{path} has no checkpoint: train it before checking it")
    train_run(cfg, tmp)
    rerun = run_weights_sha256(tmp)
    stored = read_record(path).get("config_sha256")
    return {"run": str(path), "weights_sha256": original, "rerun_weights_sha256": rerun,
            "config_sha256": config_sha256(cfg.to_dict()), "stored_config_sha256": stored,
            "reproduces": original == rerun}
