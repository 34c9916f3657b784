"""A small tuned comparison of certified-training methods on digits (issue #23).

IBP, CROWN-IBP, SABR, TAPS, STAPS, CC-IBP, MTL-IBP and CC-Dist on digits-small, each tuning its own key on
a 3-value grid (benchmarks/comparison/design.py) with one tuning seed, selected by complete-verified
accuracy on 287 validation points held out from all training (the #21 study's split); CC-Dist tunes β at
CC-IBP's selected α and distils a PGD-AT teacher of its own seed. The selection is frozen in
selection.json, then each method's selected config trains on 3 report seeds and is verified once on the
360 test points: clean, PGD-40 (certkd evaluate), PGD of the verifier, IBP-verified and complete-verified
accuracy, with the per-point timeouts counted. Every run records its commit, config hash and weights
hash. Resumable: rerun the same command after a stop.

    python benchmarks/method_comparison.py --plan                 # list the runs and their estimated cost
    python benchmarks/method_comparison.py --jobs 1 --out runs/method_comparison   # run (resumes), report
    python benchmarks/method_comparison.py --smoke --out /tmp/cmp  # the machinery in tiny settings
    python benchmarks/method_comparison.py --report-only --out runs/method_comparison
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import List, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/comparison and benchmarks/study

from comparison.design import DIGITS, METHOD_BY_NAME, METHODS, SMOKE, TIMEOUT_S, with_seeds  # noqa: E402
from study.planner import StudyError  # noqa: E402


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/method_comparison", help="folder of the runs (resumable)")
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results"),
                    help="folder of method_comparison_<setting>.{json,md}")
    ap.add_argument("--methods", default=",".join(m.name for m in METHODS), help="comma-separated subset")
    ap.add_argument("--jobs", type=int, default=1, help="parallel processes, one torch thread each")
    ap.add_argument("--seeds", type=int, default=None, help="report seeds (default 3; smoke 2)")
    ap.add_argument("--timeout", type=float, default=None,
                    help=f"per-point verification seconds (default {TIMEOUT_S:g})")
    ap.add_argument("--smoke", action="store_true", help="tiny epochs and points: the machinery, no claim")
    ap.add_argument("--plan", action="store_true", help="list the runs and their estimated cost, run nothing")
    ap.add_argument("--report-only", action="store_true", help="write the results of the runs found")
    ap.add_argument("--allow-dirty", action="store_true", help="run from a tree with uncommitted changes (trials)")
    ap.add_argument("--allow-mixed", action="store_true", help="report results of several commits (said in it)")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    log = lambda s: print(s, flush=True)  # noqa: E731
    try:
        return _main(args, log)
    except StudyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _main(args, log) -> int:
    from dataclasses import replace

    names = [s for s in args.methods.split(",") if s]
    bad = [s for s in names if s not in METHOD_BY_NAME]
    if bad:
        raise StudyError(f"unknown method(s) {', '.join(bad)}; choose from {', '.join(METHOD_BY_NAME)}")
    methods = [METHOD_BY_NAME[n] for n in names]
    setting = with_seeds(SMOKE if args.smoke else DIGITS, args.seeds)
    if args.timeout is not None:
        if not args.timeout > 0:
            raise StudyError(f"--timeout must be > 0 seconds, got {args.timeout:g}")
        setting = replace(setting, timeout=args.timeout)
    if args.jobs < 1:
        raise StudyError(f"--jobs must be >= 1, got {args.jobs}")
    if args.plan:
        from comparison.plan import describe

        for line in describe(setting, methods):
            log(line)
        return 0
    from certkd.checkpoints import atomic_write_text
    from comparison.execute import collect, records, run_comparison
    from comparison.report import markdown, summarise
    from study.orchestrate import read_selection
    from study.provenance import check_one_commit, git_state, require_clean_for_claims
    from study.report import dump

    root = Path(args.out)
    if not args.report_only:
        require_clean_for_claims(git_state(), args.allow_dirty)
        run_comparison(root, setting, methods, None, args.jobs, log)
    commits = check_one_commit(records(root, setting), args.allow_mixed)
    table = collect(root, setting, methods)
    summary = summarise(table)
    selection = read_selection(root, setting)
    state = git_state()
    command = "python benchmarks/method_comparison.py " + " ".join(
        shlex.quote(a) for a in sys.argv[1:] if a != "--report-only")
    header = [f"# Tuned comparison of certified-training methods on {setting.name} (issue #23)"
              + (" — SMOKE RUN, no claim rests on it" if setting.smoke else ""), "",
              f"Command: `{command}`. {setting.note}. Preset {setting.preset}, ε = 0.05; train on "
              f"{setting.train_limit} points, select on {setting.n_val} held-out validation points by "
              f"complete-verified accuracy, report on the test points; per-point verification time "
              f"{setting.timeout:g} s (a timeout counts as not verified).", "",
              "Results made under commit(s): " + (", ".join(f"`{k}` ({n} stage events)" for k, n in commits.items())
                                                  or "none yet")
              + f"; report written at `{state['commit']}`{' (dirty tree)' if state.get('dirty') else ''}."
              + (" **Mixed commits.**" if len(commits) > 1 else ""), "",
              "Accuracies in %: mean ± half-width of the 95% t-interval over the report seeds."]
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    stem = results / f"method_comparison_{setting.name}"
    atomic_write_text(stem.with_suffix(".md"), "\n".join(markdown(summary, selection, header)) + "\n")
    dump(stem.with_suffix(".json"), {"setting": setting.__dict__, "command": command, "commits": commits,
                                     "report_commit": state, "selection": selection, "summary": summary,
                                     "per_seed": table})
    log(f"results: {stem.with_suffix('.md')}, {stem.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
