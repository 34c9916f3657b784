"""Does the teacher's knowledge help? A controlled, resumable CC-Dist study (issue #11).

For each setting (digits; MNIST ε=0.1 on a training subset; CIFAR-10 2/255 from the JPEG copy on
a subset) and each budget (the setting's schedule, and a short one of about a quarter of the
epochs, where the certified student underfits), it trains, per seed:

* ``cc-ibp``                    the certified baseline;
* ``cc-dist-b{β}``              CC-Dist from a PGD-AT teacher, β in --betas (sum reduction);
* ``zero-b{β}``                 the same loss distilling towards 0, no teacher (at the best β and
                                at the β below it: a strong zero target can collapse the features);
* ``std-teacher-b{β}``          CC-Dist from a standard-trained (non-robust) teacher, best β;

then runs the complete verifier (``verify_run``: clean, PGD with restarts, IBP, CROWN, α-CROWN,
branch and bound with a per-point timeout) on every digits test point and on --verify-limit
class-stratified points elsewhere. "Best β" is the CC-Dist β with the highest mean verified
accuracy at the setting's full budget (at the short one when only that was run).

Statistics: differences paired by seed (same seed = same initialisation and batch order), mean
and a 95% t-interval, for CC-Dist vs CC-IBP, teacher vs target 0, and robust vs standard teacher.
Outputs: ``docs/distillation_study/report.md``, ``results.json`` and ``pareto.png``.

Every step is resumable: finished runs and complete verifications are skipped, so the command can
be stopped and rerun. Independent runs go to --jobs processes with one torch thread each::

    python benchmarks/distillation_study.py --settings digits --jobs 2
    python benchmarks/distillation_study.py --settings digits,mnist,cifar --jobs 2   # ~hours on 2 cores
    python benchmarks/distillation_study.py --report-only
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


@dataclass(frozen=True)
class Setting:
    name: str
    preset: str                 # the CC-IBP preset of the setting (a BatchNorm CNN7 student)
    seeds: int
    short_epochs: int
    overrides: Tuple[Tuple[str, Any], ...] = ()
    verify_all: bool = False    # verify every test point (digits) instead of --verify-limit
    timeout: float = 5.0        # complete-verifier budget per point (s)
    betas: Tuple[float, ...] = (0.001, 0.01, 0.1, 1.0)  # CC-Dist β grid (sum reduction), unless --betas
    teacher_overrides: Tuple[Tuple[str, Any], ...] = ()  # the teachers' schedule, when not the student's
    # The β of the controls, fixed in advance (None: the best β of phase 1). Fixing it lets every seed run
    # all its arms in one pass, so a study stopped early still has whole seeds with their controls.
    control_beta: Optional[float] = None


SETTINGS = {
    "digits": Setting("digits", "digits-cnn7w16-ccibp", seeds=8, short_epochs=10, verify_all=True, timeout=5.0),
    # MNIST and CIFAR fit 2 cores with two β (the ends of the 1e-3..1 range) and the controls at β = 1, the best
    # β on digits. Their short budget (2 epochs) leaves students near chance: on MNIST, 3 seeds, every arm
    # verified 12–17% (docs/distillation_study/report.md). eval_limit only cuts the end-of-training check: the study's
    # numbers come from the verifier on --verify-limit points.
    "mnist": Setting("mnist", "mnist-0.1-cnn7w16-ccibp", seeds=3, short_epochs=2, timeout=5.0,
                     overrides=(("eval_limit", 100),), betas=(0.001, 1.0), control_beta=1.0),
    # CIFAR: the students' training attack is cut from 8 PGD steps to the 1-step FGSM-to-vertex attack of the
    # MNIST/digits presets (2.5x cheaper per step on 1 thread); the teachers see 5k images for 8 epochs so
    # that they are well ahead of the 2k-image students, as in the paper's setting.
    "cifar": Setting("cifar", "cifar10-2_255-cnn7w32-ccibp", seeds=3, short_epochs=2, timeout=3.0,
                     overrides=(("dataset", "imagefolder"), ("attack_steps", 1), ("attack_step_size", 10.0),
                                ("eval_limit", 100)),
                     betas=(0.001, 1.0), control_beta=1.0,
                     teacher_overrides=(("train_limit", 5000), ("epochs", 8), ("lr_milestones", [7]))),
}


def _scaled(cfg_epochs: int, epochs: int, value: int) -> int:
    return max(1, round(value * epochs / cfg_epochs))


def run_config(setting: Setting, data_dir: Optional[str], budget: str, arm: str, seed: int, root: Path):
    """The TrainConfig of one run (teachers: arm 'teacher-pgd-at' / 'teacher-standard')."""
    from certkd import resolve_config

    base = resolve_config(setting.preset, dict(setting.overrides))
    over: Dict[str, Any] = dict(setting.overrides, seed=seed, test_interval=10 ** 6)
    if data_dir:
        over["data_dir"] = data_dir
    if budget == "short":
        e = setting.short_epochs
        over.update(epochs=e, eps_start=min(base.eps_start, e), eps_length=_scaled(base.epochs, e, base.eps_length),
                    lr_milestones=[m for m in (_scaled(base.epochs, e, m) for m in base.lr_milestones) if m <= e])
    if arm.startswith("teacher-"):  # one teacher per setting, at the setting's full schedule
        teacher = dict(setting.overrides, method=arm.split("-", 1)[1], seed=0, test_interval=10 ** 6)
        teacher = {k: v for k, v in teacher.items() if not k.startswith("attack_")}  # the teacher's own attack
        teacher.update(setting.teacher_overrides)
        if data_dir:
            teacher["data_dir"] = data_dir
        return resolve_config(setting.preset, teacher, teacher=True)
    if arm == "cc-ibp":
        return resolve_config(setting.preset, over)
    kind, beta = arm.rsplit("-b", 1)
    over.update(method="cc-dist", beta=float(beta), dist_reduction="sum")
    if kind == "zero":
        over["dist_target"] = "zero"
    else:
        teacher = "teacher-standard" if kind == "std-teacher" else "teacher-pgd-at"
        over["teacher"] = str(root / setting.name / teacher)
    return resolve_config(setting.preset, over)


def run_dir(root: Path, setting: Setting, budget: str, arm: str, seed: int) -> Path:
    if arm.startswith("teacher-"):
        return root / setting.name / arm
    return root / setting.name / budget / f"{arm}-s{seed}"


def seeds_on_disk(root: Path, setting: Setting) -> range:
    """Seeds 0..k-1, k the larger of the setting's count and the highest seed any run folder has (a study
    extended with --seeds is reported whole by a later --report-only without --seeds)."""
    found = [int(p.name.rsplit("-s", 1)[1]) for p in (root / setting.name).glob("*/*-s*")
             if p.name.rsplit("-s", 1)[1].isdigit()]
    return range(max([setting.seeds] + [n + 1 for n in found]))


# ----------------------------------------------------------------------------------- one job

def _job(kind: str, setting_name: str, data_dir: Optional[str], budget: str, arm: str, seed: int, root: str,
         verify_limit: Optional[int]) -> Tuple[str, float]:
    """Train or verify one run in a worker process (one torch thread); returns (path, seconds)."""
    import torch

    torch.set_num_threads(1)
    from certkd import train
    from certkd.checkpoints import latest_checkpoint, read_meta
    from certkd.verification.pipeline import VerifyConfig, verify_run

    setting, rootp = SETTINGS[setting_name], Path(root)
    path = run_dir(rootp, setting, budget, arm, seed)
    start = time.perf_counter()
    if kind in ("train", "both"):
        cfg = run_config(setting, data_dir, budget, arm, seed, rootp)
        ck = latest_checkpoint(path) if path.exists() else None
        if ck is None or int(read_meta(ck)["epoch"]) < cfg.epochs:
            train(cfg, path, resume=ck is not None, force=ck is None and path.exists(), progress=False,
                  log=lambda s: None)
    if kind in ("verify", "both"):
        summary = path / "verification.json"
        done = summary.exists() and json.loads(summary.read_text()).get("complete")
        if not done:
            eps = read_meta(latest_checkpoint(path))["config"]["eps"]
            vcfg = VerifyConfig(eps=eps, timeout=setting.timeout, attack_restarts=5)
            # rows without a summary (a stop before the first one was written) certify nothing: start over
            verify_run(path, vcfg, limit=None if setting.verify_all else verify_limit, resume=summary.exists(),
                       force=not summary.exists(), data_dir=data_dir, progress=False)
    return str(path), time.perf_counter() - start


def _run_all(jobs: List[tuple], workers: int, log) -> None:
    if not jobs:
        return
    if workers <= 1:
        for j in jobs:
            log(f"  {j[0]} {_job(*j)[0]}")
        return
    with ProcessPoolExecutor(workers) as pool:
        for path, secs in pool.map(_job_star, jobs):
            log(f"  done {path} ({secs:.0f} s)")


def _job_star(args: tuple) -> Tuple[str, float]:
    return _job(*args)


# ----------------------------------------------------------------------------------- results

def _metrics(path: Path) -> Optional[Dict[str, float]]:
    """Accuracies of one run: verification.json if complete, else IBP from evaluation during training."""
    summary = path / "verification.json"
    if summary.exists():
        s = json.loads(summary.read_text())
        if s.get("complete"):
            return {k: s[k] for k in ("clean_accuracy", "pgd_accuracy", "ibp_verified_accuracy",
                                      "verified_accuracy", "empirical_robust_accuracy")} | {"n": s["n"]}
    return None


def t_interval(diffs: List[float]) -> Tuple[float, float, float]:
    """Mean and 95% t-interval half-width of paired differences (NaN width for fewer than 2)."""
    from scipy import stats

    m = statistics.fmean(diffs)
    if len(diffs) < 2:
        return m, float("nan"), float("nan")
    half = stats.t.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return m, m - half, m + half


def best_beta(root: Path, setting: Setting, betas: List[float], key: str = "verified_accuracy") -> Optional[float]:
    for budget in ("full", "short"):  # the full budget decides; the short one only when it is all there is
        scores = {}
        for b in betas:
            vals = [m[key] for s in seeds_on_disk(root, setting)
                    if (m := _metrics(run_dir(root, setting, budget, f"cc-dist-b{b:g}", s))) is not None]
            if vals:
                scores[b] = statistics.fmean(vals)
        if scores:
            return max(scores, key=scores.get)
    return None


def arms_for(root: Path, setting: Setting, betas: List[float]) -> List[str]:
    arms = ["cc-ibp"] + [f"cc-dist-b{b:g}" for b in betas]
    b = setting.control_beta if setting.control_beta is not None else best_beta(root, setting, betas)
    if b is not None:
        below = max([x for x in betas if x < b], default=None)
        arms += [f"zero-b{b:g}", f"std-teacher-b{b:g}"] + ([f"zero-b{below:g}"] if below is not None else [])
    return arms


def collect(root: Path, settings: List[Setting]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for st in settings:
        betas = list(st.betas)
        for budget in ("full", "short"):
            table = {}
            for arm in arms_for(root, st, betas):
                per_seed = {s: _metrics(run_dir(root, st, budget, arm, s)) for s in seeds_on_disk(root, st)}
                table[arm] = {s: m for s, m in per_seed.items() if m is not None}
            out[f"{st.name}/{budget}"] = {"arms": table, "best_beta": best_beta(root, st, betas),
                                          "control_beta": st.control_beta, "teachers": _teachers(root, st),
                                          "timeout_s": st.timeout}
    return out


def _teachers(root: Path, setting: Setting) -> Dict[str, Dict[str, Any]]:
    """The teachers' end-of-training test metrics (clean, PGD-40; their eval_limit points)."""
    out = {}
    for t in ("teacher-pgd-at", "teacher-standard"):
        path = run_dir(root, setting, "full", t, 0) / "metrics.jsonl"
        if path.exists():
            tests = [json.loads(line).get("test") for line in path.read_text().splitlines() if line.strip()]
            tests = [x for x in tests if x]
            if tests:
                out[t] = tests[-1]
    return out


