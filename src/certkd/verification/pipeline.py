"""Per-sample verification pipeline (docs/method.md §10), resumable and split across workers.

For each test point, in order, stopping at the first stage that decides it:

1. clean check → ``misclassified``;
2. PGD (40 steps, relative step 0.035, configurable restarts) → ``attacked``; the
   counterexample is re-checked by a float32 forward at the point clipped to the box;
3. IBP → ``verified-ibp``; CROWN → ``verified-crown``; α-CROWN → ``verified-alpha-crown``;
4. complete verification (``engine``: ``bab`` or ``milp``) with a per-sample timeout →
   ``verified-bab`` (or ``verified-milp``), ``attacked`` (re-checked counterexample) or
   ``timeout``.

Verified accuracy = verified / attempted: misclassified points count in the denominator.
Every certificate is checked against floating-point rounding (``rounding_bound``, ``float_proof``:
:mod:`certkd.verification.float_proof`); with ``strict_rounding`` one without float proof answers ``unknown``.
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

import contextlib
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
from certkd.choices import ENGINES, eps_error
from certkd.data.subsets import describe_points, stratified_indices
from certkd.errors import CertkdError
from certkd.runs import (VERIFICATION_PARTS_GLOB, atomic_write_json, atomic_write_text, check_finite_weights,
                         check_same_subject, collapse, data_sha256, ensure_writable_dir, fingerprint, RunLock,
                         clear_run_dir, lock_run_dir, resolve_device, run_directory, training_progress, verification_part_path,
                         verification_path, verification_rows_path, weights_sha256)
from certkd.verification.float_proof import FloatCheck
from certkd.verification.milp import float32_margin, milp_verify

VERIFIED = ("verified-ibp", "verified-crown", "verified-alpha-crown", "verified-bab", "verified-milp")
STATUSES = ("misclassified", "attacked") + VERIFIED + ("timeout", "unknown")
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
    strict_rounding: bool = False      # verified only with a float proof (else "unknown"): see verify_sample

    def validate(self) -> "VerifyConfig":
        if not 0.0 < self.eps <= 1.0:
            raise CertkdError(eps_error(self.eps))
        if not self.timeout > 0:
            raise CertkdError(f"timeout must be > 0 seconds, got {self.timeout}; pass e.g. --timeout 60")
        if self.engine not in ENGINES:
            raise CertkdError(f"unknown engine '{self.engine}'; choose one of: {', '.join(ENGINES)}")
        if self.attack_restarts < 1 or self.attack_steps < 0:
            raise CertkdError("attack restarts must be >= 1 and steps >= 0")
        if self.dtype not in DTYPES:
            raise CertkdError(f"unknown dtype '{self.dtype}'; choose float32 or float64")
        if not isinstance(self.strict_rounding, bool):
            raise CertkdError(f"strict_rounding must be True or False, got {self.strict_rounding!r}")
        return self


def _intermediate(model: nn.Module, cfg: VerifyConfig):
    """Which pre-activation layers get CROWN passes: all of them for small nets, else the last.

    Full CROWN intermediates on a wide CNN cost minutes and GBs on CPU (docs/method.md §10.2), so on CPU
    the early conv layers keep IBP bounds unless asked otherwise.
    """
    if cfg.crown_intermediate != "auto":
        return cfg.crown_intermediate
    from certkd.graph.convert import from_module

    n_params = sum(p.numel() for p in model.parameters())
    return "crown" if n_params < 2_000_000 else {len(from_module(model).activation_nodes()) - 1}


def verify_sample(model: nn.Module, x: torch.Tensor, y: int, cfg: VerifyConfig, index: int = 0) -> Dict[str, Any]:
    """Run the pipeline on one point. x: (1, C, H, W) pixel space. Returns the JSONL row.

    A verified row records ``rounding_bound`` (the largest bound on the rounding error of a margin
    ``z_y − z_j`` for the model run in its own dtype over the box) and ``float_proof`` (every certified
    margin exceeds twice its bound: :mod:`certkd.verification.float_proof`, docs/verify_onnx.md §5).
    With ``cfg.strict_rounding`` a certificate without float proof does not decide the point: the later
    stages try (BaB and the MILP prove margins above twice the bound), and if none succeeds the point
    is ``unknown``.
    """
    start = time.perf_counter()
    row: Dict[str, Any] = {"index": int(index), "label": int(y)}
    yt = torch.tensor([y], device=x.device)
    lo, hi = linf_box(x, cfg.eps)

    def done(status: str, margin: Optional[float], **extra: Any) -> Dict[str, Any]:
        row.update(status=status, margin=None if margin is None else float(margin),
                   time_s=round(time.perf_counter() - start, 4), **extra)
        return row

    def certified(status: str, margins) -> Optional[Dict[str, Any]]:
        """The row of a certificate (margins (1, K−1), or the least); None: not certified (with a float proof
        under strict_rounding)."""
        held = check.accept(status, margins)
        return None if held is None else done(status, held[0], **held[1])

    def undecided(margin: Optional[float], **extra: Any) -> Dict[str, Any]:
        """``timeout``; under strict_rounding ``unknown`` when a stage certified the point in exact arithmetic only."""
        held = check.unknown()
        return done("timeout", margin, **extra) if held is None else done("unknown", held[0], **held[1])

    with torch.no_grad():
        logits = model(x)
    row["predicted"] = int(logits[0].argmax())
    clean_margin = float(-margin_loss(logits, yt)[0])
    if clean_margin <= 0:
        return done("misclassified", clean_margin)

    ref, x32, lo32, hi32 = model, x, lo, hi  # the float32 network judges concrete points
    check = FloatCheck(ref, lo32, hi32, y, cfg.strict_rounding)  # rounding of the network as run
    if cfg.dtype == "float64":  # attack and bounds in float64
        model, x = _float64_copy(model), x.double()
        lo, hi = linf_box(x, cfg.eps)
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + int(index))  # order-independent
    attack = PGD(cfg.attack_steps, cfg.attack_step_size, cfg.attack_restarts, stop_on_success=True)
    x_adv = attack(model, x, yt, lo, hi, generator=gen)
    adv_margin = float32_margin(ref, x_adv, y, lo32, hi32)
    if adv_margin <= 0:
        return done("attacked", adv_margin, stage="pgd")

    with torch.no_grad():
        lb_ibp, _ = ibp_logit_difference_bounds(model, lo, hi, yt)
    best = lb_ibp.clone()
    if not torch.isfinite(best).all():  # NaN compares False, +inf would certify anything: never trust either
        bad = float(best[~torch.isfinite(best)][0])
        raise CertkdError(f"non-finite IBP bound ({bad}) at test point {index}: refusing to certify; the model's "
                          "weights overflow or are NaN/Inf, restore the checkpoint or retrain")
    if (out := certified("verified-ibp", best)) is not None:
        return out
    if cfg.crown:
        from certkd.bounds.crown import alpha_crown_bounds, crown_bounds

        inter = _intermediate(model, cfg)
        lb_crown = crown_bounds(model, lo, hi, yt, intermediate=inter)
        best = torch.maximum(best, torch.where(torch.isfinite(lb_crown), lb_crown, best))
        if (out := certified("verified-crown", best)) is not None:
            return out
        if cfg.alpha_iterations > 0:
            lb_alpha = alpha_crown_bounds(model, lo, hi, yt, iterations=cfg.alpha_iterations, lr=cfg.alpha_lr,
                                          intermediate=inter)
            best = torch.maximum(best, torch.where(torch.isfinite(lb_alpha), lb_alpha, best))
            if (out := certified("verified-alpha-crown", best)) is not None:
                return out
    if cfg.engine == "none":
        return undecided(float(best.min()), stage="incomplete")
    remaining = cfg.timeout - (time.perf_counter() - start)
    # under strict_rounding the complete stage proves the margins above twice their rounding bound
    tol = check.complete_tolerance()
    if remaining <= 0 or not math.isfinite(tol.get("margin_tol", 0.0)):
        return undecided(float(best.min()))
    if cfg.engine == "milp":
        res = milp_verify(ref, x32[0], int(y), lower=lo32[0], upper=hi32[0], timeout=remaining, **tol)
        status_map = {"verified": "verified-milp"}
    else:
        from certkd.verification.bab import bab_verify

        res = bab_verify(ref, x32[0], int(y), lower=lo32[0], upper=hi32[0], timeout=remaining, **tol)
        status_map = {"verified": "verified-bab"}
    if res.status == "falsified":
        margin = float32_margin(ref, res.counterexample.unsqueeze(0).to(x.device), y, lo32, hi32)
        if margin <= 0:
            return done("attacked", margin, stage=cfg.engine)
        return undecided(float(best.min()), note="counterexample did not re-check in float32")
    if res.status == "verified" and (out := certified(status_map["verified"], res.margin)) is not None:
        return out
    return undecided(res.margin if res.margin is not None else float(best.min()))


# ------------------------------------------------------------------------------------------ runs

def read_rows(path: Path) -> List[Dict[str, Any]]:
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
    """The ``verification.json`` summary of ``rows`` (verification.jsonl) for ``n_total`` requested points."""
    numbers = summarize_rows(rows)
    return {"n": numbers.pop("n"), "n_requested": n_total, "complete": len(rows) == n_total, "eps": cfg.eps,
            **numbers, "settings": asdict(cfg)}


#: The keys of a summary that :func:`summarize_rows` computes from the rows alone.
ROW_KEYS = ("n", "clean_accuracy", "pgd_accuracy", "empirical_robust_accuracy", "falsified_by_verifier",
            "ibp_verified_accuracy", "crown_verified_accuracy", "alpha_crown_verified_accuracy", "verified_accuracy",
            "counts", "median_time_s", "verified_float_proof")


def summarize_rows(rows: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """The numbers of a verification that follow from its rows alone (:data:`ROW_KEYS`).

    Also the check of a stored summary against its rows (``certkd report`` and ``card``).
    Raises:
        ValueError: a row is not an object with a known ``status`` and a numeric ``time_s``, or repeats an
            ``index``.
    """
    counts = {s: 0 for s in STATUSES}
    seen = set()
    for k, r in enumerate(rows):
        status = r.get("status") if isinstance(r, dict) else None
        if status not in counts or not isinstance(r.get("time_s"), (int, float)):
            raise ValueError(f"row {k + 1} has no known status and time")
        if "index" in r:  # one row per test point: a repeated one would count twice
            key = repr(r["index"])
            if key in seen:
                raise ValueError(f"row {k + 1} repeats test point {r['index']}")
            seen.add(key)
        counts[status] += 1
    n = len(rows)
    verified_ibp = counts["verified-ibp"]
    verified_crown = verified_ibp + counts["verified-crown"]
    verified_alpha = verified_crown + counts["verified-alpha-crown"]
    verified = sum(counts[s] for s in VERIFIED)
    pgd_found = sum(1 for r in rows if r["status"] == "attacked" and r.get("stage", "pgd") == "pgd")
    frac = (lambda k: k / n) if n else (lambda k: 0.0)
    return {
        "n": n,
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
        # verified points whose margins clear twice the rounding bound of the network as run
        "verified_float_proof": sum(1 for r in rows if r["status"] in VERIFIED and r.get("float_proof") is True),
    }


def _worker(args) -> None:
    model_path, data_spec, indices, cfg_dict, part_path, device, threads, weights_digest = args
    torch.set_num_threads(threads)
    precision.set_tf32_flags(False, False)  # a fresh process: PyTorch's default has cuDNN TF32 on
    from certkd.checkpoints import load_model
    from certkd.data import load_dataset

    cfg = VerifyConfig(**cfg_dict)
    model = load_model(model_path, device=device)
    if weights_sha256(model) != weights_digest:  # the checkpoint was replaced while we ran
        raise CertkdError(f"the weights in {model_path} changed during verification; rerun certkd verify")
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
               resume: bool = False, force: bool = False, data_dir: Optional[str] = None, device: str = "auto",
               progress: bool = True) -> Dict[str, Any]:
    """Verify ``limit`` test points of a run (class-stratified, docs/bad_inputs.md); returns the summary.

    The summary (also written to ``verification.json``) records under ``certifies`` the weights'
    SHA-256, the model, ε, the points and the settings; ``resume`` reuses stored rows only when
    that record is unchanged, and existing results are replaced only with ``force``.
    TF32 is off throughout and the caller's TF32 flags are restored on return. The folder written
    is locked (:func:`certkd.runs.lock_run_dir`): a second writer gets one line naming this one.
    """
    where = Path(out_dir) if out_dir is not None else _default_out(path)
    with lock_run_dir(where, "certkd verify") if where is not None else contextlib.nullcontext() as lock:
        try:
            with precision.tf32(False):
                return _verify_run(path, cfg, limit=limit, out_dir=out_dir, workers=workers, resume=resume,
                                   force=force, data_dir=data_dir, device=device, progress=progress)
        except BaseException as e:
            replacement = _failed(where, out_dir, lock, e)
            if replacement is None:
                raise
            raise replacement from None


def _failed(where: Optional[Path], out_dir, lock: Optional[RunLock], e: BaseException) -> Optional[CertkdError]:
    """After a failed verification: remove what it created if it saved nothing (no stub folder); the
    one-line error that replaces a full disk's exception (None: re-raise ``e``)."""
    from certkd.checkpoints import disk_full

    if out_dir is not None and lock is not None and lock.created is not None and not _saved_rows(Path(out_dir)):
        clear_run_dir(out_dir)  # the lock removes the folders it created once they are empty
    full = disk_full(e) if isinstance(e, Exception) else None
    if full is None:
        return None
    n = _saved_rows(where) if where is not None else 0
    kept = (f"the {n} points verified so far are kept; free space and rerun with --resume, or choose another "
            "--out" if n else "no verified point was saved; free space or choose another --out")
    return CertkdError(f"disk full while writing the verification results to {where or 'the run directory'} "
                       f"({full.strerror}): {kept}")


