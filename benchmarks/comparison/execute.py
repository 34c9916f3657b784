"""Train, verify and evaluate the comparison's runs, and its order of work (resumable, one thread each).

teachers → tuning runs (train, verify the validation points) → each method's value by validation
complete-verified accuracy (CC-Dist: its β at CC-IBP's selected α) → selection.json (frozen) → final
runs (train, verify the test points once, PGD-40 of ``certkd evaluate``). Finished work is skipped.
Training, verification and provenance are the #21 study's (study.execute, study.provenance).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from comparison.design import SELECT_METRIC, Method
from comparison.plan import final_dir, method_config, teacher_seeds, tune_dir
from study.design import Setting
from study.execute import read_summary, run_jobs, train_run, verify_points
from study.orchestrate import choose, freeze, scores
from study.planner import StudyError, teacher_config, teacher_dir
from study.provenance import record, run_weights_sha256

#: certkd evaluate's attack on the test points (its defaults; the teachers of #21 use the same).
PGD = {"attack_steps": 40, "attack_step_size": 0.1}


def evaluate_pgd(run: Path, setting: Setting, data_dir: Optional[str] = None) -> Dict[str, Any]:
    """Clean, PGD-40 and IBP-verified accuracy (certkd.verification.evaluate_accuracy, ``certkd evaluate``)
    of the run on the setting's test points, cached in ``run/evaluate.json`` against the weights hash."""
    from certkd.checkpoints import atomic_write_json, latest_checkpoint, load_model
    from certkd.data import load_dataset
    from certkd.runs import read_config
    from certkd.verification import evaluate_accuracy

    out = run / "evaluate.json"
    weights = run_weights_sha256(run)
    if out.exists() and json.loads(out.read_text()).get("weights_sha256") == weights:
        return json.loads(out.read_text())
    cfg = read_config(run)
    _, test_set, _ = load_dataset(cfg.dataset, data_dir or cfg.data_dir)
    model = load_model(latest_checkpoint(run)).eval()
    res = evaluate_accuracy(model, test_set, float(cfg.eps), limit=setting.test_limit, **PGD)
    res = {k: res[k] for k in ("clean_accuracy", "pgd_accuracy", "ibp_verified_accuracy", "n")}
    res |= {"weights_sha256": weights, "attack": "PGD-40, step 0.1, 1 restart"}
    atomic_write_json(out, res)
    return res


def job(kind: str, setting: Setting, root: str, data_dir: Optional[str], method: str, value: Optional[float],
        seed: int, alpha: Optional[float]) -> str:
    """One unit of work in a worker process; returns its run folder.

    kinds: teacher (train a PGD-AT teacher), train (a tuning run), validate (verify a tuning run's
    validation points), final (train the selected config, verify the test points, evaluate PGD-40).
    """
    import torch

    torch.set_num_threads(1)
    rootp = Path(root)
    if kind == "teacher":
        path = teacher_dir(rootp, setting, method, seed)
        train_run(teacher_config(setting, method, seed, data_dir), path)
        return str(path)
    if kind == "final":
        path = final_dir(rootp, setting, method, seed)
        train_run(method_config(setting, method, value, seed, rootp, alpha, data_dir), path)
        s = read_summary(path, "test")
        if s is None or s["timeout_s"] != setting.timeout or s["weights_sha256"] != run_weights_sha256(path):
            verify_points(path, "test", setting, setting.timeout, data_dir)
            record(path, "test")
        evaluate_pgd(path, setting, data_dir)
        return str(path)
    path = tune_dir(rootp, setting, method, value, seed)
    if kind == "train":
        train_run(method_config(setting, method, value, seed, rootp, alpha, data_dir), path)
    elif kind == "validate":
        s = read_summary(path, "validation")
        if s is None or s["timeout_s"] != setting.timeout or s["weights_sha256"] != run_weights_sha256(path):
            verify_points(path, "validation", setting, setting.timeout, data_dir)
            record(path, "validate")
    else:
        raise ValueError(kind)
    return str(path)


def _tune(root: Path, setting: Setting, methods: Sequence[Method], data_dir: Optional[str], workers: int,
          chosen: Dict[str, float], log) -> None:
    for kind in ("train", "validate"):
        run_jobs([(kind, setting, str(root), data_dir, m.name, v, s, chosen.get(m.after) if m.after else None)
                  for s in setting.tune_seeds for m in methods for v in setting.grid(m)], workers, log, job)
    for m in methods:
        chosen[m.name] = choose(root, setting, m, tune_dir)
        log(f"[{setting.name}] {m.name}: {m.key} = {chosen[m.name]:g}")


def run_comparison(root: Path, setting: Setting, methods: Sequence[Method], data_dir: Optional[str], workers: int,
                   log) -> Dict[str, Any]:
    """Everything of one setting, resumable; returns the frozen selection."""
    missing = {m.after for m in methods if m.after} - {m.name for m in methods}
    if missing:
        raise StudyError(f"{', '.join(m.name for m in methods if m.after in missing)} trains at the α selected for "
                         f"{', '.join(sorted(missing))}: add it to --methods")
    r, n = str(root), setting.name
    log(f"[{n}] teachers")
    run_jobs([("teacher", setting, r, data_dir, "pgd-at", None, s, None) for s in teacher_seeds(setting, methods)],
             workers, log, job)
    chosen: Dict[str, float] = {}
    log(f"[{n}] tuning runs")
    _tune(root, setting, [m for m in methods if not m.after], data_dir, workers, chosen, log)
    _tune(root, setting, [m for m in methods if m.after], data_dir, workers, chosen, log)
    alpha = chosen.get("cc-ibp")
    sel = freeze(root, setting, {"alpha": alpha, "arms": chosen, "metric": SELECT_METRIC,
                                 "timeout_s": setting.timeout,
                                 "keys": {m.name: m.key for m in methods},
                                 "scores": {m.name: {f"{v:g}": s for v, s in scores(root, setting, m, tune_dir).items()}
                                            for m in methods}})
    log(f"[{n}] selection {chosen}; final runs on seeds 0..{setting.seeds - 1}, test verified once")
    run_jobs([("final", setting, r, data_dir, m.name, chosen[m.name], s, alpha if m.after else None)
              for s in setting.report_seeds() for m in methods], workers, log, job)
    return sel


def collect(root: Path, setting: Setting, methods: Sequence[Method], data_dir: Optional[str] = None
            ) -> Dict[str, Dict[int, Dict[str, Any]]]:
    """method -> seed -> the final run's metrics (complete test summary + evaluate's PGD-40), for the
    runs whose test verification is complete."""
    out: Dict[str, Dict[int, Dict[str, Any]]] = {}
    for m in methods:
        out[m.name] = {}
        for s in setting.report_seeds():
            path = final_dir(root, setting, m.name, s)
            summ = read_summary(path, "test")
            if summ is not None:
                ev = evaluate_pgd(path, setting, data_dir)
                out[m.name][s] = {**summ, "pgd40_accuracy": ev["pgd_accuracy"]}
    return out


def records(root: Path, setting: Setting) -> List[Dict[str, Any]]:
    """study.json of every run behind the report (teachers, tuning runs, final runs). A run still training
    (no study.json, no test.json yet) is left out, so that a report can be written while the comparison
    runs; a final run with test results but no record counts, and is refused by check_one_commit."""
    from study.provenance import read_record

    return [read_record(p) for sub in ("final/*", "teachers/*", "tune/*/*")
            for p in sorted((root / setting.name).glob(sub))
            if p.is_dir() and ((p / "study.json").exists() or (p / "test.json").exists())]
