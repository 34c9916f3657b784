"""Verify 200 MNIST test points (class-stratified, seed 0) of an ε=0.1 CC-IBP cnn-small student (60 s timeout).

Prints how many points each stage decided and the median time per point, and writes
benchmarks/results/bench_verify.{json,md}. The student defaults to the CC-IBP run of
benchmarks/distillation_mnist.py; train one first if it is missing:

    python benchmarks/distillation_mnist.py
    python benchmarks/bench_verify.py --run runs/distillation_mnist/cc-ibp --workers 2

Side by side with another checkout (issue #12: "the same or better, and not slower"): with
``--baseline-src DIR`` (the ``src`` folder of, e.g., ``git worktree add /tmp/pregraph 33e7c9a``,
the tree before the network graph), ``certkd verify`` runs under each tree in turn, ``--rounds``
times, alternating which goes first, on the same points and settings. It reports each tree's
per-stage counts and the ratio this tree / baseline of the median (over rounds) of the summed
per-point verification times, and writes ``results/bench_verify_vs_baseline.{json,md}``::

    python benchmarks/bench_verify.py --baseline-src /tmp/pregraph/src --rounds 3
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from certkd.checkpoints import atomic_write_json, atomic_write_text
from certkd.verification.pipeline import VerifyConfig, verify_run

RESULTS = Path(__file__).resolve().parent / "results"


def _verify_with(src: Path, args: argparse.Namespace, out: Path) -> dict:
    """One ``certkd verify`` of ``args.run`` with the package imported from ``src``; its summary and
    per-point records."""
    cmd = [sys.executable, "-m", "certkd", "verify", args.run, "--eps", str(args.eps), "--limit", str(args.limit),
           "--timeout", str(args.timeout), "--engine", args.engine, "--workers", str(args.workers),
           "--restarts", str(args.restarts), "--out", str(out), "--force", "--quiet"]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    env = {**os.environ, "PYTHONPATH": str(src)}
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    summary = json.loads((out / "verification.json").read_text())
    points = [json.loads(line) for line in (out / "verification.jsonl").read_text().splitlines() if line]
    return {"counts": summary["counts"], "verified": summary["verified_accuracy"], "certifies": summary["certifies"],
            "total_s": sum(p["time_s"] for p in points), "median_s": statistics.median(p["time_s"] for p in points),
            "status": {p["index"]: p["status"] for p in points}, "time_s": {p["index"]: p["time_s"] for p in points}}


def compare(args: argparse.Namespace) -> None:
    """This tree against ``args.baseline_src``, alternating per round (drift cancels)."""
    from compare_trees import SRC, alternate  # benchmarks/ is on sys.path when this script runs

    trees = {"this": SRC, "baseline": Path(args.baseline_src).resolve()}
    with tempfile.TemporaryDirectory() as tmp:
        def one(name: str, src: Path, r: int) -> dict:
            res = _verify_with(src, args, Path(tmp) / f"{name}{r}")
            print(f"round {r} {name}: verified {100 * res['verified']:.1f}%, "
                  f"sum of point times {res['total_s']:.1f}s, median {res['median_s']:.3f}s", flush=True)
            return res

        rounds = alternate(trees, args.rounds, one)
    med = {n: statistics.median(x["total_s"] for x in v) for n, v in rounds.items()}
    this, base = rounds["this"][0], rounds["baseline"][0]
    # the points both trees decided: a timeout costs the same limit in both and would hide the rest
    decided = [i for i in this["status"] if "timeout" not in (this["status"][i], base["status"].get(i, "timeout"))]
    med_decided = {n: statistics.median(sum(x["time_s"][i] for i in decided) for x in v) for n, v in rounds.items()}
    changed = sorted(i for i in this["status"] if this["status"][i] != base["status"].get(i))
    result = {"run": args.run, "certifies": this["certifies"], "eps": args.eps, "limit": args.limit, "timeout": args.timeout, "engine": args.engine,
              "restarts": args.restarts, "baseline_src": str(trees["baseline"]), "rounds": args.rounds,
              "load_avg": os.getloadavg(), "median_total_s": med, "ratio_this_over_baseline": med["this"] / med["baseline"],
              "decided_points": len(decided), "median_decided_s": med_decided,
              "decided_ratio_this_over_baseline": med_decided["this"] / med_decided["baseline"],
              "counts": {n: v[0]["counts"] for n, v in rounds.items()},
              "verified": {n: v[0]["verified"] for n, v in rounds.items()},
              "per_round_total_s": {n: [x["total_s"] for x in v] for n, v in rounds.items()},
              "per_round_decided_s": {n: [sum(x["time_s"][i] for i in decided) for x in v] for n, v in rounds.items()},
              "points_with_another_status": changed}
    keys = sorted(set(this["counts"]) | set(base["counts"]))
    lines = [f"`certkd verify` of {args.run}, ε={args.eps:g}, {args.limit} points, timeout {args.timeout:g}s, "
             f"engine {args.engine}, {args.restarts} PGD restart(s), workers {args.workers}; {args.rounds} rounds "
             f"alternating; baseline {trees['baseline']}; load average at the end {os.getloadavg()[0]:.1f}; "
             f"weights SHA-256 {this['certifies'].get('weights_sha256', '?')}",
             "", "| stage | this tree | baseline |", "|---|---:|---:|"]
    lines += [f"| {k} | {this['counts'].get(k, 0)} | {base['counts'].get(k, 0)} |" for k in keys]
    lines += ["", f"verified: this {100 * this['verified']:.1f}%, baseline {100 * base['verified']:.1f}%; "
                  f"points with another status: {len(changed)}",
              f"median over rounds of the summed point times: this {med['this']:.1f}s, baseline {med['baseline']:.1f}s",
              f"on the {len(decided)} points both decided: this {med_decided['this']:.1f}s, baseline "
              f"{med_decided['baseline']:.1f}s",
              f"this/baseline verify time ratio: {med['this'] / med['baseline']:.2f} (all points), "
              f"{med_decided['this'] / med_decided['baseline']:.2f} (points both decided)"]
    print("\n".join(lines))
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_text(RESULTS / "bench_verify_vs_baseline.md", "\n".join(lines) + "\n")
    atomic_write_json(RESULTS / "bench_verify_vs_baseline.json", result)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/distillation_mnist/cc-ibp")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--engine", default="bab")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--restarts", type=int, default=1, help="PGD restarts (--baseline-src mode)")
    ap.add_argument("--baseline-src", default=None, help="src folder of another checkout to compare with")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds per tree (--baseline-src mode)")
    args = ap.parse_args()
    if args.baseline_src:
        return compare(args)

    cfg = VerifyConfig(eps=args.eps, timeout=args.timeout, engine=args.engine)
    out = Path(args.run) / "bench_verify"
    s = verify_run(args.run, cfg, limit=args.limit, out_dir=out, workers=args.workers, resume=args.resume,
                   force=not args.resume, data_dir=args.data_dir)
    lines = [f"run {args.run}, eps={args.eps:g}, {s['certifies']['points']}, timeout {args.timeout:g}s, "
             f"engine {args.engine}, workers {args.workers}",
             "", "| stage | points decided |", "|---|---|"]
    for status, count in s["counts"].items():
        lines.append(f"| {status} | {count} |")
    lines += ["", f"verified accuracy {100 * s['verified_accuracy']:.1f}% "
                  f"(IBP {100 * s['ibp_verified_accuracy']:.1f}%, CROWN {100 * s['crown_verified_accuracy']:.1f}%, "
                  f"α-CROWN {100 * s['alpha_crown_verified_accuracy']:.1f}%), clean {100 * s['clean_accuracy']:.1f}%, "
                  f"PGD {100 * s['pgd_accuracy']:.1f}%; counterexamples found by the verifier after PGD failed: "
                  f"{s['falsified_by_verifier']}, so at most {100 * s['empirical_robust_accuracy']:.1f}% is robust",
              f"median time per point: {s['median_time_s']:.3f}s"]
    text = "\n".join(lines)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_text(RESULTS / "bench_verify.md", text + "\n")
    atomic_write_json(RESULTS / "bench_verify.json", s)


if __name__ == "__main__":
    main()
