"""Branch and bound, part by part, on the hard properties (#12 item 4).

Runs :func:`certkd.verification.bab.bab_verify` on hard properties in several settings, side by
side in one process on the same points and the same timeout:

* ``fifo-cold``: the engine before #12: first-in-first-out domain list, every child's α-CROWN
  from scratch, BaBSR branching;
* ``heap-cold``: the domain store ordered by bound (worst first), α from scratch;
* ``heap-warm``: + α carried from parent to children — the default;
* ``intercept`` / ``fsb``: the default with intercept / filtered smart branching;
* ``no-beta``: splits act through interval bounds only; ``no-beta-no-attack``: neither.

Hard properties come either from a ``bench_verify.py`` run (``--run``: the rows that needed BaB
or timed out there) or, with ``--digits DIR``, from a digits MLP and cnn-small trained into DIR
(once; the models of tests/verification/test_pipeline.py) at radii between the largest
CROWN-certified and the smallest PGD-attacked one (``_hard_radii`` there).

Prints per setting the decided counts, the sub-domains bounded and the wall time, in total and
on the points every setting decided; writes benchmarks/results/bench_bab.{json,md} (``--digits``: bench_bab_digits.{json,md}).

    python benchmarks/bench_bab.py --digits /tmp/bab_digits --timeout 30
    python benchmarks/bench_verify.py --run runs/distillation_mnist/cc-ibp     # first, once
    python benchmarks/bench_bab.py --run runs/distillation_mnist/cc-ibp --timeout 30
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from certkd.attacks import linf_box
from certkd.checkpoints import atomic_write_json, atomic_write_text, load_model
from certkd.data import load_dataset
from certkd.verification.bab import bab_verify

RESULTS = Path(__file__).resolve().parent / "results"
SETTINGS = {"fifo-cold": dict(order="fifo", warm_alpha=False),
            "heap-cold": dict(warm_alpha=False),
            "heap-warm": dict(),
            "intercept": dict(branching="intercept"),
            "fsb": dict(branching="fsb"),
            "no-beta": dict(beta=False),
            "no-beta-no-attack": dict(beta=False, attack_steps=-1)}
BASE = "fifo-cold"


def _digits_properties(root: Path, per_model: int):
    """[(name, model, x, label, eps)] hard properties on the digits MLP and cnn-small in ``root``."""
    from certkd import resolve_config, train

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "verification"))
    from test_pipeline import _hard_radii

    quiet = dict(progress=False, log=lambda s: None)
    cfgs = {"mlp": {"method": "standard", "model": "mlp", "epochs": 5, "eval_limit": 10,
                    "model_kwargs": {"hidden": [32, 32]}},
            "cnn": {"method": "cc-ibp", "epochs": 6, "eps_length": 3, "eval_limit": 10}}
    torch.manual_seed(0)
    for name, cfg in cfgs.items():
        if not (root / name / "checkpoints").exists():
            train(resolve_config("digits-small", cfg), root / name, **quiet)
    _, test, _ = load_dataset("digits")
    cache = root / f"hard{per_model}.json"
    if not cache.exists():
        props = []
        for name in cfgs:
            model = load_model(root / name).eval()
            i = count = 0
            while count < per_model and i < 60:
                x, y = test.get(torch.tensor([i]))
                i += 1
                with torch.no_grad():
                    if int(model(x).argmax(1)) != int(y):
                        continue
                for eps in _hard_radii(model, x, int(y)):
                    count += 1
                    props.append({"model": name, "index": i - 1, "label": int(y), "eps": eps})
        cache.write_text(json.dumps(props))
    models = {name: load_model(root / name).eval() for name in cfgs}
    out = []
    for p in json.loads(cache.read_text()):
        x, _ = test.get(torch.tensor([p["index"]]))
        out.append((f"{p['model']}:{p['index']}", models[p["model"]], x, p["label"], p["eps"]))
    return out


def _run_properties(run: str, eps: float, data_dir):
    rows = [json.loads(line) for line in (Path(run) / "bench_verify" / "verification.jsonl").read_text().splitlines()]
    hard = [r["index"] for r in rows if r["status"] in ("timeout", "verified-bab", "falsified-bab")]
    if not hard:
        raise SystemExit("no point needed branch and bound in this run's bench_verify results")
    model = load_model(run).eval()
    meta = model.certkd_meta.get("config", {})
    _, test, _ = load_dataset(meta.get("dataset", "digits"), data_dir or meta.get("data_dir"))
    out = []
    for i in hard:
        x, y = test.get(torch.tensor([i]))
        out.append((str(i), model, x, int(y), eps))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/distillation_mnist/cc-ibp")
    ap.add_argument("--digits", default=None, help="train/load digits MLP + cnn-small here and use their hard radii")
    ap.add_argument("--per-model", type=int, default=12, help="--digits: hard properties per model")
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--timeout", type=float, default=30.0)
    ap.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated subset of {list(SETTINGS)}")
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    names = args.settings.split(",")
    if BASE not in names:
        names.insert(0, BASE)
    props = (_digits_properties(Path(args.digits), args.per_model) if args.digits
             else _run_properties(args.run, args.eps, args.data_dir))

    results = {}
    for name in names:
        per_point = []
        for pid, model, x, y, eps in props:
            lo, hi = linf_box(x, eps)
            t0 = time.perf_counter()
            r = bab_verify(model, x[0], y, lo[0], hi[0], timeout=args.timeout, **SETTINGS[name])
            per_point.append({"point": pid, "eps": eps, "status": r.status, "domains": r.domains,
                              "time_s": round(time.perf_counter() - t0, 3), "note": r.note})
            print(f"{name:18s} {pid:8s} eps={eps:.4f}: {r.status:9s} {r.domains:6d} domains "
                  f"{per_point[-1]['time_s']:7.2f}s", flush=True)
        counts = {s: sum(p["status"] == s for p in per_point) for s in ("verified", "falsified", "timeout")}
        results[name] = {"counts": counts, "domains": sum(p["domains"] for p in per_point),
                         "time_s": round(sum(p["time_s"] for p in per_point), 2), "points": per_point}

    both = [i for i in range(len(props)) if all(results[n]["points"][i]["status"] != "timeout" for n in names)]
    branched = [i for i in both if results[BASE]["points"][i]["domains"] > 2]
    src = f"digits models in {args.digits}" if args.digits else f"run {args.run}, eps={args.eps:g}"
    lines = [f"{src}: {len(props)} hard properties, timeout {args.timeout:g}s each; "
             f"'decided by all' = the {len(branched)} properties every setting decided and "
             f"`{BASE}` had to branch on (more than the root's 2 bounding passes)", "",
             "| setting | verified | falsified | timeout | sub-domains | time (s) | decided by all: sub-domains | "
             "decided by all: time (s) | time / before |", "|---|---|---|---|---|---|---|---|---|"]
    base_t = sum(results[BASE]["points"][i]["time_s"] for i in branched)
    for name in names:
        r = results[name]
        c = r["counts"]
        d_all = sum(r["points"][i]["domains"] for i in branched)
        t_all = sum(r["points"][i]["time_s"] for i in branched)
        r["decided_by_all"] = {"domains": d_all, "time_s": round(t_all, 2)}
        lines.append(f"| {name} | {c['verified']} | {c['falsified']} | {c['timeout']} | {r['domains']} | "
                     f"{r['time_s']} | {d_all} | {t_all:.2f} | {t_all / max(base_t, 1e-9):.2f} |")
    text = "\n".join(lines)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    stem = "bench_bab_digits" if args.digits else "bench_bab"
    atomic_write_json(RESULTS / f"{stem}.json", {"source": src, "timeout": args.timeout,
                                                   "points": [p[0] for p in props], "settings": results})
    atomic_write_text(RESULTS / f"{stem}.md", text + "\n")


if __name__ == "__main__":
    main()
