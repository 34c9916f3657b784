"""Per-sample verification pipeline (SPEC §6), resumable and split across workers.

For each test point, in order, stopping at the first stage that decides it:

1. clean check → ``misclassified``;
2. PGD (40 steps, relative step 0.035, configurable restarts) → ``attacked``; the
   counterexample is re-checked by a float32 forward at the point clipped to the box;
3. IBP → ``verified-ibp``; CROWN → ``verified-crown``; α-CROWN → ``verified-alpha-crown``;
4. complete verification (``engine``: ``bab`` or ``milp``) with a per-sample timeout →
   ``verified-bab`` (or ``verified-milp``), ``attacked`` (re-checked counterexample) or
   ``timeout``.

Verified accuracy = verified / attempted: misclassified points count in the denominator.
Rows go to ``verification.jsonl`` (``index``, ``label``, ``status``, ``time_s``, ``margin``),
the summary to ``verification.json``. Each worker appends complete lines to its own part
file (flushed and fsynced line by line; a torn last line is dropped on resume), and the
merged files are written atomically at the end.

Precision: TF32 is always off. Bounds and attacks run in float32 by default; ``dtype="float64"``
(``certkd verify --dtype float64``) runs the PGD attack and the IBP, CROWN and α-CROWN bounds
on a float64 copy of the network, which removes float32 rounding from the bounds. Concrete
points are always judged by the float32 network as deployed: the clean check, and the
re-check of every counterexample. The complete stage keeps its own arithmetic (BaB's β-CROWN
on the float32 network, the MILP in float64 in HiGHS).
"""
from __future__ import annotations

import copy
import json
import math
import os
import statistics
import time
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn

from certkd.attacks import PGD, linf_box, margin_loss
from certkd.bounds import ibp_logit_difference_bounds
from certkd import precision
from certkd.checkpoints import atomic_write_json, atomic_write_text
from certkd.errors import CertkdError

VERIFIED = ("verified-ibp", "verified-crown", "verified-alpha-crown", "verified-bab", "verified-milp")
STATUSES = ("misclassified", "attacked") + VERIFIED + ("timeout",)
ENGINES = ("bab", "milp", "none")
DTYPES = ("float32", "float64")
_FLOAT64_COPIES: "weakref.WeakKeyDictionary[nn.Module, nn.Module]" = weakref.WeakKeyDictionary()


def _float64_copy(model: nn.Module) -> nn.Module:
    """A float64 copy of ``model`` (made once per model and process)."""
    copy64 = _FLOAT64_COPIES.get(model)
    if copy64 is None:
        copy64 = _FLOAT64_COPIES[model] = copy.deepcopy(model).double().eval()
    return copy64


@dataclass(frozen=True)
class VerifyConfig:
    """Settings of one verification run (stored in verification.json; resume requires equality)."""

    eps: float
    timeout: float = 60.0
    engine: str = "bab"
    attack_steps: int = 40
    attack_step_size: float = 0.035
    attack_restarts: int = 1
    crown: bool = True
    crown_intermediate: str = "auto"   # "auto": CROWN intermediates only where cheap (see _intermediate)
    alpha_iterations: int = 20
    alpha_lr: float = 0.1
    seed: int = 0
    dtype: str = "float32"             # "float64": attack and IBP/CROWN/α-CROWN bounds in float64

    def validate(self) -> "VerifyConfig":
        if not 0.0 < self.eps <= 1.0:
            raise CertkdError(f"eps must be in (0, 1] (pixel units), got {self.eps}; pass --eps in pixel units of [0, 1] images, e.g. --eps 0.1 (MNIST) or --eps 0.00784 (2/255)")
        if not self.timeout > 0:
            raise CertkdError(f"timeout must be > 0 seconds, got {self.timeout}; pass e.g. --timeout 60")
        if self.engine not in ENGINES:
            raise CertkdError(f"unknown engine '{self.engine}'; choose one of: {', '.join(ENGINES)}")
        if self.attack_restarts < 1 or self.attack_steps < 0:
            raise CertkdError("attack restarts must be >= 1 and steps >= 0")
        if self.dtype not in DTYPES:
            raise CertkdError(f"unknown dtype '{self.dtype}'; choose float32 or float64")
        return self


