"""certkd on the VNN-COMP 2021 benchmarks mnistfc and oval21 (issue #12, docs/verify_onnx.md).

Runs ``certkd verify --instances`` (resumable) on each benchmark with the published timeouts times
``--timeout-fraction``, re-checks every ``sat`` counterexample with onnxruntime, and writes
``benchmarks/results/vnncomp.md``: certkd's sat / unsat / undecided counts and times, each 2021
tool's decided count, and every instance where certkd disagrees with a published verdict.

    OMP_NUM_THREADS=1 python benchmarks/vnncomp.py --timeout-fraction 0.1 --workers 1 [--limit 10]
"""
from __future__ import annotations

import argparse
import csv
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "vnncomp2021"
BENCHMARKS = {"mnistfc": "mnistfc/mnistfc_instances.csv", "oval21": "oval21/oval21_instances.csv"}
_VERDICT = {"sat": "sat", "violated": "sat", "unsat": "unsat", "holds": "unsat"}


def published(data: Path):
    """{tool: {(benchmark, onnx name, vnnlib name): ('sat'|'unsat'|None, run time s or None)}} from
    results/*.csv."""
    out = {}
    for f in sorted((data / "results").glob("*.csv")):
        rows = {}
        for r in csv.reader(f.open()):
            if len(r) < 5:
                continue
            try:
                secs = float(r[5]) if len(r) > 5 else None
            except ValueError:
                secs = None
            rows[(r[0], Path(r[1]).name, Path(r[2]).name)] = (_VERDICT.get(r[4].strip().lower()), secs)
        out[f.stem] = rows
    return out


def check_sat(cex: Path, onnx_path: Path, vnnlib_path: Path) -> str:
    """'' if onnxruntime confirms the counterexample file, else why not."""
    import onnxruntime as ort

    from certkd.verification.vnnlib import read_property

    text = cex.read_text()
    xs = {int(i): float(v) for i, v in re.findall(r"\(X_(\d+) (\S+?)\)", text)}
    prop = read_property(vnnlib_path)
    x = np.array([xs[i] for i in range(len(xs))], dtype=np.float32)
    if not prop.contains(x):
        return "outside the box"
    s = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    inp = s.get_inputs()[0]
    shape = [d if isinstance(d, int) and d > 0 else 1 for d in inp.shape]
    y = s.run(None, {inp.name: x.reshape(shape)})[0].reshape(-1)
    return "" if prop.violated_by(y) else "onnxruntime: property not violated"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--benchmarks", nargs="+", default=list(BENCHMARKS), choices=list(BENCHMARKS))
    ap.add_argument("--timeout-fraction", type=float, default=1.0)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--limit", type=int, help="first N instances of each benchmark only")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "vnncomp.md")
    args = ap.parse_args(argv)
    from certkd.verification.instances import cex_path, read_instances, run_instances

    pub = published(args.data)
    lines = ["# certkd on VNN-COMP 2021 (mnistfc, oval21)", "",
             f"Command: `OMP_NUM_THREADS=1 python benchmarks/vnncomp.py --timeout-fraction {args.timeout_fraction:g} "
             f"--workers {args.workers}" + (f" --limit {args.limit}" if args.limit else "") + "`; CPU only "
             f"(2 shared cores). Timeouts: the published ones × {args.timeout_fraction:g}. Every certkd `sat` was "
             "re-checked with onnxruntime (column *sat checked*). The 2021 tools ran on other hardware "
             "(some with GPUs) with the full timeouts: their counts are a reference, not a side-by-side measurement.",
             ""]
    disagreements = []
    for bench in args.benchmarks:
        csv_path = args.data / BENCHMARKS[bench]
        out_csv = args.out.parent / f"vnncomp_{bench}.csv"
        rows = run_instances(csv_path, out=out_csv, workers=args.workers, timeout_fraction=args.timeout_fraction,
                             limit=args.limit, log=lambda s: print(s, flush=True))
        inst = read_instances(csv_path)[:args.limit]
        keys = {(Path(o).name, Path(v).name) for o, v, _ in inst}
        # the time limit certkd had on each instance, to count the tools' answers that came within it
        limit_s = {(Path(o).name, Path(v).name): t * args.timeout_fraction for o, v, t in inst}
        counts = defaultdict(list)
        bad_sat = 0
        for r in rows:
            counts[r[4]].append(float(r[5]))
            if r[4] == "sat":
                cex = cex_path(out_csv, r[1], r[2])
                why = check_sat(cex, csv_path.parent / r[1], csv_path.parent / r[2])
                if why:
                    bad_sat += 1
                    disagreements.append((bench, r[1], r[2], "sat", f"counterexample NOT confirmed: {why}", ""))
            key = (bench, Path(r[1]).name, Path(r[2]).name)
            verdicts = {t: v[key][0] for t, v in pub.items() if key in v and v[key][0]}
            opposite = {"sat": "unsat", "unsat": "sat"}.get(r[4])
            against = sorted(t for t, v in verdicts.items() if v == opposite)
            if against:
                why = ("confirmed counterexample (onnxruntime): the published UNSAT is wrong" if r[4] == "sat"
                       else "proved unsat; the tools' SAT came without a counterexample checked here")
                disagreements.append((bench, r[1], r[2], r[4], why, ", ".join(against)))
        undecided = sum(len(v) for k, v in counts.items() if k not in ("sat", "unsat"))
        all_t = [float(r[5]) for r in rows]
        lines += [f"## {bench}: {len(rows)} of {len(inst)} instances", "",
                  "| certkd | sat | unsat | undecided | sat checked | median s | total s |",
                  "|---|---:|---:|---:|---:|---:|---:|",
                  f"| certkd | {len(counts['sat'])} | {len(counts['unsat'])} | {undecided} | "
                  f"{len(counts['sat']) - bad_sat}/{len(counts['sat'])} | "
                  f"{statistics.median(all_t) if all_t else 0:.2f} | {sum(all_t):.1f} |", "",
                  f"| 2021 tool (same instances) | sat | unsat | decided | decided within {args.timeout_fraction:g} "
                  "× the timeout |", "|---|---:|---:|---:|---:|"]

        def mine(v):
            return [(x, t, limit_s[k[1:]]) for k, (x, t) in v.items() if k[0] == bench and k[1:] in keys]

        for tool, v in sorted(pub.items(), key=lambda kv: -sum(1 for x, _, _ in mine(kv[1]) if x)):
            got = mine(v)
            verdicts = [x for x, _, _ in got]
            quick = sum(1 for x, t, lim in got if x and t is not None and t <= lim)
            lines.append(f"| {tool} | {verdicts.count('sat')} | {verdicts.count('unsat')} | "
                         f"{verdicts.count('sat') + verdicts.count('unsat')} | {quick} |")
        lines.append("")
    lines += ["## Disagreements with published verdicts", ""]
    if disagreements:
        lines += ["| benchmark | onnx | vnnlib | certkd | why | tools saying otherwise |", "|---|---|---|---|---|---|"]
        lines += [f"| {' | '.join(d)} |" for d in disagreements]
    else:
        lines.append("None: on every instance certkd decided, no published verdict says otherwise.")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
