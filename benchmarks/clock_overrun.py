"""How far past its time limit each VNN-COMP instance answers (issue #22 item 1, docs/verify_onnx.md).

Runs the instances named on the command line (``benchmark:onnx:vnnlib``, paths as the benchmark's
instances CSV writes them) one at a time in this process, each with its published timeout ×
``--timeout-fraction``, through the same per-instance worker as ``certkd verify --instances``, and
records the wall time from the call to the answer on the ``time.monotonic`` clock. The overrun is
that time minus the limit (VNN-COMP counts an answer after the limit as a timeout).

Only the worker's job tuple is relied on, so the script also measures an older tree:

    PYTHONPATH=<older checkout>/src OMP_NUM_THREADS=1 nice -n 5 python benchmarks/clock_overrun.py --label before \\
        mnistfc:mnist-net_256x4.onnx:prop_0_0.03.vnnlib \\
        oval21:nets/cifar_base_kw.onnx:vnnlib/cifar_base_kw-img590-eps0.03228758169934641.vnnlib
    PYTHONPATH=src ... --label after  (the same instances)

Writes benchmarks/results/clock_overrun_<label>.json and prints one line per instance and the max.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "vnncomp2021"
INSTANCES = {"mnistfc": "mnistfc/mnistfc_instances.csv", "oval21": "oval21/oval21_instances.csv"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("instances", nargs="+",
                    help="benchmark:onnx:vnnlib, e.g. mnistfc:mnist-net_256x4.onnx:prop_0_0.03.vnnlib")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--timeout-fraction", type=float, default=0.1)
    ap.add_argument("--label", default="run")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    import certkd
    from certkd.verification.instances import _one, read_instances

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.instances:
            bench, onnx, vnnlib = spec.split(":")
            csv_path = args.data / INSTANCES[bench]
            limits = {(o, v): t for o, v, t in read_instances(csv_path)}
            limit = limits[(onnx, vnnlib)] * args.timeout_fraction
            job = (bench, str(csv_path.parent), onnx, vnnlib, limit, str(Path(tmp) / "results.csv"), 1, False)
            t0 = time.monotonic()
            row, reason = _one(job)
            wall = time.monotonic() - t0
            rows.append({"benchmark": bench, "onnx": onnx, "vnnlib": vnnlib, "limit_s": limit, "result": row[4],
                         "wall_s": round(wall, 3), "overrun_s": round(wall - limit, 3), "reason": reason})
            print(f"{bench} {onnx} {vnnlib}: {row[4]} in {wall:.2f} s, limit {limit:g} s, "
                  f"overrun {wall - limit:+.2f} s", flush=True)
    worst = max(r["overrun_s"] for r in rows)
    print(f"max overrun: {worst:+.2f} s ({certkd.__file__})")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"clock_overrun_{args.label}.json").write_text(json.dumps(
        {"label": args.label, "certkd": certkd.__file__, "timeout_fraction": args.timeout_fraction,
         "max_overrun_s": worst, "instances": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
