"""certkd on the VNN-COMP 2021 benchmarks mnistfc and oval21 (issue #12, docs/verify_onnx.md).

Runs ``certkd verify --instances`` (resumable) on each benchmark with the published timeouts times
``--timeout-fraction``, re-checks every ``sat`` counterexample with onnxruntime, and writes
``benchmarks/results/vnncomp.md``: certkd's sat / unsat / undecided counts and times, each 2021
tool's decided count, and every instance where certkd disagrees with a published verdict.

    OMP_NUM_THREADS=1 python benchmarks/vnncomp.py --timeout-fraction 0.1 --workers 1 [--limit 10]

``--compare TOOL.csv`` runs nothing: it reads certkd's results CSVs of an earlier run
(``benchmarks/results/vnncomp_<benchmark>.csv``, or ``--certkd-results``) and an external verifier's
results CSV in the VNN-COMP 2021 format (``benchmark,onnx,vnnlib,prepare_time,result,run_time``, e.g.
one of ``results/*.csv`` of the data folder, or a side-by-side run of another tool) and prints, per
benchmark, for both on the instances both have: decided within the limit (published timeout ×
``--timeout-fraction``), overruns (answers after the limit: counted as timeouts by VNN-COMP), the
median time on the instances both decided within the limit, and contradictions (sat against unsat).
certkd's time is prepare + run (its limit covers reading the files); the external tool's the run time.

    python benchmarks/vnncomp.py --compare results/a-b-CROWN.csv --timeout-fraction 0.1
"""
from __future__ import annotations

import argparse
import csv
import math
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
    return {f.stem: _results(f, certkd=False) for f in sorted((data / "results").glob("*.csv"))}


def _results(path: Path, certkd: bool):
    """{(benchmark, onnx name, vnnlib name): ('sat'|'unsat'|None, seconds or None)} of a results CSV
    (``certkd``: its seconds are prepare + run, else the run time alone)."""
    out = {}
    with path.open(newline="") as f:
        for r in csv.reader(f):
            if len(r) < 5:
                continue
            try:
                secs = float(r[5]) + (float(r[3]) if certkd else 0.0) if len(r) > 5 else None
            except ValueError:
                secs = None
            out[(r[0], Path(r[1]).name, Path(r[2]).name)] = (_VERDICT.get(r[4].strip().lower()), secs)
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


def compare(ours: dict, theirs: dict, limits: dict) -> dict:
    """Side-by-side counts on the instances in both result maps (see :func:`_results`) that have a
    limit (``limits``: {(benchmark, onnx name, vnnlib name): seconds}), per benchmark:
    {benchmark: {"instances", "decided": (ours, theirs), "overruns": (ours, theirs), "max_overrun": (ours,
    theirs) seconds past the limit (≤ 0: none), "both": n, "median": (ours, theirs) or None,
    "contradictions": [key, ...]}}."""
    out = {}
    for key in sorted(set(ours) & set(theirs) & set(limits)):
        b = out.setdefault(key[0], {"instances": 0, "decided": [0, 0], "overruns": [0, 0], "times": ([], []),
                                    "max_overrun": [-math.inf, -math.inf], "contradictions": []})
        b["instances"] += 1
        within = []
        for i, (verdict, secs) in enumerate((ours[key], theirs[key])):
            late = secs is not None and secs > limits[key]
            if secs is not None:
                b["max_overrun"][i] = max(b["max_overrun"][i], secs - limits[key])
            b["overruns"][i] += late
            within.append(verdict is not None and secs is not None and not late)
            b["decided"][i] += within[-1]
        if all(within):
            b["times"][0].append(ours[key][1])
            b["times"][1].append(theirs[key][1])
        if {ours[key][0], theirs[key][0]} == {"sat", "unsat"}:
            b["contradictions"].append(key)
    for b in out.values():
        mine, other = b.pop("times")
        b["both"] = len(mine)
        b["median"] = (statistics.median(mine), statistics.median(other)) if mine else None
        b["decided"], b["overruns"], b["max_overrun"] = (tuple(b[k]) for k in ("decided", "overruns", "max_overrun"))
    return out


def compare_table(result: dict, tool: str, fraction: float) -> str:
    """Markdown: one row per benchmark of :func:`compare`'s result, then the contradictions."""
    lines = [f"| benchmark | instances | certkd decided | {tool} decided | certkd overruns (max s) | {tool} overruns "
             f"(max s) | median on both decided (certkd / {tool}) | contradictions |",
             "|---|---:|---:|---:|---:|---:|---|---:|"]
    for bench, b in sorted(result.items()):
        med = f"{b['median'][0]:.2f} s / {b['median'][1]:.2f} s ({b['both']})" if b["median"] else "-"
        late = [f"{n} ({m:+.2f})" if n else "0" for n, m in zip(b["overruns"], b["max_overrun"])]
        lines.append(f"| {bench} | {b['instances']} | {b['decided'][0]} | {b['decided'][1]} | {late[0]} | {late[1]} | "
                     f"{med} | {len(b['contradictions'])} |")
    lines += ["", f"Decided: sat or unsat within the limit (published timeout × {fraction:g}); overruns: any answer "
              "after it (VNN-COMP counts them as timeouts)."]
    bad = [k for b in result.values() for k in b["contradictions"]]
    if bad:
        lines += ["", "Contradictions (sat against unsat):"] + [f"- {' '.join(k)}" for k in bad]
    return "\n".join(lines)


def run_compare(args) -> int:
    from certkd.errors import CertkdError
    from certkd.verification.instances import read_instances

    if not args.compare.is_file():
        raise CertkdError(f"--compare {args.compare}: no such file; pass an external verifier's results CSV")
    paths = args.certkd_results or [args.out.parent / f"vnncomp_{b}.csv" for b in args.benchmarks]
    ours = {}
    for p in paths:
        if not p.is_file():
            raise CertkdError(f"certkd results {p} not found; run this script without --compare first, or pass "
                              "--certkd-results")
        ours.update(_results(p, certkd=True))
    limits = {}
    for bench in args.benchmarks:
        for o, v, t in read_instances(args.data / BENCHMARKS[bench]):
            limits[(bench, Path(o).name, Path(v).name)] = t * args.timeout_fraction
    result = compare(ours, _results(args.compare, certkd=False), limits)
    print(compare_table(result, args.compare.stem, args.timeout_fraction))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--benchmarks", nargs="+", default=list(BENCHMARKS), choices=list(BENCHMARKS))
    ap.add_argument("--timeout-fraction", type=float, default=1.0)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--limit", type=int, help="first N instances of each benchmark only")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "vnncomp.md")
    ap.add_argument("--compare", type=Path, help="an external verifier's results CSV: compare, run nothing")
    ap.add_argument("--certkd-results", type=Path, nargs="+",
                    help="certkd's results CSVs for --compare (default: vnncomp_<benchmark>.csv beside --out)")
    args = ap.parse_args(argv)
    if args.compare is not None:
        return run_compare(args)
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
