"""Run a VNN-COMP benchmark: ``instances.csv`` in, the competition's results CSV out (``docs/verify_onnx.md``).

Input rows: ``onnx,vnnlib,timeout`` (paths relative to ``root``, default the CSV's folder; the timeout
a positive finite number of seconds). An instance's timeout covers reading its two files and verifying.
Output rows (no header, as the published 2021 results):
``benchmark,onnx,vnnlib,prepare_time,result,run_time``, appended and flushed one instance at a
time, so a rerun skips the (onnx, vnnlib) pairs already in the file (resume).

An instance that fails (a file that cannot be read, a network certkd does not support, any exception
while importing, parsing or verifying) becomes an ``error`` row and the benchmark goes on; its
one-line reason is printed and kept in ``<results stem>_errors/<name>.txt``. A rerun skips error rows
too (they would fail again the same way); ``retry_errors=True`` (``certkd verify --retry-errors``)
verifies them again, e.g. after fixing their files. Ctrl-C still stops the run.

The counterexample of every ``sat`` goes to ``<results stem>_cex/<name>.txt``, written atomically;
``<name>`` is ``<onnx stem>__<vnnlib stem>__<hash>`` (:func:`instance_name`), where the hash covers
the two paths as the CSV writes them, so ``a/net.onnx`` and ``b/net.onnx`` never share a file.
"""
from __future__ import annotations

import csv
import hashlib
import math
import os
import re
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

from certkd.errors import CertkdError

PathLike = Union[str, Path]
RESULTS = ("sat", "unsat", "timeout", "unknown", "error")


def positive_seconds(value, what: str, fix: str) -> float:
    """``value`` as a positive finite float, or a one-line CertkdError ``"{what} ... ; {fix}"``.

    NaN, ±inf, 0 and negative numbers are refused: a NaN deadline never passes, so the run never ends.
    """
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = math.nan
    if not (math.isfinite(v) and v > 0):
        raise CertkdError(f"{what} {value!r} must be a positive finite number of seconds; {fix}")
    return v


def read_instances(path: PathLike) -> List[Tuple[str, str, float]]:
    """(onnx, vnnlib, timeout) rows of an instances CSV; a one-line ``file:line:`` CertkdError for a bad row."""
    path = Path(path)
    if not path.is_file():
        raise CertkdError(f"instances file not found: {path}")
    rows = []
    with path.open(newline="") as f:
        for n, row in enumerate(csv.reader(f), 1):
            row = [c.strip() for c in row]
            if not row or not any(row):
                continue
            if len(row) != 3:
                raise CertkdError(f"{path}:{n}: expected onnx,vnnlib,timeout, got {len(row)} columns; write one "
                                  "onnx,vnnlib,timeout row per instance (quote paths with commas)")
            t = positive_seconds(row[2], f"{path}:{n}: timeout", "write the seconds, e.g. 60, or pass --timeout")
            rows.append((row[0], row[1], t))
    return rows


def read_results(path: PathLike) -> Dict[Tuple[str, str], List[str]]:
    """Rows already in a results CSV, keyed by (onnx, vnnlib), the last row of a pair winning;
    torn or short lines are ignored."""
    done: Dict[Tuple[str, str], List[str]] = {}
    path = Path(path)
    if path.is_file():
        with path.open(newline="") as f:
            for row in csv.reader(f):
                if len(row) == 6:
                    done[(row[1], row[2])] = row
    return done


def _readable(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)[:60] or "_"


def instance_name(onnx: str, vnnlib: str) -> str:
    """``<onnx stem>__<vnnlib stem>__<10 hex digits>``: readable, and distinct for distinct (onnx, vnnlib)
    paths (the digits are the start of the SHA-256 of both paths as the CSV writes them)."""
    digest = hashlib.sha256(f"{onnx}\n{vnnlib}".encode("utf-8", "surrogatepass")).hexdigest()[:10]
    return f"{_readable(Path(onnx).stem)}__{_readable(Path(vnnlib).stem)}__{digest}"


def cex_path(out: PathLike, onnx: str, vnnlib: str) -> Path:
    """Where the counterexample of the ``sat`` instance (onnx, vnnlib) of results CSV ``out`` is written."""
    out = Path(out)
    return out.parent / f"{out.stem}_cex" / f"{instance_name(onnx, vnnlib)}.txt"


def error_path(out: PathLike, onnx: str, vnnlib: str) -> Path:
    """Where the one-line reason of the ``error`` instance (onnx, vnnlib) of results CSV ``out`` is kept."""
    out = Path(out)
    return out.parent / f"{out.stem}_errors" / f"{instance_name(onnx, vnnlib)}.txt"


