"""Timing helpers shared by the side-by-side benchmarks (bench_bounds.py, bench_step.py).

Every benchmark times the things it compares in the same rounds, alternating their order per
round so that machine drift cancels, and reports ratios of medians rather than seconds.
"""
from __future__ import annotations

import os
import statistics
import time
from typing import Callable, Dict, List

import torch


def default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def measure(fns: Dict[str, Callable[[], object]], repeats: int, warmup: int,
            device: torch.device) -> Dict[str, Dict[str, List[float]]]:
    """``warmup`` untimed rounds, then ``repeats`` timed rounds of every fn, order alternating per round.

    Returns per fn the wall-clock times and the process CPU times (all threads) of each round.
    CPU time is the steadier figure on a machine shared with other jobs.
    """
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: Dict[str, Dict[str, List[float]]] = {k: {"wall": [], "cpu": []} for k in fns}
    names = list(fns)
    for i in range(repeats):
        for k in (names if i % 2 == 0 else names[::-1]):
            sync()
            w0, c0 = time.perf_counter(), time.process_time()
            fns[k]()
            sync()
            times[k]["wall"].append(time.perf_counter() - w0)
            times[k]["cpu"].append(time.process_time() - c0)
    return times


def summary(t: Dict[str, List[float]]) -> dict:
    return {"median_wall_s": statistics.median(t["wall"]), "min_wall_s": min(t["wall"]),
            "max_wall_s": max(t["wall"]), "median_cpu_s": statistics.median(t["cpu"]), "n": len(t["wall"])}


def ratio(times: Dict[str, Dict[str, List[float]]], num: str, den: str) -> dict:
    """Ratio of the medians (the headline), the median of the per-round ratios and the CPU-time ratio."""
    a, b = times[num], times[den]
    return {"ratio_of_medians": statistics.median(a["wall"]) / statistics.median(b["wall"]),
            "median_of_round_ratios": statistics.median(x / y for x, y in zip(a["wall"], b["wall"])),
            "cpu_time_ratio": statistics.median(a["cpu"]) / statistics.median(b["cpu"])}


