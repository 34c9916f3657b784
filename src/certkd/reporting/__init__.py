"""Tables, reports and model cards.

* :mod:`~certkd.reporting.tables`: terminal tables (:func:`format_table` / :func:`accuracy_table`, for
  ``certkd evaluate`` and ``certkd demo``) and the report's Markdown tables and CSV files.
* :mod:`~certkd.reporting.records`: the run model (:class:`RunRecord`, :func:`load_run`, :func:`collect_runs`);
  :mod:`~certkd.reporting.groups`: grouping the seeds of one configuration and their statistics.
* :mod:`~certkd.reporting.commands`: the exact ``certkd`` commands that reproduce a run.
* :mod:`~certkd.reporting.plots`: the Pareto plot and the training curves.
* :mod:`~certkd.reporting.report`: :func:`write_report` (``certkd report``): collect run directories, group
  seeds of the same configuration, and write ``report.md`` (one page: table, Pareto plot, exact commands),
  ``results.csv`` (one row per group, mean/std/count per metric), ``runs.csv`` (one row per run),
  ``pareto.png`` and ``curves/<run>.png``.
* :mod:`~certkd.reporting.card`: :func:`model_card` / :func:`write_card` (``certkd card``) and
  :func:`make_release`: a Markdown model card for one run and a self-contained release folder that
  :func:`certkd.load_model` reads.

Nothing here trains or evaluates: runs without ``evaluation.json`` are listed as missing with the
command that fills the gap. Every file is written atomically. Nothing here imports :mod:`certkd.cli`.
"""
from certkd.reporting.card import RELEASE_FILES, make_release, model_card, write_card
from certkd.reporting.commands import (_sweep_of, display_path, evaluate_command, reproduce_commands, train_command,
                                       verify_command)
from certkd.reporting.groups import Group, Stat, group_runs, mean_std
from certkd.reporting.plots import LOSS_COMPONENTS, _pyplot, pareto_front, plot_curves, plot_pareto
from certkd.reporting.records import (FAMILIES, GROUP_IGNORED_KEYS, REPORT_METRICS, RunRecord, collect_runs, is_run_dir, load_run,
                                      measured_on, method_family, result_notes)
from certkd.reporting.report import write_report
from certkd.reporting.tables import (ACCURACY_COLUMNS, accuracy_table, format_table, group_notes, measured_table,
                                     results_csv, results_rows, results_table, runs_csv)

__all__ = [
    "ACCURACY_COLUMNS", "FAMILIES", "GROUP_IGNORED_KEYS", "Group", "LOSS_COMPONENTS", "RELEASE_FILES",
    "REPORT_METRICS", "RunRecord", "Stat", "accuracy_table", "collect_runs", "display_path", "evaluate_command",
    "format_table", "group_notes", "group_runs", "is_run_dir", "load_run", "make_release", "mean_std",
    "measured_on", "measured_table", "method_family", "model_card", "pareto_front", "plot_curves", "plot_pareto",
    "reproduce_commands", "result_notes", "results_csv", "results_rows", "results_table", "runs_csv", "train_command",
    "verify_command", "write_card", "write_report",
]
