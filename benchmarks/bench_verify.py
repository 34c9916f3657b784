"""Verify 200 MNIST test points (class-stratified, seed 0) of an ε=0.1 CC-IBP cnn-small student (60 s timeout).

Prints how many points each stage decided and the median time per point, and writes
benchmarks/results/bench_verify.{json,md}. The student defaults to the CC-IBP run of
benchmarks/distillation_mnist.py; train one first if it is missing:

    python benchmarks/distillation_mnist.py
    python benchmarks/bench_verify.py --run runs/distillation_mnist/cc-ibp --workers 2
"""
from __future__ import annotations

import argparse
from pathlib import Path

from certkd.checkpoints import atomic_write_json, atomic_write_text
from certkd.verification.pipeline import VerifyConfig, verify_run

RESULTS = Path(__file__).resolve().parent / "results"


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
    args = ap.parse_args()

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
