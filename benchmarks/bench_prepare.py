"""Time per BaB batch on cnn7-w16 with and without the prepared-network cache (issue #22, "cost per domain").

One BaB batch is the β-CROWN call :func:`certkd.verification.bab.bab_verify` makes per batch:
``alpha_crown_bounds`` on ``--domains`` sub-domains with the root's intermediate bounds as overrides
(random splits on unstable neurons, ``--iterations`` α steps). The script also times ``_prepare``
alone (what the cache saves per call). It uses only APIs present before the cache, so it measures an
older tree too:

    PYTHONPATH=<older checkout>/src OMP_NUM_THREADS=1 nice -n 5 python benchmarks/bench_prepare.py --label before
    PYTHONPATH=src OMP_NUM_THREADS=1 nice -n 5 python benchmarks/bench_prepare.py --label after

Writes benchmarks/results/bench_prepare_<label>.json (medians of ``--repeats`` rounds, wall and CPU).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="cnn7-w16")
    ap.add_argument("--domains", type=int, default=32)
    ap.add_argument("--iterations", type=int, default=10)
    ap.add_argument("--eps", type=float, default=0.02)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--label", default="run")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    import certkd
    from certkd.bounds import crown as crown_module
    from certkd.bounds.crown import alpha_crown_bounds, crown_bounds
    from certkd.models import create_model

    torch.manual_seed(0)
    model = create_model(args.model, 1, 28, 10).eval()
    x = torch.rand(1, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    lo, hi = (x - args.eps).clamp(0, 1), (x + args.eps).clamp(0, 1)
    y = model(x).argmax(1)
    root = crown_bounds(model, lo, hi, y, return_intermediate=True)
    n = args.domains
    gen = torch.Generator().manual_seed(2)
    overrides = {}
    for k, (l, u) in enumerate(root.intermediate):  # each sub-domain splits one unstable neuron per layer
        l, u = l.expand(n, *l.shape[1:]).clone(), u.expand(n, *u.shape[1:]).clone()
        lf, uf = l.view(n, -1), u.view(n, -1)
        unstable = ((lf[0] < 0) & (uf[0] > 0)).nonzero().flatten()
        for d in range(n):
            if len(unstable):
                j = unstable[torch.randint(len(unstable), (1,), generator=gen)]
                (lf if d % 2 else uf)[d, j] = 0.0
        overrides[k] = (l, u)
    lo_n, hi_n, y_n = lo.expand(n, *lo.shape[1:]), hi.expand(n, *hi.shape[1:]), y.expand(n)

    def batch():
        alpha_crown_bounds(model, lo_n, hi_n, y_n, iterations=args.iterations, intermediate_overrides=overrides,
                           return_intermediate=True)

    def prepare():
        crown_module._prepare(model, lo_n, hi_n, y_n, None)

    out = {}
    for name, fn in (("prepare", prepare), ("batch", batch)):
        fn()
        wall, cpu = [], []
        for _ in range(args.repeats):
            t, c = time.perf_counter(), time.process_time()
            fn()
            wall.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
        out[name] = {"wall_ms": round(1e3 * statistics.median(wall), 2),
                     "cpu_ms": round(1e3 * statistics.median(cpu), 2)}
        print(f"{name}: median {out[name]['wall_ms']:.1f} ms wall, {out[name]['cpu_ms']:.1f} ms CPU", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"bench_prepare_{args.label}.json").write_text(json.dumps(
        {"label": args.label, "certkd": certkd.__file__, "model": args.model, "domains": n,
         "iterations": args.iterations, "repeats": args.repeats, "threads": 1, **out}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
