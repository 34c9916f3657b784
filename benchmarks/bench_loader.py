"""Does loading show in the training step? The batch iterator's time per batch beside a CC-IBP step's (issue #20).

certkd keeps a dataset in memory as uint8 and builds each batch in the training loop's own thread
(:func:`certkd.data.iterate_batches`: a seeded permutation, a gather, crop-flip augmentation, the
float conversion). This script times one epoch of batches of CIFAR-10's shape (50,000 × 3 × 32 × 32,
crop-flip, padding 4) or MNIST's (60,000 × 1 × 28 × 28, no augmentation), and, in the same run, the
median of ``--steps`` CC-IBP training steps of ``--model`` at that batch, 1 thread. It prints the loader's
share of a step. (JPEG decoding happens once, when a dataset is loaded: ``bench_data.py``.)

    python benchmarks/bench_loader.py --shape cifar --batch 256
    python benchmarks/bench_loader.py --shape mnist --batch 256 --model cnn7-w16
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from certkd.attacks import PGD  # noqa: E402
from certkd.config import resolve_config  # noqa: E402
from certkd.data import iterate_batches  # noqa: E402
from certkd.data.dataset import ImageDataset  # noqa: E402
from certkd.models import create_model  # noqa: E402
from certkd.training.step import training_loss  # noqa: E402

SHAPES = {"cifar": (50000, 3, 32, "crop-flip", 4, "cifar10-2_255-ccibp"),
          "mnist": (60000, 1, 28, "none", 0, "mnist-0.1-ccibp")}
RESULTS = Path(__file__).resolve().parent / "results"


def loader_ms(ds: ImageDataset, batch: int, augmentation: str, padding: int) -> float:
    """Median over three epochs of the wall time per batch of one shuffled epoch."""
    per_batch = []
    for epoch in range(3):
        t0, n = time.perf_counter(), 0
        for _x, _y in iterate_batches(ds, batch, shuffle=True, seed=epoch, augmentation=augmentation,
                                      crop_padding=padding):
            n += 1
        per_batch.append((time.perf_counter() - t0) / n * 1e3)
    return statistics.median(per_batch)


def step_ms(shape: str, model_name: str, batch: int, steps: int) -> float:
    """Median wall time of a CC-IBP step (loss, backward, Adam) after ε's ramp, in ms."""
    _, c, s, _, _, preset = SHAPES[shape]
    kw = {"width": 16, "linear": 128} if model_name == "cnn7-w16" else {}
    torch.manual_seed(0)
    model = create_model("cnn7", c, s, 10, **kw).train()
    cfg = resolve_config(preset, {"batch_size": batch, "model_kwargs": kw})
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    attack = PGD(cfg.attack_steps, cfg.attack_step_size)
    x, y = torch.rand(batch, c, s, s), torch.randint(0, 10, (batch,))
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        loss, _ = training_loss(model, x, y, cfg, cfg.eps, False, attack)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i:  # the first step warms up
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="cifar")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--model", choices=("cnn7", "cnn7-w16"), default="cnn7-w16")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--points", type=int, default=None, help="dataset size (default: the real one)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    n, c, s, aug, pad, _ = SHAPES[args.shape]
    n = args.points or n
    g = torch.Generator().manual_seed(0)
    ds = ImageDataset(torch.randint(0, 256, (n, c, s, s), dtype=torch.uint8, generator=g),
                      torch.randint(0, 10, (n,), generator=g))
    load = loader_ms(ds, args.batch, aug, pad)
    step = step_ms(args.shape, args.model, args.batch, args.steps)
    res = {"benchmark": "bench_loader", "shape": args.shape, "points": n, "batch": args.batch, "model": args.model,
           "augmentation": aug, "loader_ms_per_batch": load, "cc_ibp_step_ms": step, "loader_share": load / step,
           "torch": torch.__version__}
    print(f"{args.shape} {n} points, batch {args.batch}, {aug}: loader {load:.2f} ms/batch; CC-IBP step of "
          f"{args.model} {step:.0f} ms; the loader is {100 * load / step:.2f}% of a step")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    main()