def _paired(table: Dict[str, Dict[int, Dict[str, float]]], a: str, b: str, key: str) -> Optional[str]:
    if a not in table or b not in table:
        return None
    seeds = sorted(set(table[a]) & set(table[b]))
    if not seeds:
        return None
    diffs = [100 * (table[a][s][key] - table[b][s][key]) for s in seeds]
    m, lo, hi = t_interval(diffs)
    pos = sum(d > 0 for d in diffs)
    ci = f"[{lo:+.2f}, {hi:+.2f}]" if len(diffs) > 1 else "[no interval: 1 seed]"
    return f"{m:+.2f} {ci} ({pos}/{len(diffs)} > 0)"


def report(results: Dict[str, Any], out: Path, command: str) -> None:
    from certkd.checkpoints import atomic_write_json, atomic_write_text

    keys = [("clean_accuracy", "clean"), ("pgd_accuracy", "PGD (5 restarts)"), ("ibp_verified_accuracy", "IBP"),
            ("verified_accuracy", "verified (complete)")]
    # preface.md beside the report (the commands that built the runs, the schedule, what was stopped) is kept
    # as written; without one, the command of this invocation stands in for it
    preface = out / "preface.md"
    md = ["# CC-Dist controlled study", "",
          preface.read_text().strip() if preface.exists() else f"Command: `{command}`", "",
          "Accuracies in % (mean ± sd over seeds) from `certkd verify` (complete verifier with the per-point time "
          "limit in each section's title, 5 PGD restarts); paired differences in points with 95% t-intervals; "
          "(k/n > 0): seeds where the difference is positive.", ""]
    for name, res in results.items():
        table = res["arms"]
        if not any(table.values()):
            continue
        fixed = (f"; controls at β = {res['control_beta']:g}, fixed in advance" if res.get("control_beta") is not None
                 else "; controls at that β")
        limit = f"{res['timeout_s']:g} s per point; " if res.get("timeout_s") else ""
        best = "none yet" if res["best_beta"] is None else f"{res['best_beta']:g}"
        md += [f"## {name} ({limit}best CC-Dist β by verified accuracy: {best}{fixed})", "",
               "| arm | seeds | n points | " + " | ".join(label for _, label in keys) + " |",
               "|---|---|---|" + "---|" * len(keys)]
        for arm, per_seed in table.items():
            if not per_seed:
                continue
            cells = []
            for k, _ in keys:
                vals = [100 * m[k] for m in per_seed.values()]
                sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
                cells.append(f"{statistics.fmean(vals):.1f} ± {sd:.1f}")
            n = {m["n"] for m in per_seed.values()}
            md.append(f"| {arm} | {len(per_seed)} | {'/'.join(map(str, sorted(n)))} | " + " | ".join(cells) + " |")
        teachers = res.get("teachers") or {}
        if teachers:
            md += ["", "Teachers (end of training, PGD-40 on their evaluation points): " + "; ".join(
                f"{t}: clean {100 * m['clean_accuracy']:.0f}%, PGD {100 * m['pgd_accuracy']:.0f}% (n = {m['n']})"
                for t, m in teachers.items())]
        b = res["control_beta"] if res.get("control_beta") is not None else res["best_beta"]
        comparisons = []
        for arm in table:
            if arm.startswith("cc-dist"):
                comparisons.append((f"{arm} − cc-ibp", arm, "cc-ibp"))
        if b is not None:
            comparisons.append((f"robust − standard teacher (β={b:g})", f"cc-dist-b{b:g}", f"std-teacher-b{b:g}"))
        for arm in table:  # every target-0 control against the teacher at its β, and against CC-IBP
            if arm.startswith("zero-b"):
                z = arm[len("zero-b"):]
                comparisons += [(f"teacher − target 0 (β={z})", f"cc-dist-b{z}", arm),
                                (f"target 0 − cc-ibp (β={z})", arm, "cc-ibp")]
        md += ["", "| paired difference | verified | IBP | clean |", "|---|---|---|---|"]
        for label, a, c in comparisons:
            cells = [_paired(table, a, c, k) or "–" for k in ("verified_accuracy", "ibp_verified_accuracy",
                                                              "clean_accuracy")]
            md.append(f"| {label} | " + " | ".join(cells) + " |")
        md.append("")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "report.md", "\n".join(md) + "\n")
    atomic_write_json(out / "results.json", results)
    _plot(results, out / "pareto.png")