def _intermediate(model: nn.Module, cfg: VerifyConfig):
    """Which pre-activation layers get CROWN passes: all of them for small nets, else the last.

    Full CROWN intermediates on a wide CNN cost minutes and GBs on CPU (SPEC §11), so on CPU
    the early conv layers keep IBP bounds unless asked otherwise.
    """
    if cfg.crown_intermediate != "auto":
        return cfg.crown_intermediate
    n_relu = sum(isinstance(m, nn.ReLU) for m in model.features)
    n_params = sum(p.numel() for p in model.parameters())
    return "crown" if n_params < 2_000_000 else {n_relu - 1}


def _float32_margin(model: nn.Module, x: torch.Tensor, y: int, lower: torch.Tensor, upper: torch.Tensor) -> float:
    """z_y − max_{j≠y} z_j at x clipped to the box, computed by a float32 forward."""
    x = torch.max(torch.min(x.float(), upper), lower)
    with torch.no_grad():
        return float(-margin_loss(model(x), torch.tensor([y], device=x.device))[0])


def verify_sample(model: nn.Module, x: torch.Tensor, y: int, cfg: VerifyConfig, index: int = 0) -> Dict[str, Any]:
    """Run the pipeline on one point. x: (1, C, H, W) pixel space. Returns the JSONL row."""
    start = time.perf_counter()
    row: Dict[str, Any] = {"index": int(index), "label": int(y)}
    yt = torch.tensor([y], device=x.device)
    lo, hi = linf_box(x, cfg.eps)

    def done(status: str, margin: Optional[float], **extra: Any) -> Dict[str, Any]:
        row.update(status=status, margin=None if margin is None else float(margin),
                   time_s=round(time.perf_counter() - start, 4), **extra)
        return row

    with torch.no_grad():
        logits = model(x)
    clean_margin = float(-margin_loss(logits, yt)[0])
    if clean_margin <= 0:
        return done("misclassified", clean_margin)

    ref, x32, lo32, hi32 = model, x, lo, hi  # the float32 network judges concrete points
    if cfg.dtype == "float64":  # attack and bounds in float64
        model, x = _float64_copy(model), x.double()
        lo, hi = linf_box(x, cfg.eps)
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + int(index))  # order-independent
    attack = PGD(cfg.attack_steps, cfg.attack_step_size, cfg.attack_restarts, stop_on_success=True)
    x_adv = attack(model, x, yt, lo, hi, generator=gen)
    adv_margin = _float32_margin(ref, x_adv, y, lo32, hi32)
    if adv_margin <= 0:
        return done("attacked", adv_margin, stage="pgd")

    with torch.no_grad():
        lb_ibp, _ = ibp_logit_difference_bounds(model, lo, hi, yt)
    best = lb_ibp.clone()
    if not torch.isfinite(best).all():  # NaN compares False, +inf would certify anything: never trust either
        bad = float(best[~torch.isfinite(best)][0])
        raise CertkdError(f"non-finite IBP bound ({bad}) at test point {index}: refusing to certify; the model's "
                          "weights overflow or are NaN/Inf, restore the checkpoint or retrain")
    if float(best.min()) > 0:
        return done("verified-ibp", float(best.min()))
    if cfg.crown:
        from certkd.bounds.crown import alpha_crown_bounds, crown_bounds

        inter = _intermediate(model, cfg)
        lb_crown = crown_bounds(model, lo, hi, yt, intermediate=inter)
        best = torch.maximum(best, torch.where(torch.isfinite(lb_crown), lb_crown, best))
        if float(best.min()) > 0:
            return done("verified-crown", float(best.min()))
        if cfg.alpha_iterations > 0:
            lb_alpha = alpha_crown_bounds(model, lo, hi, yt, iterations=cfg.alpha_iterations, lr=cfg.alpha_lr,
                                          intermediate=inter)
            best = torch.maximum(best, torch.where(torch.isfinite(lb_alpha), lb_alpha, best))
            if float(best.min()) > 0:
                return done("verified-alpha-crown", float(best.min()))
    if cfg.engine == "none":
        return done("timeout", float(best.min()), stage="incomplete")
    remaining = cfg.timeout - (time.perf_counter() - start)
    if remaining <= 0:
        return done("timeout", float(best.min()))
    if cfg.engine == "milp":
        from certkd.verification.milp import milp_verify

        res = milp_verify(ref, x32[0], int(y), lower=lo32[0], upper=hi32[0], timeout=remaining)
        status_map = {"verified": "verified-milp"}
    else:
        from certkd.verification.bab import bab_verify

        res = bab_verify(ref, x32[0], int(y), lower=lo32[0], upper=hi32[0], timeout=remaining)
        status_map = {"verified": "verified-bab"}
    if res.status == "falsified":
        margin = _float32_margin(ref, res.counterexample.unsqueeze(0).to(x.device), y, lo32, hi32)
        if margin <= 0:
            return done("attacked", margin, stage=cfg.engine)
        return done("timeout", float(best.min()), note="counterexample did not re-check in float32")
    if res.status == "verified":
        return done(status_map["verified"], res.margin)
    return done("timeout", res.margin if res.margin is not None else float(best.min()))


