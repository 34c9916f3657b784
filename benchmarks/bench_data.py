"""Why ImageFolder/TinyImageNet decoding is serial: one thread against a thread pool.

Writes ``--images`` JPEGs of 64×64 (TinyImageNet's size and format), then decodes them to one
uint8 array the way :mod:`certkd.data.imagefolder` does (PIL open → RGB → copy into a
preallocated array), serially and with a ``ThreadPoolExecutor`` of ``--workers`` threads,
alternating the order over ``--repeats`` rounds. Prints the ratio of the median times
(serial / pool: above 1 means the pool is faster) and checks that both give identical arrays.
Results: ``benchmarks/results/bench_data.json``.

    python benchmarks/bench_data.py --images 5000
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from certkd.checkpoints import atomic_write_json  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def write_jpegs(root: Path, n: int) -> list:
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        p = root / f"{i}.JPEG"
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(p, format="JPEG")
        paths.append(p)
    return paths


def decode(paths: list, workers: int) -> np.ndarray:
    from PIL import Image

    out = np.empty((len(paths), 64, 64, 3), dtype=np.uint8)

    def put(i: int) -> None:
        with Image.open(paths[i]) as im:
            out[i] = np.asarray(im.convert("RGB"), dtype=np.uint8)

    if workers == 1:
        for i in range(len(paths)):
            put(i)
    else:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(put, range(len(paths)), chunksize=256))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=max(2, min(8, os.cpu_count() or 2)))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_jpegs(Path(tmp), args.images)
        times = {1: [], args.workers: []}
        ref = None
        for r in range(args.repeats):
            for w in (list(times) if r % 2 == 0 else list(times)[::-1]):
                t0 = time.perf_counter()
                arr = decode(paths, w)
                times[w].append(time.perf_counter() - t0)
                ref = arr if ref is None else ref
                assert np.array_equal(ref, arr)
    med = {w: statistics.median(t) for w, t in times.items()}
    speedup = med[1] / med[args.workers]
    print(f"{args.images} JPEGs 64x64, median of {args.repeats}: serial {med[1]:.2f}s, "
          f"{args.workers} threads {med[args.workers]:.2f}s")
    print(f"serial/pool time ratio ({args.workers} threads): {speedup:.2f}  (> 1: the pool is faster)")
    RESULTS.mkdir(exist_ok=True)
    atomic_write_json(RESULTS / "bench_data.json", {"images": args.images, "workers": args.workers,
                                                    "median_s": {str(k): v for k, v in med.items()},
                                                    "serial_over_pool": speedup, "cpus": os.cpu_count()})


if __name__ == "__main__":
    main()
