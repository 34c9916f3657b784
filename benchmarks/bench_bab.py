"""Branch and bound with and without β-CROWN multipliers and the sub-domain attack.

Runs :func:`certkd.verification.bab.bab_verify` on the hard points of a ``bench_verify.py``
run (the rows that needed BaB or timed out there) in four settings, side by side in one
process on the same points and the same timeout:

* ``beta+attack``: β-CROWN multipliers on the splits, attack from every open sub-domain,
  BaBSR-style branching (the default);
* ``intercept-branching``: the same, branching on the triangle intercept alone;
* ``no-beta``: splits act through interval bounds only (the session-1 engine), attack on;
* ``no-beta-no-attack``: neither.

Prints, per setting, how many points were decided (verified / falsified / timeout), the
sub-domains bounded and the wall time, and the ratios to the default; writes
benchmarks/results/bench_bab.{json,md}.

    python benchmarks/bench_verify.py --run runs/distillation_mnist/cc-ibp     # first, once
    python benchmarks/bench_bab.py --run runs/distillation_mnist/cc-ibp --timeout 30
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from certkd.attacks import linf_box
from certkd.checkpoints import atomic_write_json, atomic_write_text, load_model
from certkd.data import load_dataset
from certkd.verification.bab import bab_verify

RESULTS = Path(__file__).resolve().parent / "results"
SETTINGS = {"beta+attack": dict(beta=True, attack_steps=5),
            "intercept-branching": dict(beta=True, attack_steps=5, branching="intercept"),
            "no-beta": dict(beta=False, attack_steps=5),
            "no-beta-no-attack": dict(beta=False, attack_steps=-1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/distillation_mnist/cc-ibp")
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--timeout", type=float, default=30.0)
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)

    rows = [json.loads(line) for line in (Path(args.run) / "bench_verify" / "verification.jsonl").read_text().splitlines()]
    hard = [r["index"] for r in rows if r["status"] in ("timeout", "verified-bab", "falsified-bab")]
    if not hard:
        raise SystemExit("no point needed branch and bound in this run's bench_verify results")
    model = load_model(args.run).eval()
    meta = model.certkd_meta.get("config", {})
    _, test, _ = load_dataset(meta.get("dataset", "digits"), args.data_dir or meta.get("data_dir"))

    results = {}
    for name, kw in SETTINGS.items():
        per_point = []
        for i in hard:
            x, y = test.get(torch.tensor([i]))
            lo, hi = linf_box(x, args.eps)
            t0 = time.perf_counter()
            r = bab_verify(model, x[0], int(y), lo[0], hi[0], timeout=args.timeout, **kw)
            per_point.append({"index": i, "status": r.status, "domains": r.domains,
                              "time_s": round(time.perf_counter() - t0, 3), "note": r.note})
            print(f"{name:18s} point {i:5d}: {r.status:9s} {r.domains:6d} domains {per_point[-1]['time_s']:7.2f}s",
                  flush=True)
        counts = {s: sum(p["status"] == s for p in per_point) for s in ("verified", "falsified", "timeout")}
        results[name] = {"counts": counts, "domains": sum(p["domains"] for p in per_point),
                         "time_s": round(sum(p["time_s"] for p in per_point), 2), "points": per_point}

    base = results["beta+attack"]
    lines = [f"run {args.run}, eps={args.eps:g}, {len(hard)} hard points (BaB or timeout in bench_verify), "
             f"timeout {args.timeout:g}s per point", "",
             "| setting | verified | falsified | timeout | sub-domains | time (s) | time / default |", "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        c = r["counts"]
        lines.append(f"| {name} | {c['verified']} | {c['falsified']} | {c['timeout']} | {r['domains']} | "
                     f"{r['time_s']} | {r['time_s'] / max(base['time_s'], 1e-9):.2f} |")
    text = "\n".join(lines)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    atomic_write_json(RESULTS / "bench_bab.json", {"run": args.run, "eps": args.eps, "timeout": args.timeout,
                                                   "points": hard, "settings": results})
    atomic_write_text(RESULTS / "bench_bab.md", text + "\n")


if __name__ == "__main__":
    main()