def _default_out(path) -> Optional[Path]:
    """Where verify writes without --out (the run directory, or the checkpoint folder); None if unknown."""
    from certkd.checkpoints import resolve_checkpoint

    try:
        return run_directory(path) or resolve_checkpoint(path)
    except CertkdError:
        return None


def _saved_rows(out: Path) -> int:
    """How many complete result lines the row files in ``out`` hold (0 if none or unreadable)."""
    n = 0
    for p in [verification_rows_path(out), *out.glob(VERIFICATION_PARTS_GLOB)]:
        try:
            n += sum(1 for line in p.read_text().splitlines() if line.strip().endswith("}"))
        except (OSError, UnicodeDecodeError):
            continue
    return n


def _load_subject(path, cfg: VerifyConfig, limit: Optional[int], data_dir: Optional[str], dev):
    """Model, test set, selected indices and the ``certifies`` record of a verification."""
    from certkd.checkpoints import load_model, resolve_checkpoint
    from certkd.data import load_dataset

    ckpt = resolve_checkpoint(path)
    model = load_model(ckpt, device=dev)
    check_finite_weights(model, "verify")
    meta_cfg = model.certkd_meta.get("config", {})
    data_spec = (meta_cfg.get("dataset", "digits"), data_dir or meta_cfg.get("data_dir"))
    _, test_set, info = load_dataset(*data_spec)
    if info.input_size != model.spec.input_size or info.in_channels != model.spec.in_channels:
        s = model.spec
        raise CertkdError(f"model expects {s.in_channels}×{s.input_size}×{s.input_size} inputs but the "
                          f"{info.name} data is {info.in_channels}×{info.input_size}×{info.input_size}; pass the "
                          "--data-dir of the dataset the model was trained on")
    indices = stratified_indices(test_set.labels, limit)
    subject = fingerprint(model, eps=cfg.eps, dataset=info.name, split="test",
                          points=describe_points(test_set.labels, indices),
                          data_digest=data_sha256(test_set.images[indices], test_set.labels[indices]),
                          settings=asdict(cfg), checkpoint=str(ckpt))
    return model, ckpt, data_spec, test_set, indices.tolist(), subject


