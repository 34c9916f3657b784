"""Soak test: verify 1,000 MNIST points with 2 workers under a memory cap; memory must stay flat.

Runs ``certkd verify RUN --limit N --workers W`` as a child process whose address space is
capped (``RLIMIT_AS``, inherited by the spawned workers), samples every ``--interval`` seconds
the resident set size of the whole process tree (/proc) and the number of points finished
(lines of the ``verification.part*.jsonl`` files), and reports:

* peak RSS of the tree and of the largest single process;
* RSS when 25 %, 50 %, 75 % and 100 % of the points were done;
* growth = peak RSS in the last quarter − peak RSS in the second quarter (the first quarter is
  warm-up), and the verdict "flat" when that growth is below ``max(50 MB, 10 %)`` — a leak of
  even 100 kB per point would add 50 MB over the last 500 of 1,000 points.

Points differ in difficulty, so the tree's RSS also follows the allocator's high-water mark of
the hardest point so far; ``tests/verification/test_soak.py`` complements this with repeated
identical work in one process, where any steady growth is a leak.

Results go to benchmarks/results/soak_verify.{json,md}.

    python benchmarks/bench_verify.py ...            # not needed; any trained MNIST run works
    python benchmarks/soak_verify.py --run runs/distillation_mnist/cc-ibp --limit 1000 --workers 2

Linux only (/proc and RLIMIT_AS).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

from certkd.checkpoints import atomic_write_json, atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"
PAGE = os.sysconf("SC_PAGE_SIZE")


def _children(pid: int) -> List[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(d.name))
    return out


def tree_rss(root: int) -> Dict[int, int]:
    """Resident bytes of ``root`` and all its descendants, by pid."""
    rss, stack = {}, [root]
    while stack:
        pid = stack.pop()
        try:
            rss[pid] = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
        except OSError:
            continue
        stack.extend(_children(pid))
    return rss


def points_done(out: Path) -> int:
    """Finished points: rows of the workers' part files (merged into verification.jsonl at the end)."""
    parts = list(out.glob("verification.part*.jsonl"))
    files = parts or [out / "verification.jsonl"]
    n = 0
    for p in files:
        try:
            n += sum(1 for line in p.read_text().splitlines() if line.strip())
        except OSError:
            continue
    return n


def soak(run: str, limit: int, workers: int, timeout: float, mem_cap_gb: float, interval: float,
         out: Optional[Path] = None, eps: Optional[float] = None, data_dir: Optional[str] = None) -> dict:
    out = Path(out or tempfile.mkdtemp(prefix="soak_verify_"))
    cmd = [sys.executable, "-m", "certkd", "verify", run, "--limit", str(limit), "--workers", str(workers),
           "--timeout", str(timeout), "--out", str(out), "--force", "--quiet"]
    if eps is not None:
        cmd += ["--eps", str(eps)]
    if data_dir is not None:
        cmd += ["--data-dir", data_dir]
    cap = int(mem_cap_gb * 2 ** 30)

    def limit_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    env = dict(os.environ, OMP_NUM_THREADS="1")
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, preexec_fn=limit_memory, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    samples = []
    while proc.poll() is None:
        rss = tree_rss(proc.pid)
        samples.append({"t": round(time.perf_counter() - start, 1), "done": points_done(out),
                        "rss_total": sum(rss.values()), "rss_max_process": max(rss.values(), default=0),
                        "processes": len(rss)})
        time.sleep(interval)
    log = proc.stdout.read()
    if proc.returncode != 0:
        raise SystemExit(f"certkd verify failed (exit {proc.returncode}):\n{log}")
    summary = json.loads((out / "verification.json").read_text())
    # only samples with all workers running describe the steady state
    busy = [s for s in samples if s["processes"] >= workers + 1 and 0 < s["done"] < limit] or samples

    def at(frac: float) -> int:
        target = frac * limit
        best = min(busy, key=lambda s: abs(s["done"] - target))
        return best["rss_total"]

    # the first quarter is warm-up (lazy imports, first BaB/MILP calls, allocator pools):
    # growth is measured from the second quarter to the last one
    base = [s["rss_total"] for s in busy if 0.25 * limit <= s["done"] <= 0.5 * limit] or [busy[0]["rss_total"]]
    last = [s["rss_total"] for s in busy if s["done"] >= 0.75 * limit] or [busy[-1]["rss_total"]]
    growth = max(last) - max(base)
    flat = growth < max(50 * 2 ** 20, 0.10 * max(base))
    return {"run": run, "limit": limit, "workers": workers, "timeout": timeout, "mem_cap_gb": mem_cap_gb,
            "wall_s": round(time.perf_counter() - start, 1), "n": summary["n"],
            "verified_accuracy": summary["verified_accuracy"], "counts": summary["counts"],
            "peak_rss_total": max(s["rss_total"] for s in samples),
            "peak_rss_process": max(s["rss_max_process"] for s in samples),
            "rss_at": {f"{int(100 * f)}%": at(f) for f in (0.25, 0.5, 0.75, 1.0)},
            "growth_bytes": growth, "flat": flat, "samples": samples}


def _mb(b: int) -> str:
    return f"{b / 2 ** 20:.0f} MB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/distillation_mnist/cc-ibp")
    ap.add_argument("--limit", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=5.0, help="per-point budget of the complete stage (s)")
    ap.add_argument("--mem-cap-gb", type=float, default=8.0, help="RLIMIT_AS of the verify process tree")
    ap.add_argument("--interval", type=float, default=2.0)
    ap.add_argument("--eps", type=float, default=None)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--no-write", action="store_true", help="print only (tests)")
    args = ap.parse_args()
    r = soak(args.run, args.limit, args.workers, args.timeout, args.mem_cap_gb, args.interval, eps=args.eps,
             data_dir=args.data_dir)
    lines = [f"run {r['run']}: {r['n']} points, {r['workers']} workers, timeout {r['timeout']:g}s, "
             f"address-space cap {r['mem_cap_gb']:g} GB per process, wall {r['wall_s']:g}s",
             f"verified accuracy {100 * r['verified_accuracy']:.1f}%; counts {r['counts']}", "",
             "| points done | 25% | 50% | 75% | 100% | peak (tree) | peak (one process) | growth | verdict |",
             "|---|---|---|---|---|---|---|---|---|",
             "| RSS of the process tree | " + " | ".join(_mb(v) for v in r["rss_at"].values()) +
             f" | {_mb(r['peak_rss_total'])} | {_mb(r['peak_rss_process'])} | {_mb(r['growth_bytes'])} | "
             f"{'flat' if r['flat'] else 'GROWING'} |"]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        RESULTS.mkdir(exist_ok=True)
        atomic_write_json(RESULTS / "soak_verify.json", r)
        atomic_write_text(RESULTS / "soak_verify.md", text + "\n")
    if not r["flat"]:
        raise SystemExit("memory grew with the number of points")


if __name__ == "__main__":
    main()
