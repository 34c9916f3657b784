"""Time and peak memory of CROWN / α-CROWN on CNN7 at MNIST size, batch 1, CPU.

Each configuration runs in its own subprocess so that its peak resident memory
(``ru_maxrss``) is its own. Printed per configuration: wall time, peak RSS and its increase over
the process after model/data setup, the mean lower bound, and the number of unstable ReLU
neurons per layer (after the intermediate bounds).

Model (unless ``--checkpoint``): ``create_model("cnn7", 1, 28, 10, width=64, linear=512)`` with IBP initialisation and
BatchNorm running statistics calibrated on a few batches (MNIST if ``--data-dir`` is given,
else uniform noise). Untrained, so many ReLUs are unstable: a worst case for the cost of
CROWN intermediate bounds, which is proportional to the number of unstable neurons.

Usage::

    .venv/bin/python benchmarks/bench_crown.py                                  # ibp vs last vs crown
    .venv/bin/python benchmarks/bench_crown.py --modes ibp,crown --eps 0.1 --data-dir ../shared/data/mnist
    .venv/bin/python benchmarks/bench_crown.py --width 16 --linear 128          # smaller CNN7
    .venv/bin/python benchmarks/bench_crown.py --channels 3 --size 32           # CIFAR-size CNN7
    .venv/bin/python benchmarks/bench_crown.py --checkpoint runs/cc --eps 0.1   # a trained model

Modes: ``ibp`` (IBP intermediates, CROWN final pass), ``last`` (CROWN only for the last
ReLU layer), ``crown`` (CROWN for every ReLU layer), ``alpha-ibp`` / ``alpha-last`` (α-CROWN,
20 iterations, on top of those intermediates).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from certkd.bounds.crown import alpha_crown_bounds, crown_bounds  # noqa: E402
from certkd.bounds.ibp import ibp_logit_difference_bounds  # noqa: E402
from certkd.models import create_model, ibp_initialize  # noqa: E402


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def build(args):
    torch.manual_seed(args.seed)
    if args.checkpoint:
        from certkd.checkpoints import load_model
        model = load_model(args.checkpoint)
        args.channels, args.size = model.spec.in_channels, model.spec.input_size
    else:
        model = create_model("cnn7", args.channels, args.size, 10, width=args.width, linear=args.linear)
        ibp_initialize(model, torch.Generator().manual_seed(args.seed))
    images = None
    if args.data_dir or (args.size == 8 and args.channels == 1):
        from certkd.data import load_dataset
        _, test, _ = load_dataset("digits" if args.size == 8 else "mnist", args.data_dir)
        images = test.images[:256].float()
        images = images / 255.0 if test.images.dtype == torch.uint8 else images
        labels = test.labels[:256]
    if images is None or tuple(images.shape[1:]) != (args.channels, args.size, args.size):
        images = torch.rand(256, args.channels, args.size, args.size)
        labels = torch.randint(0, 10, (256,))
    if args.checkpoint:
        return model.eval(), images, labels
    for m in model.modules():  # calibrate BN running statistics (cumulative average)
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = None
    model.train()
    with torch.no_grad():
        for i in range(0, 256, 64):
            model(images[i:i + 64])
    model.eval()
    return model, images, labels


def worker(args) -> dict:
    torch.set_num_threads(args.threads)
    model, images, labels = build(args)
    x, y = images[args.index:args.index + args.batch], labels[args.index:args.index + args.batch]
    lo, hi = (x - args.eps).clamp(0, 1), (x + args.eps).clamp(0, 1)
    n_relu = sum(isinstance(m, torch.nn.ReLU) for m in model.features)
    if args.batch > 1 and args.batch > len(images) - args.index:
        raise SystemExit("not enough images for that batch")
    inter = {"ibp": "ibp", "crown": "crown", "last": [n_relu - 1]}[args.mode.replace("alpha-", "")]
    base = peak_rss_mb()
    t0 = time.perf_counter()
    with torch.no_grad():
        if args.mode.startswith("alpha-"):
            res = None
        else:
            res = crown_bounds(model, lo, hi, y, intermediate=inter, return_intermediate=True,
                               chunk_elements=args.chunk_elements)
    if res is None:
        res = alpha_crown_bounds(model, lo, hi, y, intermediate=inter, iterations=20, return_intermediate=True,
                                 chunk_elements=args.chunk_elements)
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        ibp, _ = ibp_logit_difference_bounds(model, lo, hi, y)
    unstable = [int(((l < 0) & (u > 0)).sum()) for l, u in res.intermediate]
    return {"mode": args.mode, "seconds": round(seconds, 2), "peak_rss_mb": round(peak_rss_mb(), 1),
            "rss_increase_mb": round(peak_rss_mb() - base, 1), "mean_lb": round(float(res.lower.mean()), 4),
            "min_lb": round(float(res.lower.min()), 4), "ibp_mean_lb": round(float(ibp.mean()), 4),
            "unstable_per_relu": unstable, "neurons_per_relu": [int(l[0].numel()) for l, _ in res.intermediate],
            "threads": args.threads, "width": args.width, "size": args.size, "eps": args.eps, "batch": args.batch}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", default="ibp,last,crown")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--linear", type=int, default=512)
    p.add_argument("--size", type=int, default=28)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--checkpoint", default=None, help="benchmark a trained model (run dir or checkpoint) instead")
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--index", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--chunk-elements", type=int, default=2 ** 25)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per configuration")
    p.add_argument("--mode", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mode:
        print(json.dumps(worker(args)))
        return
    forwarded = [a for a in sys.argv[1:]]
    what = args.checkpoint or f"cnn7 {args.channels}x{args.size}x{args.size}"
    arch = "" if args.checkpoint else f" width={args.width} linear={args.linear}"
    print(f"{what}{arch} eps={args.eps} "
          f"batch={args.batch} threads={args.threads} torch={torch.__version__}")
    for mode in args.modes.split(","):
        cmd = [sys.executable, __file__, *forwarded, "--mode", mode]
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            print(f"{mode:>10}: timed out after {args.timeout:.0f} s")
            continue
        if out.returncode != 0:
            print(f"{mode:>10}: failed (rc {out.returncode}): {out.stderr.strip().splitlines()[-1:]}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{mode:>10}: {r['seconds']:8.2f} s  peak RSS {r['peak_rss_mb']:8.1f} MB (+{r['rss_increase_mb']:.1f})  "
              f"mean lb {r['mean_lb']:9.4f} (IBP {r['ibp_mean_lb']:9.4f})  unstable {r['unstable_per_relu']}")


if __name__ == "__main__":
    main()
