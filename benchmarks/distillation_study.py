"""Does CC-Dist beat a CC-IBP tuned as carefully, and does the teacher matter? (issue #21)

The protocol, the run counts, the Holm family, the TOST margin and the claims each outcome supports
are in docs/distillation_study/plan.md; the design as data in benchmarks/study/design.py. In short,
per setting: independent teachers (seed k per type), every arm's strength tuned on a validation split
held out from all training (tuning seeds, one rule: highest mean validation verified accuracy), the
selected configs trained on the report seeds and verified once on the test points, every result
recording its commit, config hash and weights hash. Resumable: rerun the same command after a stop.

    python benchmarks/distillation_study.py --plan --settings digits           # list the runs, train nothing
    python benchmarks/distillation_study.py --settings digits --jobs 2         # run (resumes), then report
    python benchmarks/distillation_study.py --report-only --settings digits,mnist,mnist-4x,cifar-smoke
    python benchmarks/distillation_study.py --check digits 0 cc-dist-pgd       # bit-exact rerun: exit 0/1
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the study package: benchmarks/study/

from study.design import ARM_BY_NAME, SETTINGS, Setting  # noqa: E402
from study.planner import StudyError  # noqa: E402


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


def data_dir(setting: Setting, args) -> Optional[str]:
    return {"none": None, "mnist": args.mnist_dir}.get(setting.data) if setting.data != "cifar" else \
        _cifar_dir(Path(args.cifar_cache))


def collect(root: Path, settings: List[Setting], args, log) -> Dict[str, Any]:
    """Every setting's final results, teachers, CKA, selection and pilot, for the report."""
    from study.execute import teacher_features
    from study.orchestrate import read_selection, runnable_arms
    from study.planner import teacher_dir, teacher_types
    from study.report import analyse, baseline_first, cka_matrix, load_json, settings_table

    out: Dict[str, Any] = {}
    for st in settings:
        arms = runnable_arms(st, args.trades, log)
        names = baseline_first([a.name for a in arms])
        table = settings_table(root, st, names)
        teachers, paths = {}, []
        for t in teacher_types(st, arms):
            for s in st.report_seeds():
                p = teacher_dir(root, st, t, s)
                ev = load_json(p / "teacher_eval.json")
                if ev is not None:
                    teachers[f"{t}-s{s}"] = ev
                    paths.append(p)
        cka = None
        if len(paths) > 1:
            feats = teacher_features(paths, st, 256, data_dir(st, args))
            cka = {"teachers": list(teachers), "matrix": cka_matrix(feats), "points": int(feats[0].shape[0])}
        pilot = load_json(root / st.name / "pilot.json")
        out[st.name] = {
            "arms": table, "analysis": analyse(table), "teachers": teachers, "cka": cka, "smoke": st.smoke,
            "note": st.note, "selection": read_selection(root, st), "pilot": pilot,
            "timeout_s": None if pilot is None else pilot["chosen_s"],
            "pilot_line": "none" if pilot is None else f"{pilot['points']} points, timed-out fraction at each time "
                                                       f"{_fractions(pilot)}{'' if pilot['met'] else ' — no time met < 5%'}",
            "unavailable": [f"{a}: option missing in this certkd" for a in st.arms
                            if a not in [x.name for x in arms] and not ARM_BY_NAME[a].optional]}
    return out


def _fractions(pilot: Dict[str, Any]) -> str:
    """The pilot's timed-out fraction per candidate time, in time order: "1 s: 4.0%, 2 s: 1.0%"."""
    return ", ".join(f"{k} s: {100 * v:.1f}%" for k, v in sorted(pilot["fractions"].items(), key=lambda kv: float(kv[0])))


def records_of(root: Path, settings: List[Setting]) -> List[Dict[str, Any]]:
    """study.json of every final run and teacher a report uses (and of the tuning runs behind the selection)."""
    from study.provenance import read_record

    recs = []
    for st in settings:
        for sub in ("final/*", "teachers/*", "tune/*/*"):
            recs += [read_record(p) for p in sorted((root / st.name).glob(sub)) if p.is_dir()]
    return recs


