"""Does CC-Dist help? PGD-AT teacher, CC-IBP student and CC-Dist students on MNIST ε=0.1.

Trains (CPU, same seed, epochs and α for both students):
  * a PGD-AT teacher (cnn-small, 10-step PGD at ε),
  * a CC-IBP student (preset mnist-0.1-cpu),
  * one CC-Dist student per β in --betas,
then evaluates every model on the full MNIST test set (clean, PGD-40, IBP-verified) and
prints one table, also written to benchmarks/results/distillation_mnist.{md,json}.
Runs are resumable: a finished run is not retrained.

    python benchmarks/distillation_mnist.py --data-dir ../shared/data/mnist
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from certkd import resolve_config, train
from certkd.checkpoints import atomic_write_json, atomic_write_text, latest_checkpoint, read_meta
from certkd.evaluation import evaluate_run
from certkd.reporting import accuracy_table

RESULTS = Path(__file__).resolve().parent / "results"


def finished(run: Path, epochs: int) -> bool:
    ck = latest_checkpoint(run)
    return ck is not None and int(read_meta(ck)["epoch"]) >= epochs


def train_once(cfg, run: Path) -> float:
    if finished(run, cfg.epochs):
        return 0.0
    start = time.perf_counter()
    resume = latest_checkpoint(run) is not None
    train(cfg, run, resume=resume, force=not resume, progress=False)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"))
    ap.add_argument("--out", default="runs/distillation_mnist")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--teacher-epochs", type=int, default=5)
    ap.add_argument("--teacher-steps", type=int, default=5, help="PGD steps of the teacher's training attack")
    ap.add_argument("--betas", default="0.01,0.1,1.0")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=None, help="evaluate on the first N test points (default all)")
    ap.add_argument("--only", choices=["teacher", "cc-ibp", "cc-dist"], default=None,
                    help="train just this part (for running parts in parallel processes) and skip evaluation")
    args = ap.parse_args()

    root = Path(args.out)
    ramp = max(1, args.epochs // 2)  # the preset's shape: ramp over the first half, decay near the end
    common = {"data_dir": args.data_dir, "epochs": args.epochs, "seed": args.seed, "eps_length": ramp,
              "lr_milestones": [int(args.epochs * 0.75), int(args.epochs * 0.9)], "test_interval": args.epochs}
    runs = {}
    timings = {}
    t_cfg = resolve_config("mnist-0.1-cpu", dict(common, method="pgd-at", epochs=args.teacher_epochs,
                                                 attack_steps=args.teacher_steps, attack_step_size=2.5 / args.teacher_steps,
                                                 lr_milestones=[], test_interval=args.teacher_epochs), teacher=True)
    if args.only in (None, "teacher"):
        timings["teacher (pgd-at)"] = train_once(t_cfg, root / "teacher")
    runs["teacher (pgd-at)"] = root / "teacher"
    if args.only in (None, "cc-ibp"):
        timings["cc-ibp"] = train_once(resolve_config("mnist-0.1-cpu", dict(common, method="cc-ibp")), root / "cc-ibp")
    runs["cc-ibp"] = root / "cc-ibp"
    for beta in [float(b) for b in args.betas.split(",") if b]:
        name = f"cc-dist β={beta:g}"
        cfg = resolve_config("mnist-0.1-cpu", dict(common, method="cc-dist", beta=beta, teacher=str(root / "teacher")))
        if args.only in (None, "cc-dist"):
            timings[name] = train_once(cfg, root / f"cc-dist-beta{beta:g}")
        runs[name] = root / f"cc-dist-beta{beta:g}"

    if args.only is not None:
        return
    results = {}
    for name, run in runs.items():
        results[name] = evaluate_run(run, limit=args.limit, data_dir=args.data_dir)
        print(f"{name}: {json.dumps(results[name])}", flush=True)
    n = next(iter(results.values()))["n"]
    table = accuracy_table(results)
    header = (f"MNIST ε=0.1, cnn-small, students {args.epochs} epochs, PGD-AT teacher {args.teacher_epochs} epochs "
              f"({args.teacher_steps}-step PGD), seed {args.seed}, CC-IBP/CC-Dist α=0.1, "
              f"n={n} test points (PGD: 40 steps, relative step 0.1; IBP-verified)\n")
    print("\n" + header + table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_text(RESULTS / "distillation_mnist.md", header + "\n" + table + "\n")
    atomic_write_json(RESULTS / "distillation_mnist.json",
                      {"settings": vars(args), "results": results, "train_seconds": timings})


if __name__ == "__main__":
    main()
