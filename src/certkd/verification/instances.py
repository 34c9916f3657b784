"""Run a VNN-COMP benchmark: ``instances.csv`` in, the competition's results CSV out (``docs/verify_onnx.md``).

Input rows: ``onnx,vnnlib,timeout`` (paths relative to ``root``, default the CSV's folder).
Output rows (no header, as the published 2021 results):
``benchmark,onnx,vnnlib,prepare_time,result,run_time``, appended and flushed one instance at a
time, so a rerun skips the (onnx, vnnlib) pairs already in the file (resume). The counterexample
of every ``sat`` goes to ``<results stem>_cex/<onnx stem>__<vnnlib stem>.txt``.
"""
from __future__ import annotations

import csv
import os
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from certkd.errors import CertkdError


def read_instances(path: Path) -> List[Tuple[str, str, float]]:
    """(onnx, vnnlib, timeout) rows of an instances CSV."""
    if not path.is_file():
        raise CertkdError(f"instances file not found: {path}")
    rows = []
    with path.open(newline="") as f:
        for n, row in enumerate(csv.reader(f), 1):
            row = [c.strip() for c in row]
            if not row or not any(row):
                continue
            if len(row) != 3:
                raise CertkdError(f"{path}:{n}: expected onnx,vnnlib,timeout, got {len(row)} columns")
            try:
                rows.append((row[0], row[1], float(row[2])))
            except ValueError:
                raise CertkdError(f"{path}:{n}: timeout {row[2]!r} is not a number") from None
    return rows


def read_results(path: Path) -> Dict[Tuple[str, str], List[str]]:
    """Rows already in a results CSV, keyed by (onnx, vnnlib); torn or short lines are ignored."""
    done: Dict[Tuple[str, str], List[str]] = {}
    if path.is_file():
        with path.open(newline="") as f:
            for row in csv.reader(f):
                if len(row) == 6:
                    done[(row[1], row[2])] = row
    return done


def _cex_path(out: Path, onnx: str, vnnlib: str) -> Path:
    return out.parent / f"{out.stem}_cex" / f"{Path(onnx).stem}__{Path(vnnlib).stem}.txt"


def _one(job) -> List[str]:
    """Worker: verify one instance; returns the results row (errors become 'error' rows)."""
    benchmark, root, onnx, vnnlib, timeout, out, threads = job
    import torch

    torch.set_num_threads(threads)
    from certkd.graph import from_onnx
    from certkd.verification.onnx_verify import verify_network
    from certkd.verification.vnnlib import read_property

    t0 = time.perf_counter()
    try:
        net = from_onnx(Path(root) / onnx)
        prop = read_property(Path(root) / vnnlib)
        prepare = time.perf_counter() - t0
        res = verify_network(net, prop, net.input_shape, timeout=timeout, onnx_source=str(Path(root) / onnx))
        status, run = res.status, res.time_s
        if status == "sat":
            p = _cex_path(Path(out), onnx, vnnlib)
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(res.text())
    except (CertkdError, ValueError, OSError) as e:
        prepare, run = time.perf_counter() - t0, 0.0
        status = "error"
        print(f"{onnx} {vnnlib}: {str(e).splitlines()[0] if str(e) else type(e).__name__}", flush=True)
    return [benchmark, onnx, vnnlib, f"{prepare:.6f}", status, f"{run:.6f}"]


def run_instances(csv_path, root=None, out=None, workers: int = 1, timeout_fraction: float = 1.0,
                  log: Callable[[str], None] = print, limit: Optional[int] = None) -> List[List[str]]:
    """Verify every instance of ``csv_path`` not yet in ``out``; returns all result rows in CSV order.

    timeout_fraction scales each row's timeout; limit keeps the first N rows only.
    """
    csv_path = Path(csv_path)
    root = Path(root) if root is not None else csv_path.parent
    out = Path(out) if out is not None else Path("results.csv")
    if workers < 1:
        raise CertkdError("--workers must be >= 1")
    if not timeout_fraction > 0:
        raise CertkdError("the timeout fraction must be > 0")
    rows = read_instances(csv_path)[:limit]
    benchmark = csv_path.parent.name or csv_path.stem
    done = read_results(out)
    todo = [r for r in rows if (r[0], r[1]) not in done]
    if len(todo) < len(rows):
        log(f"resuming: {len(rows) - len(todo)} of {len(rows)} instances already in {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // workers) if workers > 1 else 1
    jobs = [(benchmark, str(root), o, v, t * timeout_fraction, str(out), threads) for o, v, t in todo]

    def record(row: List[str], f) -> None:
        csv.writer(f).writerow(row)
        f.flush()
        os.fsync(f.fileno())
        done[(row[1], row[2])] = row
        log(f"{row[1]} {row[2]}: {row[4]} ({float(row[5]):.2f} s)")

    with out.open("a", newline="") as f:
        if workers == 1:
            for job in jobs:
                record(_one(job), f)
        else:
            import multiprocessing as mp

            with mp.get_context("spawn").Pool(workers) as pool:
                for row in pool.imap_unordered(_one, jobs):
                    record(row, f)
    result = [done[(o, v)] for o, v, _ in rows if (o, v) in done]
    log(summary_table(result))
    return result


def summary_table(rows: List[List[str]]) -> str:
    """A markdown table: per result, the count and the median/total run time."""
    lines = ["| result | count | median s | total s |", "|---|---:|---:|---:|"]
    for status in ("sat", "unsat", "timeout", "unknown", "error"):
        times = [float(r[5]) for r in rows if r[4] == status]
        if times:
            lines.append(f"| {status} | {len(times)} | {statistics.median(times):.2f} | {sum(times):.1f} |")
    lines.append(f"| all | {len(rows)} | | {sum(float(r[5]) for r in rows):.1f} |")
    return "\n".join(lines)


__all__ = ["read_instances", "read_results", "run_instances", "summary_table"]