def check(args, log) -> int:
    """--check SETTING SEED ARM: rerun one run into a temporary folder; 0 if its weights are bit-identical."""
    from study.execute import reproduce
    from study.orchestrate import read_selection
    from study.planner import final_dir, student_config, teacher_config, teacher_dir, tune_dir

    name, seed, arm = args.check[0], int(args.check[1]), args.check[2]
    st, root = SETTINGS[name], Path(args.out)
    d = data_dir(st, args)
    sel = read_selection(root, st) or {}
    if arm.startswith("teacher:"):
        kind = arm.split(":", 1)[1]
        path, cfg = teacher_dir(root, st, kind, seed), teacher_config(st, kind, seed, d)
    elif "@" in arm:
        a, v = arm.split("@", 1)
        if a not in ARM_BY_NAME:
            raise StudyError(f"unknown arm '{a}'; arms: {', '.join(ARM_BY_NAME)}")
        path, cfg = tune_dir(root, st, a, float(v), seed), student_config(st, a, float(v), seed, root, sel.get("alpha"), d)
    else:
        if arm not in ARM_BY_NAME:
            raise StudyError(f"unknown arm '{arm}'; arms: {', '.join(ARM_BY_NAME)}, ARM@VALUE, teacher:TYPE")
        if arm not in sel.get("arms", {}):
            raise StudyError(f"{name} has no selection for {arm} yet; check a tuning run with {arm}@VALUE")
        path = final_dir(root, st, arm, seed)
        cfg = student_config(st, arm, sel["arms"][arm], seed, root, sel["alpha"], d)
    with tempfile.TemporaryDirectory(prefix="certkd-check-") as tmp:
        res = reproduce(path, cfg, Path(tmp) / "run")
    same = "yes" if res["reproduces"] else "NO"
    cfg_same = res["stored_config_sha256"] in (None, res["config_sha256"])
    log(f"check {name} seed {seed} {arm}: reproduces bit-exactly: {same} (weights {res['weights_sha256'][:16]} vs "
        f"rerun {str(res['rerun_weights_sha256'])[:16]}; config hash {'equal' if cfg_same else 'DIFFERENT'})")
    print(json.dumps(res, indent=1))
    return 0 if res["reproduces"] else 1


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", default="digits", help=f"comma-separated: {', '.join(SETTINGS)}")
    ap.add_argument("--jobs", type=int, default=2, help="parallel processes, one torch thread each")
    ap.add_argument("--out", default="runs/distillation_study_21")
    ap.add_argument("--report", default=str(ROOT / "docs" / "distillation_study"))
    ap.add_argument("--mnist-dir", default=str(SHARED / "mnist"))
    ap.add_argument("--cifar-cache", default=str(Path.home() / ".cache" / "certkd" / "cifar10-jpeg75"))
    ap.add_argument("--seeds", type=int, default=None, help="report seeds per setting (default: the setting's)")
    ap.add_argument("--trades", action="store_true", help="add TRADES teachers and the cc-dist-trades arm")
    ap.add_argument("--plan", action="store_true", help="list the planned runs and exit")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--check", nargs=3, metavar=("SETTING", "SEED", "ARM"),
                    help="rerun one run (ARM, ARM@VALUE for a tuning run, teacher:TYPE) and compare weights")
    ap.add_argument("--allow-mixed", action="store_true", help="report results of several commits (said in the report)")
    ap.add_argument("--allow-dirty", action="store_true", help="run from a tree with uncommitted changes (trials)")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    log = lambda s: print(s, flush=True)  # noqa: E731
    try:
        return _main(args, log)
    except StudyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _main(args, log) -> int:
    from study.orchestrate import describe_plan, run_setting, runnable_arms
    from study.provenance import check_one_commit, git_state, require_clean_for_claims
    from study.report import dump, report_lines

    names = [s for s in args.settings.split(",") if s]
    bad = [s for s in names if s not in SETTINGS]
    if bad:
        raise StudyError(f"unknown setting(s) {', '.join(bad)}; choose from {', '.join(SETTINGS)}")
    if args.seeds is not None:  # SETTINGS is read by the worker processes too (fork)
        for s in names:
            SETTINGS[s] = Setting(**{**SETTINGS[s].__dict__, "seeds": args.seeds})
    settings = [SETTINGS[s] for s in names]
    if args.check:
        if args.check[0] not in SETTINGS:
            raise StudyError(f"unknown setting {args.check[0]}; choose from {', '.join(SETTINGS)}")
        return check(args, log)
    if args.plan:
        for st in settings:
            for line in describe_plan(st, runnable_arms(st, args.trades, log)):
                log(line)
        return 0
    root = Path(args.out)
    if not args.report_only:
        require_clean_for_claims(git_state(), args.allow_dirty)
        for st in settings:
            run_setting(root, st, data_dir(st, args), args.jobs, args.trades, log)
    commits = check_one_commit(records_of(root, settings), args.allow_mixed)
    results = collect(root, settings, args, log)
    command = "python benchmarks/distillation_study.py " + " ".join(
        shlex.quote(a) for a in sys.argv[1:] if a != "--report-only")
    out = Path(args.report)
    out.mkdir(parents=True, exist_ok=True)
    from certkd.checkpoints import atomic_write_text

    atomic_write_text(out / "report.md", "\n".join(report_lines(results, command, commits, len(commits) > 1,
                                                                git_state())) + "\n")
    dump(out / "results.json", {"commits": commits, "mixed": len(commits) > 1, "settings": results})
    log(f"report: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
