"""What the float proof (docs/verify_onnx.md §5) costs a verified point of ``certkd verify RUN``.

For cnn7-w16 on digits shapes (1×8×8) and on MNIST shapes (1×28×28), IBP-initialised (the cost does not
depend on the weights' values), at points that IBP certifies (ε = 1e-4, label = the model's prediction):

* ``with``: :func:`certkd.verification.pipeline.verify_sample` as it runs (clean check, PGD-40, IBP,
  then the rounding bound of the margin rows);
* ``without``: the same with the rounding bound replaced by a constant (the pipeline before the float proof);
* ``cold``: the first rounding bound of a model (building its sparse |M| matrices, cached per network
  until the weights change), paid once per run and worker process.

Timed side by side in alternating rounds (``_timing.measure``); prints milliseconds per point and the
ratio with/without, and writes ``results/bench_rounding.json``::

    OMP_NUM_THREADS=1 python benchmarks/bench_rounding.py --threads 1
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

import certkd.verification.pipeline as pipeline
from certkd.models import create_model, ibp_initialize
from certkd.verification.float_proof import margin_rounding

from _timing import default_threads, measure, summary

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = {"digits": 8, "mnist": 28}


def _points(model, size: int, n: int, gen: torch.Generator):
    xs = torch.rand(n, 1, 1, size, size, generator=gen)
    with torch.no_grad():
        return [(x, int(model(x).argmax())) for x in xs]


def bench(size: int, points: int, repeats: int, threads: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    model = ibp_initialize(create_model("cnn7-w16", 1, size, 10), gen).eval()
    pts = _points(model, size, points, gen)
    cfg = pipeline.VerifyConfig(eps=1e-4, engine="none", alpha_iterations=0)
    lo, hi = pts[0][0] - 1e-4, pts[0][0] + 1e-4
    fresh = copy.deepcopy(model)
    t0 = time.perf_counter()
    margin_rounding(fresh, lo, hi, pts[0][1])
    cold = time.perf_counter() - t0
    real = pipeline.margin_rounding
    zeros = np.zeros(9)

    def run(with_rounding: bool):
        pipeline.margin_rounding = real if with_rounding else (lambda *a: zeros)
        try:
            rows = [pipeline.verify_sample(model, x, y, cfg) for x, y in pts]
        finally:
            pipeline.margin_rounding = real
        assert all(r["status"] == "verified-ibp" for r in rows), [r["status"] for r in rows]
        return rows

    times = measure({"with": lambda: run(True), "without": lambda: run(False)}, repeats, 1, torch.device("cpu"))
    rows = run(True)
    res = {k: summary(v) for k, v in times.items()}
    per = {k: res[k]["median_wall_s"] / points for k in res}
    return {"input": f"1x{size}x{size}", "points": points, "threads": threads, "cold_first_bound_s": cold,
            "ms_per_point_with": 1e3 * per["with"], "ms_per_point_without": 1e3 * per["without"],
            "extra_ms_per_point": 1e3 * (per["with"] - per["without"]), "ratio_with_without": per["with"] / per["without"],
            "float_proofs": sum(r["float_proof"] for r in rows), "max_rounding_bound": max(r["rounding_bound"] for r in rows),
            "min_margin": min(r["margin"] for r in rows), "raw": res}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--points", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=default_threads())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"(torch threads: {args.threads})")
    out = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__, "load_start": os.getloadavg()}
    for name, size in SHAPES.items():
        r = out[name] = bench(size, args.points, args.repeats, args.threads)
        print(f"{name} cnn7-w16 {r['input']}: {r['ms_per_point_without']:.1f} ms/point without, "
              f"{r['ms_per_point_with']:.1f} ms/point with the float proof (+{r['extra_ms_per_point']:.1f} ms, "
              f"×{r['ratio_with_without']:.2f}); first bound of the model {r['cold_first_bound_s']:.2f} s; "
              f"{r['float_proofs']}/{r['points']} float proofs (max rounding bound {r['max_rounding_bound']:.2g}, "
              f"least margin {r['min_margin']:.2g})")
    out["load_end"] = os.getloadavg()
    RESULTS.mkdir(exist_ok=True)
    tmp = RESULTS / "bench_rounding.json.tmp"
    tmp.write_text(json.dumps(out, indent=1))
    tmp.replace(RESULTS / "bench_rounding.json")


if __name__ == "__main__":
    main()