def _plot(results: Dict[str, Any], path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    panels = [(k, v) for k, v in results.items() if any(v["arms"].values())]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (name, res) in zip(axes[0], panels):
        for arm, per_seed in res["arms"].items():
            if not per_seed:
                continue
            x = statistics.fmean(100 * m["clean_accuracy"] for m in per_seed.values())
            y = statistics.fmean(100 * m["verified_accuracy"] for m in per_seed.values())
            marker = "s" if arm == "cc-ibp" else ("x" if arm.startswith(("zero", "std")) else "o")
            ax.scatter([x], [y], marker=marker)
            ax.annotate(arm, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_title(name)
        ax.set_xlabel("clean accuracy (%)")
        ax.set_ylabel("verified accuracy (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------- main

def _cifar_dir(cache: Path) -> str:
    """Unpack ../shared/data/cifar10-jpeg75.tar.gz once into ``cache`` (outside the repository)."""
    marker = cache / ".unpacked"
    if not marker.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tarfile.open(SHARED / "cifar10-jpeg75.tar.gz") as tar:
            tar.extractall(cache, filter="data")
        marker.write_text("ok\n")
    inner = [p for p in cache.iterdir() if p.is_dir() and (p / "train").is_dir()]
    return str(inner[0] if inner else cache)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", default="digits", help="comma-separated: digits, mnist, cifar")
    ap.add_argument("--betas", default=None, help="CC-Dist β values (sum reduction); default: the setting's")
    ap.add_argument("--budgets", default="full,short")
    ap.add_argument("--jobs", type=int, default=2, help="parallel processes, one torch thread each")
    ap.add_argument("--verify-limit", type=int, default=500, help="points verified outside digits")
    ap.add_argument("--out", default="runs/distillation_study")
    ap.add_argument("--report", default=str(ROOT / "docs" / "distillation_study"))
    ap.add_argument("--mnist-dir", default=str(SHARED / "mnist"))
    ap.add_argument("--cifar-cache", default=str(Path.home() / ".cache" / "certkd" / "cifar10-jpeg75"))
    ap.add_argument("--seeds", type=int, default=None, help="seeds per setting (default: the setting's)")
    ap.add_argument("--from-seed", type=int, default=0,
                    help="train and verify seeds from this one on (two processes on disjoint seeds of one setting)")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    root = Path(args.out)
    settings = [SETTINGS[s] for s in args.settings.split(",") if s]
    changes: Dict[str, Any] = {}
    if args.seeds is not None:  # a smaller study (smoke tests); SETTINGS is read by the workers too
        changes["seeds"] = args.seeds
    if args.betas:
        changes["betas"] = tuple(float(b) for b in args.betas.split(",") if b)
    if changes:
        for st in settings:
            SETTINGS[st.name] = Setting(**{**st.__dict__, **changes})
        settings = [SETTINGS[st.name] for st in settings]
    budgets = [b for b in args.budgets.split(",") if b]
    log = lambda s: print(s, flush=True)  # noqa: E731
    if not args.report_only:
        for st in settings:
            betas = list(st.betas)
            data = None if st.name == "digits" else (args.mnist_dir if st.name == "mnist" else
                                                     _cifar_dir(Path(args.cifar_cache)))
            log(f"[{st.name}] teachers")
            _run_all([("train", st.name, data, "full", t, 0, str(root), args.verify_limit)
                      for t in ("teacher-pgd-at", "teacher-standard")], args.jobs, log)
            # phase 2: the controls at the best β found in phase 1; one pass when that β is fixed in advance
            for phase in ((1, 2) if st.control_beta is None else (2,)):
                arms = arms_for(root, st, betas) if phase == 2 else ["cc-ibp"] + [f"cc-dist-b{b:g}" for b in betas]
                # seed-major order, each run trained then verified: a stopped study leaves whole seeds
                jobs = [("both", st.name, data, budget, arm, seed, str(root), args.verify_limit)
                        for budget in budgets for seed in range(args.from_seed, st.seeds) for arm in arms]
                log(f"[{st.name}] phase {phase}: training and verifying {len(jobs)} runs")
                _run_all(jobs, args.jobs, log)
    command = "python benchmarks/distillation_study.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in (("settings", args.settings), ("betas", args.betas),
                                                     ("budgets", args.budgets), ("seeds", args.seeds),
                                                     ("verify_limit", args.verify_limit)) if v is not None)
    results = collect(root, settings)
    report(results, Path(args.report), command)
    log(f"report: {Path(args.report) / 'report.md'}")


if __name__ == "__main__":
    main()
