"""Run one benchmark script under this tree and under another checkout, side by side.

Issue #12 asks that the one-graph refactor leave ``bench_bounds.py`` and ``bench_step.py`` no
slower; issue #20 measures its speed-ups this way. This tree's copy of the script runs with
``CERTKD_SRC`` (and ``PYTHONPATH``) pointing at each tree's ``src`` in turn, ``--rounds`` times,
alternating which goes first (drift cancels); the scripts put ``CERTKD_SRC`` first on
``sys.path`` and report the ``certkd_src`` they imported, which is checked here.
Every numeric figure of the script's JSON whose key is one of ``--keys`` (default: the
ratios of medians and the median wall times) is collected; the table gives the median over
rounds per tree and this/baseline::

    git worktree add /tmp/pregraph 33e7c9a          # the tree before the network graph
    python benchmarks/compare_trees.py --baseline-src /tmp/pregraph/src -- bench_bounds.py --threads 1
    python benchmarks/compare_trees.py --baseline-src /tmp/pregraph/src -- bench_step.py --model cnn7-w16 \\
        --threads 1

Writes ``results/compare_<script>.{json,md}`` (atomically).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Tuple, TypeVar

HERE = Path(__file__).resolve().parent
SRC = HERE.parents[0] / "src"
RESULTS = HERE / "results"


T = TypeVar("T")


def alternate(trees: Dict[str, Path], rounds: int, run: Callable[[str, Path, int], T]) -> Dict[str, List[T]]:
    """``run(name, src, round)`` for every tree in every round, the order reversed every other round so
    that drift of the machine's speed falls on both trees alike; the results per tree, in round order."""
    out: Dict[str, List[T]] = {name: [] for name in trees}
    for r in range(rounds):
        for name in (list(trees) if r % 2 == 0 else list(reversed(list(trees)))):
            out[name].append(run(name, trees[name], r))
            print(f"round {r} {name} done", flush=True)
    return out


def figures(data: dict, keys: List[str], prefix: str = "") -> Dict[str, float]:
    """Numeric leaves of a benchmark's JSON whose last key is in ``keys``, by dotted path."""
    out: Dict[str, float] = {}
    for k, v in data.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(figures(v, keys, path + "."))
        elif k in keys and isinstance(v, (int, float)) and not isinstance(v, bool):
            out[path] = float(v)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline-src", required=True, help="src folder of the other checkout")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--keys", default="ratio_of_medians,median_wall_s,min_wall_s")
    ap.add_argument("--tag", default=None, help="results/compare_<script>_<tag>.{json,md} (default: no tag)")
    ap.add_argument("script", help="a script in benchmarks/ that takes --out FILE.json")
    ap.add_argument("args", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    trees = {"this": SRC, "baseline": Path(args.baseline_src).resolve()}
    keys = args.keys.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        def one(name: str, src: Path, r: int) -> Dict[str, float]:
            out = Path(tmp) / f"{name}{r}.json"
            cmd = [sys.executable, str(HERE / args.script), *[a for a in args.args if a != "--"], "--out", str(out)]
            # the scripts put CERTKD_SRC first on sys.path (their own tree's src otherwise)
            env = {**os.environ, "PYTHONPATH": str(src), "CERTKD_SRC": str(src)}
            subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
            data = json.loads(out.read_text())
            used = data.get("certkd_src")
            if used is not None and Path(used).resolve() != src.resolve():
                raise SystemExit(f"{args.script} imported certkd from {used}, not from {src}")
            return figures(data, keys)

        runs = alternate(trees, args.rounds, one)
    common = sorted(set(runs["this"][0]) & set(runs["baseline"][0]))
    med = {n: {k: statistics.median(x[k] for x in v) for k in common} for n, v in runs.items()}
    load = os.getloadavg()[0]
    lines = [f"`{args.script} {' '.join(a for a in args.args if a != '--')}` under this tree and under "
             f"{trees['baseline']}, {args.rounds} rounds alternating; medians over rounds; load average at the "
             f"end {load:.1f}", "", "| figure | this tree | baseline | this / baseline |", "|---|---:|---:|---:|"]
    lines += [f"| {k} | {med['this'][k]:.4g} | {med['baseline'][k]:.4g} | {med['this'][k] / med['baseline'][k]:.2f} |"
              for k in common if med["baseline"][k]]
    print("\n".join(lines))
    sys.path.insert(0, str(SRC))
    from certkd.checkpoints import atomic_write_json, atomic_write_text

    stem = Path(args.script).stem + (f"_{args.tag}" if args.tag else "")
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_text(RESULTS / f"compare_{stem}.md", "\n".join(lines) + "\n")
    atomic_write_json(RESULTS / f"compare_{stem}.json", {"script": args.script, "args": args.args,
                                                          "baseline_src": str(trees["baseline"]),
                                                          "rounds": runs, "median": med, "load_avg_end": load})
    return 0


if __name__ == "__main__":
    sys.exit(main())