# ------------------------------------------------------------------------------------------ runs

def _read_rows(path: Path) -> List[Dict[str, Any]]:
    """Complete rows of a JSONL file; a torn last line (crash mid-write) is ignored."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def summarize(rows: Sequence[Dict[str, Any]], cfg: VerifyConfig, n_total: int) -> Dict[str, Any]:
    counts = {s: 0 for s in STATUSES}
    for r in rows:
        counts[r["status"]] += 1
    n = len(rows)
    verified_ibp = counts["verified-ibp"]
    verified_crown = verified_ibp + counts["verified-crown"]
    verified_alpha = verified_crown + counts["verified-alpha-crown"]
    verified = sum(counts[s] for s in VERIFIED)
    pgd_found = sum(1 for r in rows if r["status"] == "attacked" and r.get("stage", "pgd") == "pgd")
    frac = (lambda k: k / n) if n else (lambda k: 0.0)
    return {
        "n": n, "n_requested": n_total, "complete": n == n_total, "eps": cfg.eps,
        "clean_accuracy": frac(n - counts["misclassified"]),
        # PGD alone; counterexamples found later (BaB's sub-domain attack, MILP) count only in
        # the empirical robust accuracy, the tightest upper bound on the true robust accuracy
        "pgd_accuracy": frac(n - counts["misclassified"] - pgd_found),
        "empirical_robust_accuracy": frac(n - counts["misclassified"] - counts["attacked"]),
        "falsified_by_verifier": counts["attacked"] - pgd_found,
        "ibp_verified_accuracy": frac(verified_ibp),
        "crown_verified_accuracy": frac(verified_crown),
        "alpha_crown_verified_accuracy": frac(verified_alpha),
        "verified_accuracy": frac(verified),
        "counts": counts,
        "median_time_s": statistics.median([r["time_s"] for r in rows]) if rows else None,
        "settings": asdict(cfg),
    }


def _worker(args) -> None:
    model_path, data_spec, indices, cfg_dict, part_path, device, threads = args
    torch.set_num_threads(threads)
    precision.set_tf32_flags(False, False)  # a fresh process: PyTorch's default has cuDNN TF32 on
    from certkd.checkpoints import load_model
    from certkd.data import load_dataset

    cfg = VerifyConfig(**cfg_dict)
    model = load_model(model_path, device=device)
    _, test_set, _ = load_dataset(*data_spec)
    _verify_indices(model, test_set, indices, cfg, Path(part_path), device)


def _verify_indices(model, test_set, indices, cfg, part_path: Path, device, progress=None) -> None:
    with open(part_path, "a") as f:
        for i in indices:
            x, y = test_set.get(torch.tensor([i]))
            row = verify_sample(model, x.to(device), int(y[0]), cfg, index=i)
            f.write(json.dumps(row, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
            if progress is not None:
                progress.update(1)


def verify_run(path, cfg: VerifyConfig, *, limit: Optional[int] = None, out_dir=None, workers: int = 1,
               resume: bool = False, data_dir: Optional[str] = None, device: str = "auto",
               progress: bool = True) -> Dict[str, Any]:
    """Verify the first ``limit`` test points of a run; returns the summary (also written to disk).

    TF32 is off throughout (SPEC §3.3) and the caller's TF32 flags are restored on return.
    """
    with precision.tf32(False):
        return _verify_run(path, cfg, limit=limit, out_dir=out_dir, workers=workers, resume=resume,
                           data_dir=data_dir, device=device, progress=progress)


def _verify_run(path, cfg: VerifyConfig, *, limit: Optional[int], out_dir, workers: int, resume: bool,
                data_dir: Optional[str], device: str, progress: bool) -> Dict[str, Any]:
    from certkd.checkpoints import load_model, resolve_checkpoint
    from certkd.data import load_dataset
    from certkd.evaluation import run_directory
    from certkd.training import resolve_device

    cfg.validate()
    if workers < 1:
        raise CertkdError(f"--workers must be >= 1, got {workers}; pass e.g. --workers 2 (one process per worker)")
    if limit is not None and limit < 1:
        raise CertkdError(f"--limit must be >= 1, got {limit}; pass a positive number of test points or omit it for all")
    dev = resolve_device(device)
    model = load_model(path, device=dev)
    bad = [name for name, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise CertkdError(f"model weights contain NaN/Inf ({bad[0]}); refusing to verify, restore the checkpoint "
                          "or retrain")
    meta_cfg = model.certkd_meta.get("config", {})
    data_spec = (meta_cfg.get("dataset", "digits"), data_dir or meta_cfg.get("data_dir"))
    _, test_set, info = load_dataset(*data_spec)
    if info.input_size != model.spec.input_size or info.in_channels != model.spec.in_channels:
        s = model.spec
        raise CertkdError(f"model expects {s.in_channels}×{s.input_size}×{s.input_size} inputs but the "
                          f"{info.name} data is {info.in_channels}×{info.input_size}×{info.input_size}; pass the "
                          "--data-dir of the dataset the model was trained on")
    n_total = min(limit or len(test_set), len(test_set))

    out = Path(out_dir) if out_dir is not None else (run_directory(path) or resolve_checkpoint(path))
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CertkdError(f"cannot create output directory {out} ({e.strerror}); choose a writable --out") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise CertkdError(f"cannot write to output directory {out} (Permission denied); choose a writable --out")
    summary_path, rows_path = out / "verification.json", out / "verification.jsonl"
    parts = sorted(out.glob("verification.part*.jsonl"))
    settings = {"settings": asdict(cfg), "n_requested": n_total}
    if resume:
        if summary_path.exists():
            try:
                old = json.loads(summary_path.read_text())
            except ValueError:
                raise CertkdError(f"--resume: {summary_path} is corrupt, so its settings cannot be checked; rerun "
                                  "without --resume to start over") from None
            if not isinstance(old, dict) or old.get("settings") != asdict(cfg) or old.get("n_requested") != n_total:
                raise CertkdError(f"--resume: {summary_path} was made with other settings; rerun without --resume "
                                  "(or with the same --eps/--timeout/--limit/--engine)")
    elif summary_path.exists() or parts or rows_path.exists():
        for p in parts + [rows_path]:
            if p.exists():
                p.unlink()
        parts = []
    atomic_write_json(summary_path, dict(summarize([], cfg, n_total), **settings, complete=False))

    done_rows = {r["index"]: r for r in _read_rows(rows_path)}
    for p in parts:
        kept = _read_rows(p)
        done_rows.update({r["index"]: r for r in kept})
        # drop a torn last line so that appended rows start on a fresh line
        atomic_write_text(p, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
    todo = [i for i in range(n_total) if i not in done_rows]
    bar = None
    if progress and todo:
        from tqdm import tqdm
        bar = tqdm(total=n_total, initial=n_total - len(todo), desc="verify", dynamic_ncols=True)
    if todo:
        if workers == 1:
            _verify_indices(model, test_set, todo, cfg, out / "verification.part0.jsonl", dev, bar)
        else:
            import multiprocessing as mp

            n_gpu = torch.cuda.device_count() if dev.type == "cuda" else 0
            threads = max(1, (os.cpu_count() or 1) // workers)
            jobs = []
            for k in range(workers):
                chunk = todo[k::workers]
                if not chunk:
                    continue
                wdev = f"cuda:{k % n_gpu}" if n_gpu else "cpu"
                jobs.append((str(path), data_spec, chunk, asdict(cfg), str(out / f"verification.part{k}.jsonl"),
                             wdev, threads))
            ctx = mp.get_context("spawn")
            with ctx.Pool(len(jobs)) as pool:
                pool.map(_worker, jobs)
    if bar is not None:
        bar.close()
    for p in sorted(out.glob("verification.part*.jsonl")):
        done_rows.update({r["index"]: r for r in _read_rows(p)})
    rows = [done_rows[i] for i in sorted(done_rows) if i < n_total]
    atomic_write_text(rows_path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    summary = dict(summarize(rows, cfg, n_total), n_requested=n_total)
    atomic_write_json(summary_path, summary)
    for p in out.glob("verification.part*.jsonl"):
        p.unlink()
    return summary