def check_output_file(path: PathLike, option: str = "--out", example: str = "results.csv") -> Path:
    """Refuse, before any work, a file path that cannot be written: a one-line CertkdError naming the problem
    and the fix. Touches nothing on disk."""
    p = Path(path)
    if p.is_dir():
        raise CertkdError(f"{option} {p} is a directory; pass a file path, e.g. {option} {p / example}")
    if os.path.lexists(p) and not p.is_file():  # a device, FIFO or dangling link: never append to or replace it
        raise CertkdError(f"{option} {p} is not a regular file; pass a file path, e.g. {option} {example}")
    folder = p.parent
    while not os.path.lexists(folder) and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise CertkdError(f"cannot write {option} {p}: {folder} is a file, not a folder; choose an {option} "
                          f"outside it, e.g. {option} {example}")
    if not os.access(folder, os.W_OK | os.X_OK) or (p.is_file() and not os.access(p, os.W_OK)):
        raise CertkdError(f"cannot write {option} {p} (permission denied); choose a writable {option}")
    return p


def _reason(e: BaseException) -> str:
    """One line: a CertkdError's message, else the exception's type and first line."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if isinstance(e, CertkdError):
        return text or type(e).__name__
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _sizes(net) -> Tuple[int, int]:
    """(inputs, outputs) of one sample of ``net``: the VNN-LIB reader checks declarations against them."""
    shape = tuple(int(s) for s in net.input_shape)
    return math.prod(shape), math.prod(int(s) for s in net.shapes(shape)[-1])


def _one(job) -> Tuple[List[str], Optional[str]]:
    """Worker: verify one instance; returns (results row, one-line reason of an ``error`` row or None)."""
    benchmark, root, onnx, vnnlib, timeout, out, threads, strict_rounding = job
    import torch

    torch.set_num_threads(threads)
    from certkd.checkpoints import atomic_write_text
    from certkd.graph import from_onnx
    from certkd.verification import vnnlib as reader
    from certkd.verification.onnx_verify import verify_network

    t0 = time.monotonic()
    deadline = t0 + timeout  # the timeout covers reading the files too
    reason = None
    try:
        net = from_onnx(Path(root) / onnx)
        num_inputs, num_outputs = _sizes(net)
        prop = reader.read_property(Path(root) / vnnlib, num_inputs=num_inputs, num_outputs=num_outputs,
                                    deadline=deadline)
        prepare, left = time.monotonic() - t0, deadline - time.monotonic()
        if left <= 0:
            status, run = "timeout", 0.0
        else:
            res = verify_network(net, prop, net.input_shape, timeout=left, onnx_source=str(Path(root) / onnx),
                                 strict_rounding=strict_rounding)
            status, run = res.status, res.time_s
            if status == "sat":
                atomic_write_text(cex_path(out, onnx, vnnlib), res.text())
    except reader.ParseTimeout:  # reading the property used up the time limit
        prepare, run, status = time.monotonic() - t0, 0.0, "timeout"
    except Exception as e:  # noqa: BLE001  any failure of one instance is that instance's error row
        prepare, run, status = time.monotonic() - t0, 0.0, "error"
        reason = _reason(e)
    return [benchmark, onnx, vnnlib, f"{prepare:.6f}", status, f"{run:.6f}"], reason


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() == 0:
            return True
        f.seek(-1, os.SEEK_END)
        return f.read(1) in (b"\n", b"\r")


def _compact(out: Path, done: Dict[Tuple[str, str], List[str]]) -> None:
    """Rewrite ``out`` atomically with one row per (onnx, vnnlib), in first-seen order, if a retry repeated one."""
    from certkd.checkpoints import atomic_write_text

    with out.open(newline="") as f:
        keys = [(r[1], r[2]) for r in csv.reader(f) if len(r) == 6]
    if len(keys) == len(set(keys)):
        return
    import io

    buf = io.StringIO()
    csv.writer(buf).writerows(done[k] for k in dict.fromkeys(keys))
    atomic_write_text(out, buf.getvalue())


def run_instances(csv_path: PathLike, root: Optional[PathLike] = None, out: Optional[PathLike] = None,
                  workers: int = 1, timeout_fraction: float = 1.0, log: Callable[[str], None] = print,
                  limit: Optional[int] = None, timeout: Optional[float] = None,
                  retry_errors: bool = False, strict_rounding: bool = False) -> List[List[str]]:
    """Verify every instance of ``csv_path`` not yet in ``out``; returns all result rows in CSV order.

    Args:
        csv_path: the instances CSV (``onnx,vnnlib,timeout`` rows).
        root: folder the CSV's paths are relative to (default: the CSV's folder).
        out: the results CSV (default ``results.csv``); a rerun resumes it.
        workers: processes verifying instances side by side.
        timeout_fraction: scales each instance's timeout (after ``timeout`` replaces it).
        log: where progress lines, error reasons and the summary table go.
        limit: keep the first N rows of the CSV only.
        timeout: seconds that replace every row's timeout (None: the CSV's).
        retry_errors: verify again the instances recorded as ``error`` (else a rerun keeps their rows).

    Raises:
        CertkdError: a bad CSV row, option or output path, before anything is written.
    """
    csv_path = Path(csv_path)
    root = Path(root) if root is not None else csv_path.parent
    out = Path(out) if out is not None else Path("results.csv")
    if workers < 1:
        raise CertkdError(f"--workers must be >= 1, got {workers}; pass e.g. --workers 1")
    if limit is not None and limit < 1:
        raise CertkdError(f"--limit must be >= 1, got {limit}; pass a positive number of instances or leave it out")
    if timeout is not None:
        timeout = positive_seconds(timeout, "--timeout", "pass e.g. --timeout 60")
    fraction = float(timeout_fraction)
    if not (math.isfinite(fraction) and fraction > 0):
        raise CertkdError(f"the timeout fraction {timeout_fraction!r} must be a positive finite number; pass e.g. 0.1")
    check_output_file(out)
    for folder in (out.parent / f"{out.stem}_cex", out.parent / f"{out.stem}_errors"):
        if os.path.lexists(folder) and not folder.is_dir():
            raise CertkdError(f"{folder} is a file, but the results of --out {out} go in that folder; move it away "
                              "or choose another --out")
    rows = read_instances(csv_path)[:limit]
    benchmark = csv_path.parent.name or csv_path.stem
    done = read_results(out)
    todo = [r for r in rows if (r[0], r[1]) not in done or (retry_errors and done[(r[0], r[1])][4] == "error")]
    if len(todo) < len(rows):
        log(f"resuming: {len(rows) - len(todo)} of {len(rows)} instances already in {out}")
    threads = max(1, (os.cpu_count() or 1) // workers) if workers > 1 else 1
    jobs = []
    for o, v, t in todo:
        seconds = (t if timeout is None else timeout) * fraction
        if not math.isfinite(seconds):
            raise CertkdError(f"timeout {t:g} × fraction {fraction:g} is not finite; pass a smaller --timeout")
        jobs.append((benchmark, str(root), o, v, seconds, str(out), threads, strict_rounding))
    out.parent.mkdir(parents=True, exist_ok=True)

    def record(result: Tuple[List[str], Optional[str]], f) -> None:
        from certkd.checkpoints import atomic_write_text

        row, reason = result
        csv.writer(f).writerow(row)
        f.flush()
        os.fsync(f.fileno())
        done[(row[1], row[2])] = row
        where = error_path(out, row[1], row[2])
        if reason is not None:
            atomic_write_text(where, reason + "\n")
            log(f"{row[1]} {row[2]}: error: {reason}")
        else:
            if where.exists():  # a retried instance that no longer fails
                where.unlink()
            log(f"{row[1]} {row[2]}: {row[4]} ({_seconds(row[5]):.2f} s)")

    if out.exists() and not _ends_with_newline(out):  # a torn last line: the next row starts a line of its own
        with out.open("a", newline="") as f:
            f.write("\r\n")
    with out.open("a", newline="") as f:
        if workers == 1 or len(jobs) <= 1:
            for job in jobs:
                record(_one(job), f)
        else:
            import multiprocessing as mp

            with mp.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
                for result in pool.imap_unordered(_one, jobs):
                    record(result, f)
    if retry_errors:
        _compact(out, done)
    result = [done[(o, v)] for o, v, _ in rows if (o, v) in done]
    log(summary_table(result))
    errors = sum(1 for r in result if r[4] == "error")
    if errors:
        log(f"{errors} instance(s) ended in error; reasons in {out.parent / f'{out.stem}_errors'}; "
            "rerun with --retry-errors to verify them again")
    return result


def _seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        return 0.0
    return v if math.isfinite(v) else 0.0


def summary_table(rows: List[List[str]]) -> str:
    """A markdown table: per result, the count and the median/total run time (error rows included)."""
    lines = ["| result | count | median s | total s |", "|---|---:|---:|---:|"]
    statuses = list(RESULTS) + sorted({r[4] for r in rows} - set(RESULTS))
    for status in statuses:
        times = [_seconds(r[5]) for r in rows if r[4] == status]
        if times:
            lines.append(f"| {status} | {len(times)} | {statistics.median(times):.2f} | {sum(times):.1f} |")
    lines.append(f"| all | {len(rows)} | | {sum(_seconds(r[5]) for r in rows):.1f} |")
    return "\n".join(lines)


__all__ = ["cex_path", "check_output_file", "error_path", "instance_name", "positive_seconds", "read_instances",
           "read_results", "run_instances", "summary_table"]
