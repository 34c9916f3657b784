"""Cost of an IBP pass relative to a forward pass of the same model, measured side by side.

What is timed (one run, repetitions of the two things interleaved so drift cancels):

* eval mode, under ``torch.no_grad()`` (a pure inference pass):
  ``interval_bounds(model.features, lo, hi)`` + ``elided_lower_bounds(model.head, ...)``
  versus one forward ``model(x)``. Final line: ``ibp/forward ratio: X.XX``.
* train mode, with autograd recording (as in a training step, no backward):
  the combined point + box pass ``ibp_logit_difference_bounds(model, lo, hi, y, point=x)``
  followed by ``model.head(point_output)`` versus one train-mode forward ``model(x)``.

An IBP pass does the centre (one forward's work) plus the radius with |W| (a second one), so
about 2x is the physical floor; the target is <= 2.5x. In train mode the combined pass also
carries the point, so its floor is about 3x a forward.

Usage::

    .venv/bin/python benchmarks/bench_bounds.py                      # cnn7, CIFAR shape, batch 128
    .venv/bin/python benchmarks/bench_bounds.py --model cnn-small --channels 1 --size 28 --batch 256

Writes ``benchmarks/results/bench_bounds_<model>.json`` (atomically).
"""
from __future__ import annotations

import argparse
import copy
import datetime as _dt
import os
import platform
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# compare_trees.py points CERTKD_SRC at the tree under test (PYTHONPATH alone would lose to this insert)
sys.path.insert(0, os.environ.get("CERTKD_SRC") or str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import certkd  # noqa: E402
from certkd.attacks import linf_box  # noqa: E402
from certkd.bounds import elided_lower_bounds, ibp_logit_difference_bounds, interval_bounds  # noqa: E402
from certkd.checkpoints import atomic_write_json  # noqa: E402
from _timing import default_threads, measure, pick_device, ratio, summary  # noqa: E402
from certkd.models import create_model  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="cnn7")
    ap.add_argument("--channels", type=int, default=3, help="input channels (3: CIFAR shape)")
    ap.add_argument("--size", type=int, default=32, help="input height = width (32: CIFAR shape)")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--eps", type=float, default=8 / 255)
    ap.add_argument("--repeats", type=int, default=10, help="timed repetitions per measured thing (>= 5)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    ap.add_argument("--threads", type=int, default=default_threads(), help="torch threads (default: core count)")
    ap.add_argument("--skip-train", action="store_true", help="only the eval-mode comparison")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/bench_bounds_<model>.json)")
    args = ap.parse_args(argv)
    if args.repeats < 5:
        ap.error("--repeats must be >= 5 (medians of at least 5)")

    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    load0 = list(os.getloadavg())
    torch.manual_seed(0)
    model = create_model(args.model, args.channels, args.size, args.classes).to(device)
    x = torch.rand(args.batch, args.channels, args.size, args.size, device=device)
    y = torch.randint(0, args.classes, (args.batch,), device=device)
    lo, hi = linf_box(x, args.eps)

    print(f"bench_bounds: model={args.model} input={args.batch}x{args.channels}x{args.size}x{args.size} "
          f"device={device} threads={torch.get_num_threads()} torch={torch.__version__} "
          f"repeats={args.repeats} warmup={args.warmup} loadavg={load0[0]:.1f}")

    # Warm the BN running statistics with a few train-mode batches so eval mode is realistic.
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand_like(x))
    model.eval()

    def eval_forward():
        with torch.no_grad():
            return model(x)

    def eval_ibp():
        with torch.no_grad():
            fb = interval_bounds(model.features, lo, hi)
            return elided_lower_bounds(model.head, fb.lower, fb.upper, y)

    times = measure({"forward": eval_forward, "ibp": eval_ibp}, args.repeats, args.warmup, device)
    result = {
        "benchmark": "bench_bounds",
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "model": args.model, "input_shape": [args.batch, args.channels, args.size, args.size],
        "device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "python": platform.python_version(), "machine": platform.machine(), "cpu_count": os.cpu_count(),
        "certkd_src": str(Path(certkd.__file__).resolve().parents[1]),
        "repeats": args.repeats, "warmup": args.warmup, "eps": args.eps,
        "eval": {"forward": summary(times["forward"]), "ibp": summary(times["ibp"]),
                 "ibp/forward": ratio(times, "ibp", "forward")},
        "target_eval_ratio": 2.5, "loadavg_start": load0,
    }

    if not args.skip_train:
        tmodel = copy.deepcopy(model).train()

        def train_forward():
            return tmodel(x)

        def train_combined():
            lb, fb = ibp_logit_difference_bounds(tmodel, lo, hi, y, point=x)
            return lb, tmodel.head(fb.point_output)

        ttimes = measure({"forward": train_forward, "combined": train_combined}, args.repeats, args.warmup, device)
        result["train"] = {"forward": summary(ttimes["forward"]), "combined": summary(ttimes["combined"]),
                           "combined/forward": ratio(ttimes, "combined", "forward")}
        r = result["train"]["combined/forward"]
        print(f"train mode (autograd on): forward {statistics.median(ttimes['forward']['wall']) * 1e3:.0f} ms, "
              f"point+box pass {statistics.median(ttimes['combined']['wall']) * 1e3:.0f} ms (medians, for context)")
        print(f"train combined(point+box)/forward ratio: {r['ratio_of_medians']:.2f} (median of per-round ratios "
              f"{r['median_of_round_ratios']:.2f}, CPU-time ratio {r['cpu_time_ratio']:.2f}; floor ~3)")

    r = result["eval"]["ibp/forward"]
    print(f"eval mode (no_grad): forward {statistics.median(times['forward']['wall']) * 1e3:.0f} ms, "
          f"IBP {statistics.median(times['ibp']['wall']) * 1e3:.0f} ms (medians, for context)")
    print(f"eval ibp/forward: median of per-round ratios {r['median_of_round_ratios']:.2f}, CPU-time ratio "
          f"{r['cpu_time_ratio']:.2f} (target <= 2.5, floor ~2)")
    result["loadavg_end"] = list(os.getloadavg())
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"bench_bounds_{args.model}.json"
    atomic_write_json(out, result)
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    print(f"ibp/forward ratio: {r['ratio_of_medians']:.2f}")
    return result


if __name__ == "__main__":
    main()