def _prepare_out(out: Path, summary_path: Path, rows_path: Path, subject: Dict[str, Any], resume: bool,
                 force: bool) -> List[Path]:
    """Check what ``out`` already holds against resume/force; returns the part files to continue."""
    parts = sorted(out.glob(VERIFICATION_PARTS_GLOB))
    existing = [p for p in [summary_path, rows_path] + parts if p.exists()]
    if resume:
        if not summary_path.exists():
            if existing:
                raise CertkdError(f"--resume: {out} holds verification rows but no verification.json, so what they "
                                  "certify is unknown; pass --force to start over")
            return parts
        try:
            old = json.loads(summary_path.read_text())
        except ValueError:
            raise CertkdError(f"--resume: {summary_path} is corrupt, so its settings cannot be checked; rerun "
                              "with --force to start over") from None
        check_same_subject(old, subject, str(summary_path))
        return parts
    if existing and not force:
        raise CertkdError(f"{out} already holds a verification ({existing[0].name}); pass --resume to continue it, "
                          "--force to replace it, or --out to write elsewhere")
    for p in existing:
        p.unlink()
    return []


def _verify_run(path, cfg: VerifyConfig, *, limit: Optional[int], out_dir, workers: int, resume: bool, force: bool,
                data_dir: Optional[str], device: str, progress: bool) -> Dict[str, Any]:
    cfg.validate()
    if resume and force:
        raise CertkdError("--resume and --force contradict each other; pass only one")
    if workers < 1:
        raise CertkdError(f"--workers must be >= 1, got {workers}; pass e.g. --workers 2 (one process per worker)")
    if limit is not None and limit < 1:
        raise CertkdError(f"--limit must be >= 1, got {limit}; pass a positive number of test points or omit it for all")
    dev = resolve_device(device)
    model, ckpt, data_spec, test_set, indices, subject = _load_subject(path, cfg, limit, data_dir, dev)
    n_total = len(indices)

    out = Path(out_dir) if out_dir is not None else (run_directory(path) or ckpt)
    ensure_writable_dir(out)
    summary_path, rows_path = verification_path(out), verification_rows_path(out)
    parts = _prepare_out(out, summary_path, rows_path, subject, resume, force)
    extra = {"n_requested": n_total, "certifies": subject, "training": training_progress(model)}
    atomic_write_json(summary_path, dict(summarize([], cfg, n_total), **extra, complete=False))

    wanted = set(indices)
    done_rows = {r["index"]: r for r in read_rows(rows_path) if r.get("index") in wanted}
    for p in parts:
        kept = read_rows(p)
        done_rows.update({r["index"]: r for r in kept if r.get("index") in wanted})
        # drop a torn last line so that appended rows start on a fresh line
        atomic_write_text(p, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
    todo = [i for i in indices if i not in done_rows]
    bar = None
    if progress and todo:
        from tqdm import tqdm
        bar = tqdm(total=n_total, initial=n_total - len(todo), desc="verify", dynamic_ncols=True)
    if todo:
        if workers == 1:
            _verify_indices(model, test_set, todo, cfg, verification_part_path(out, 0), dev, bar)
        else:
            import multiprocessing as mp

            n_gpu = torch.cuda.device_count() if dev.type == "cuda" else 0
            threads = max(1, torch.get_num_threads() // workers)  # split --threads, never oversubscribe
            jobs = []
            for k in range(workers):
                chunk = todo[k::workers]
                if not chunk:
                    continue
                wdev = f"cuda:{k % n_gpu}" if n_gpu else "cpu"
                jobs.append((str(ckpt), data_spec, chunk, asdict(cfg), str(verification_part_path(out, k)),
                             wdev, threads, subject["weights_sha256"]))
            ctx = mp.get_context("spawn")
            with ctx.Pool(len(jobs)) as pool:
                pool.map(_worker, jobs)
    if bar is not None:
        bar.close()
    for p in sorted(out.glob(VERIFICATION_PARTS_GLOB)):
        done_rows.update({r["index"]: r for r in read_rows(p) if r.get("index") in wanted})
    rows = [done_rows[i] for i in indices if i in done_rows]
    atomic_write_text(rows_path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    predicted = torch.tensor([r["predicted"] for r in rows if "predicted" in r], dtype=torch.int64)
    summary = dict(summarize(rows, cfg, n_total), **extra,
                   predictions=collapse(predicted, model.spec.num_classes))
    atomic_write_json(summary_path, summary)
    for p in out.glob(VERIFICATION_PARTS_GLOB):
        p.unlink()
    return summary
