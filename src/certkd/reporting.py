"""Tables, reports and model cards.

* :func:`format_table` / :func:`accuracy_table`: terminal tables (``certkd evaluate``, ``certkd demo``).
* :func:`write_report` (``certkd report``): collect run directories, group seeds of the same
  configuration, and write ``report.md`` (one page: table, Pareto plot, exact commands),
  ``results.csv`` (one row per group, mean/std/count per metric), ``runs.csv`` (one row per run),
  ``pareto.png`` and ``curves/<run>.png``.
* :func:`model_card` / :func:`write_card` (``certkd card``) and :func:`make_release`: a Markdown
  model card for one run and a self-contained release folder that :func:`certkd.load_model` reads.

Nothing here trains or evaluates: runs without ``evaluation.json`` are listed as missing with the
command that fills the gap. Every file is written atomically.
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import io
import json
import math
import os
import re
import shlex
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import yaml

from certkd.checkpoints import atomic_write_bytes, atomic_write_text, latest_checkpoint, read_meta, read_tensors
from certkd.config import (CERTIFIED_METHODS, DISTILLATION_METHODS, EMPIRICAL_METHODS, TrainConfig,
                           apply_overrides, base_config, load_preset, rescale_schedule)
from certkd.errors import CertkdError
from certkd.runs import result_warnings, weights_sha256

ACCURACY_COLUMNS = (("clean_accuracy", "clean"), ("pgd_accuracy", "PGD"), ("ibp_verified_accuracy", "IBP-verified"))


def format_table(rows: Sequence[Mapping[str, object]], columns: Sequence[tuple], title_key: str = "name") -> str:
    """Markdown table: one row per run, accuracies as percentages with one decimal."""
    header = ["run"] + [label for _, label in columns]
    lines: List[List[str]] = []
    for row in rows:
        cells = [str(row.get(title_key, ""))]
        for key, _ in columns:
            val = row.get(key)
            cells.append(f"{100 * float(val):.1f}%" if isinstance(val, (int, float)) else "–")
        lines.append(cells)
    return _markdown_table(header, lines)


def accuracy_table(results: Dict[str, Mapping[str, object]], verified: bool = False) -> str:
    """Table of clean / PGD / IBP-verified (and with ``verified`` complete-verifier) accuracy per run,
    with the number of test points ``n`` behind them (``verified_n`` for the complete verifier) and a
    ``notes`` column, when any run needs one, for unfinished or collapsed models and short ε ramps."""
    rows = [dict(r, name=name) for name, r in results.items()]
    table = format_table(rows, ACCURACY_COLUMNS + ((("verified_accuracy", "verified"),) if verified else ()))
    lines = table.splitlines()
    extra_header = ["n"] + (["verified n"] if verified else [])
    cells = [[_n_text(r.get("n"))] + ([_n_text(r.get("verified_n"))] if verified else []) for r in rows]
    notes = [result_notes(r) for r in rows]
    if any(notes):
        extra_header.append("notes")
        cells = [c + [n] for c, n in zip(cells, notes)]
    header = [c.strip() for c in lines[0].split("|")[1:-1]] + extra_header
    body = [[c.strip() for c in line.split("|")[1:-1]] + extra for line, extra in zip(lines[2:], cells)]
    return _markdown_table(header, body)


def _n_text(n: Any) -> str:
    return str(n) if isinstance(n, int) and not isinstance(n, bool) else "–"


def result_notes(result: Mapping[str, Any]) -> str:
    """Short marks for a table cell: unfinished training, collapsed predictions, ε beyond training."""
    notes = []
    prog = result.get("training") or {}
    if prog.get("finished") is False:
        notes.append(f"unfinished (epoch {prog.get('epoch')}/{prog.get('epochs')})")
    if (result.get("predictions") or {}).get("collapsed"):
        notes.append("collapsed")
    final, eps = prog.get("final_training_eps"), result.get("eps")
    if isinstance(final, (int, float)) and isinstance(eps, (int, float)) and final < float(eps) * (1 - 1e-3):
        notes.append(f"trained to ε={final:.3g} only")
    return "; ".join(notes)


def _markdown_table(header: Sequence[str], lines: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in lines)) if lines else len(h) for i, h in enumerate(header)]
    fmt = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    out = [fmt(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [fmt(r) for r in lines]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# Reading runs
# --------------------------------------------------------------------------------------------

#: (key, label) of the report table, in column order.
REPORT_METRICS = (("clean_accuracy", "clean"), ("pgd_accuracy", "PGD"), ("ibp_verified_accuracy", "IBP"),
                  ("crown_verified_accuracy", "CROWN"), ("verified_accuracy", "verified"))
#: Config keys that do not define a configuration: runs differing only in these are seeds of one group.
GROUP_IGNORED_KEYS = ("seed", "device", "data_dir")
#: Families of methods, in report order: (family id, legend label).
FAMILIES = (("teacher", "teachers (standard / PGD-AT / TRADES)"), ("certified", "CC-IBP family (certified training)"),
            ("distillation", "CC-Dist family (distillation)"), ("other", "other"))
_PRETTY_KEYS = {"beta": "β", "alpha": "α", "eps": "ε", "trades_beta": "β_TRADES", "kd_temperature": "T"}


def method_family(method: str) -> str:
    if method in EMPIRICAL_METHODS:
        return "teacher"
    if method in CERTIFIED_METHODS:
        return "certified"
    if method in DISTILLATION_METHODS:
        return "distillation"
    return "other"


def _read_json(path: Path, warnings: List[str], hint: str) -> Optional[Dict[str, Any]]:
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        warnings.append(f"{path.name} is unreadable ({e}); {hint}")
        return None
    if not isinstance(data, dict):
        warnings.append(f"{path.name} is not a JSON object; {hint}")
        return None
    return data


@dataclass
class RunRecord:
    """Everything a report needs from one run directory (read-only)."""

    path: Path
    name: str
    config: TrainConfig
    evaluation: Optional[Dict[str, Any]] = None
    verification: Optional[Dict[str, Any]] = None     # only a complete verification.json
    metrics: List[Dict[str, Any]] = field(default_factory=list)
    checkpoint: Optional[Path] = None
    meta: Optional[Dict[str, Any]] = None
    preset: Optional[str] = None
    weights_sha256: Optional[str] = None              # of the latest checkpoint's model.safetensors
    warnings: List[str] = field(default_factory=list)  # one line each; "not evaluated" is ``needs_evaluation``

    @property
    def needs_evaluation(self) -> bool:
        return self.evaluation is None and self.verification is None

    @property
    def method(self) -> str:
        return self.config.method

    @property
    def family(self) -> str:
        return method_family(self.config.method)

    @property
    def epoch(self) -> Optional[int]:
        return None if self.meta is None else int(self.meta.get("epoch", 0))

    def value(self, key: str) -> Optional[float]:
        """A metric of the run: clean/PGD/IBP from evaluation.json (else verification.json),
        CROWN and verified from a complete verification.json; None when not measured."""
        sources = [self.evaluation, self.verification] if key in ("clean_accuracy", "pgd_accuracy",
                                                                  "ibp_verified_accuracy") else [self.verification]
        for src in sources:
            if src is not None and isinstance(src.get(key), (int, float)):
                return float(src[key])
        return None

    def source(self, key: str) -> Optional[Dict[str, Any]]:
        """The stored result (evaluation.json or verification.json) that :meth:`value` reads ``key`` from."""
        sources = [self.evaluation, self.verification] if key in ("clean_accuracy", "pgd_accuracy",
                                                                  "ibp_verified_accuracy") else [self.verification]
        for src in sources:
            if src is not None and isinstance(src.get(key), (int, float)):
                return src
        return None

    def points(self, key: str) -> Optional[int]:
        """How many test points the metric ``key`` was measured on (None: not measured or not recorded)."""
        src = self.source(key)
        n = None if src is None else src.get("n")
        return n if isinstance(n, int) and not isinstance(n, bool) else None

    def same_points(self) -> Optional[bool]:
        """Whether IBP-verified (evaluation.json) and verified (verification.json) are on the same test
        points; None when the run lacks one of them."""
        src = self.source("ibp_verified_accuracy")
        if src is None or self.verification is None or src is self.verification:
            return None
        a = (src.get("certifies") or {}).get("indices_sha256")
        b = (self.verification.get("certifies") or {}).get("indices_sha256")
        return bool(a) and a == b

    def notes(self) -> List[str]:
        """Marks for the tables: unfinished training, collapsed predictions, ε beyond training, and IBP
        and complete verification measured on different points."""
        out = []
        if self.checkpoint is None:
            out.append("not trained")
        elif self.epoch is not None and self.epoch < self.config.epochs:
            out.append(f"unfinished (epoch {self.epoch}/{self.config.epochs})")
        for res in (self.evaluation, self.verification):
            for note in (result_notes(res).split("; ") if res else []):
                if note and not note.startswith("unfinished") and note not in out:
                    out.append(note)
        if self.same_points() is False:
            out.append(f"IBP (n={self.points('ibp_verified_accuracy')}) and verified "
                       f"(n={self.points('verified_accuracy')}) on different points")
        return out

    def pareto_y(self) -> Tuple[Optional[float], bool]:
        """(verified accuracy, True) from verification.json, else (IBP-verified accuracy, False)."""
        v = self.value("verified_accuracy")
        if v is not None:
            return v, True
        return self.value("ibp_verified_accuracy"), False


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.yaml").is_file()


def _read_config(path: Path) -> Tuple[TrainConfig, Optional[str]]:
    cfg_path = path / "config.yaml"
    try:
        values = yaml.safe_load(cfg_path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise CertkdError(f"cannot read {cfg_path} ({str(e).splitlines()[0] if str(e) else e}); "
                          "it is not a valid run config") from None
    if not isinstance(values, dict):
        raise CertkdError(f"{cfg_path} is not a YAML mapping of config keys; it is not a certkd run")
    values = dict(values)
    preset = values.pop("preset", None)  # recorded by newer versions, not a TrainConfig key
    try:
        cfg = apply_overrides(TrainConfig(), values)
    except CertkdError as e:
        raise CertkdError(f"{cfg_path}: {e}") from None
    return cfg, (str(preset) if preset else None)


def load_run(path, name: Optional[str] = None) -> RunRecord:
    """Read one run directory (config.yaml, latest checkpoint meta, metrics, evaluation, verification)."""
    p = Path(path)
    if not p.exists():
        raise CertkdError(f"no such run directory: {p}")
    if not is_run_dir(p):
        raise CertkdError(f"{p} is not a certkd run directory (no config.yaml); pass run directories such as runs/*")
    cfg, preset = _read_config(p)
    rec = RunRecord(path=p, name=name or p.name, config=cfg, preset=preset)
    ck = latest_checkpoint(p)
    if ck is not None:
        try:
            rec.meta = read_meta(ck)
            rec.checkpoint = ck
        except CertkdError as e:
            rec.warnings.append(str(e))
    if rec.meta is not None and rec.meta.get("preset") and not rec.preset:
        rec.preset = str(rec.meta["preset"])
    ev_hint = f"rerun `certkd evaluate {shlex.quote(str(p))}`"
    rec.evaluation = _read_json(p / "evaluation.json", rec.warnings, ev_hint)
    ver = _read_json(p / "verification.json", rec.warnings, f"rerun `certkd verify {shlex.quote(str(p))}`")
    if ver is not None:
        if ver.get("complete", True) and ver.get("n", 0):
            rec.verification = ver
        else:
            rec.warnings.append(f"verification incomplete ({ver.get('n', 0)}/{ver.get('n_requested', '?')} points); "
                                f"finish it with `certkd verify {shlex.quote(str(p))} --resume` (same settings)")
    metrics = p / "metrics.jsonl"
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict) and "epoch" in obj:
                rec.metrics.append(obj)
    if rec.checkpoint is None:
        rec.warnings.append("no checkpoint: not trained yet (its `certkd train` command is below)")
    elif rec.epoch is not None and rec.epoch < cfg.epochs:
        rec.warnings.append(f"partially trained (epoch {rec.epoch}/{cfg.epochs}); finish it with "
                            f"`certkd train --resume --out {shlex.quote(str(p))}`")
    _drop_other_weights(rec)
    for name, res in (("evaluation.json", rec.evaluation), ("verification.json", rec.verification)):
        rec.warnings += [f"{name}: {w}" for w in result_warnings(res or {})]
    if rec.evaluation is not None and rec.epoch is not None and rec.evaluation.get("checkpoint_epoch") not in (
            None, rec.epoch):
        rec.warnings.append(f"evaluation.json is from epoch {rec.evaluation.get('checkpoint_epoch')} but the latest "
                            f"checkpoint is epoch {rec.epoch}; rerun `certkd evaluate {shlex.quote(str(p))}`")
    return rec


def _drop_other_weights(rec: RunRecord) -> None:
    """Keep only results measured on the run's latest weights: metrics of different checkpoints
    must never share a row. Results from before fingerprints were recorded stay, with a caveat."""
    if rec.checkpoint is None:
        return
    try:
        rec.weights_sha256 = weights_sha256(read_tensors(rec.checkpoint / "model.safetensors"))
    except CertkdError as e:
        rec.warnings.append(str(e))
        return
    for attr, name, cmd in (("evaluation", "evaluation.json", "evaluate"), ("verification", "verification.json",
                                                                             "verify")):
        res = getattr(rec, attr)
        cert = res.get("certifies") if isinstance(res, dict) else None
        if res is None:
            continue
        if not isinstance(cert, dict):
            rec.warnings.append(f"{name} does not record which weights it measured (older certkd); rerun "
                                f"`certkd {cmd} {shlex.quote(str(rec.path))}` to be sure it matches {rec.checkpoint.name}")
        elif cert.get("weights_sha256") != rec.weights_sha256:
            setattr(rec, attr, None)
            rec.warnings.append(f"{name} was measured on other weights (epoch {cert.get('checkpoint_epoch')}, sha256 "
                                f"{str(cert.get('weights_sha256'))[:12]}) than the latest checkpoint "
                                f"{rec.checkpoint.name} (sha256 {rec.weights_sha256[:12]}): not used; rerun "
                                f"`certkd {cmd} {shlex.quote(str(rec.path))}`" + (" --force" if cmd == "verify" else ""))


def measured_on(result: Optional[Mapping[str, Any]]) -> str:
    """Which checkpoint and points a stored result was measured on, in words (for tables and cards)."""
    if not result:
        return "–"
    cert = result.get("certifies") or {}
    points = cert.get("points") or result.get("points") or f"first {result.get('n')} test points"
    if not cert:
        return f"{points}, checkpoint not recorded"
    return (f"{points}, epoch {cert.get('checkpoint_epoch')} weights (sha256 "
            f"{str(cert.get('weights_sha256'))[:12]})")


def _unique_names(paths: Sequence[Path]) -> List[str]:
    """Shortest path suffixes that tell the runs apart (``seed=0``, or ``a/seed=0`` and ``b/seed=0``)."""
    parts = [Path(p).resolve().parts for p in paths]
    depth = [1] * len(paths)
    while True:
        names = ["/".join(pp[-d:]) for pp, d in zip(parts, depth)]
        clashes = {n for n in names if names.count(n) > 1}
        if not clashes:
            return names
        changed = False
        for i, n in enumerate(names):
            if n in clashes and depth[i] < len(parts[i]):
                depth[i] += 1
                changed = True
        if not changed:
            return names


def collect_runs(paths: Iterable) -> List[RunRecord]:
    """Run directories from paths that are runs, or folders of runs (e.g. a sweep folder).

    Raises :class:`CertkdError` when no path is given or a path is neither.
    """
    given = [Path(p) for p in paths]
    if not given:
        raise CertkdError("no run directories given; pass them like: certkd report runs/* --out report/")
    found: List[Path] = []
    for p in given:
        if is_run_dir(p):
            found.append(p)
            continue
        if not p.exists():
            raise CertkdError(f"no such run directory: {p}")
        children = sorted(c for c in p.iterdir() if is_run_dir(c)) if p.is_dir() else []
        if not children:
            raise CertkdError(f"{p} is not a certkd run directory (no config.yaml) and holds no runs; "
                              "pass run directories such as runs/*")
        found.extend(children)
    seen, unique = set(), []
    for p in found:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return [load_run(p, name) for p, name in zip(unique, _unique_names(unique))]


# --------------------------------------------------------------------------------------------
# Grouping and statistics
# --------------------------------------------------------------------------------------------

@dataclass
class Group:
    """Runs whose resolved configs are identical except the seed (and runtime keys)."""

    name: str
    config: Dict[str, Any]
    runs: List[RunRecord]

    @property
    def method(self) -> str:
        return self.runs[0].method

    @property
    def family(self) -> str:
        return self.runs[0].family

    @property
    def seeds(self) -> List[int]:
        return [r.config.seed for r in self.runs]

    def stats(self, key: str) -> "Stat":
        return mean_std([r.value(key) for r in self.runs])

    def pareto(self) -> Tuple["Stat", "Stat", bool]:
        """(clean accuracy, verified accuracy, whether every y is from a complete verifier)."""
        ys = [r.pareto_y() for r in self.runs]
        complete = all(c for y, c in ys if y is not None) and any(y is not None for y, _ in ys)
        if not complete:  # do not mix complete-verifier and IBP numbers in one mean
            ys = [(r.value("ibp_verified_accuracy"), False) for r in self.runs]
        return self.stats("clean_accuracy"), mean_std([y for y, _ in ys]), complete


@dataclass
class Stat:
    mean: Optional[float]
    std: Optional[float]   # sample standard deviation (ddof=1); None with fewer than 2 values
    n: int                 # number of runs that have the value
    total: int             # number of runs in the group

    def format(self, percent: bool = True, digits: int = 1) -> str:
        if self.mean is None:
            return "–"
        s = 100.0 if percent else 1.0
        text = f"{s * self.mean:.{digits}f}"
        if self.std is not None:
            text += f" ± {s * self.std:.{digits}f}"
        if self.n < self.total:
            text += f" ({self.n}/{self.total})"
        return text


def mean_std(values: Sequence[Optional[float]]) -> Stat:
    """Mean and sample standard deviation (ddof=1) of the values that are not None."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return Stat(None, None, 0, len(values))
    return Stat(statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else None, len(vals), len(values))


def _fmt_value(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


# Keys tried first when naming groups; the rest follow in TrainConfig order.
_NAME_PRIORITY = ("beta", "alpha", "eps", "teacher", "dist_target", "dist_combination", "dist_distance", "dist_reduction",
                  "feature_adapter", "kd_temperature", "trades_beta", "model", "model_kwargs", "dataset", "epochs",
                  "lr", "batch_size", "train_eps_mul", "eps_length", "eps_start", "attack_steps")


def _distinguishing_keys(configs: Sequence[Mapping[str, Any]]) -> List[str]:
    """A short list of keys that tells the configs apart: greedily, in :data:`_NAME_PRIORITY` order."""
    keys = [k for k in configs[0] if k != "method"]
    order = [k for k in _NAME_PRIORITY if k in keys] + [k for k in keys if k not in _NAME_PRIORITY]
    classes = lambda ks: len({tuple(json.dumps(c.get(k), sort_keys=True) for k in ks) for c in configs})
    target = classes(keys)
    chosen: List[str] = []
    current = 1
    for k in order:
        if current >= target:
            break
        n = classes(chosen + [k])
        if n > current:
            chosen.append(k)
            current = n
    return chosen


def _name_value(key: str, value: Any, configs: Sequence[Mapping[str, Any]]) -> str:
    if key == "teacher" and isinstance(value, str):  # the folder name, unless two teachers share it
        tails = {Path(str(c.get(key))).name for c in configs if c.get(key)}
        paths = {str(c.get(key)) for c in configs if c.get(key)}
        if len(tails) == len(paths):
            return Path(value).name
    return _fmt_value(value)


def _group_key(cfg: TrainConfig) -> str:
    d = cfg.to_dict()
    for k in GROUP_IGNORED_KEYS:
        d.pop(k, None)
    return json.dumps(d, sort_keys=True)


def group_runs(runs: Sequence[RunRecord]) -> List[Group]:
    """Group seeds; name each group by its method plus the keys that tell apart groups of that method."""
    by_key: Dict[str, List[RunRecord]] = {}
    for r in runs:
        by_key.setdefault(_group_key(r.config), []).append(r)
    groups = [(json.loads(k), sorted(rs, key=lambda r: (r.config.seed, r.name))) for k, rs in by_key.items()]
    names: List[str] = []
    for cfg, rs in groups:
        same_method = [c for c, _ in groups if c["method"] == cfg["method"]]
        keys = _distinguishing_keys(same_method)
        parts = [cfg["method"]] + [f"{_PRETTY_KEYS.get(k, k)}={_name_value(k, cfg[k], same_method)}" for k in keys]
        names.append(" ".join(parts))
    out = [Group(name=n, config=c, runs=rs) for n, (c, rs) in zip(names, groups)]
    order = {f: i for i, (f, _) in enumerate(FAMILIES)}
    out.sort(key=lambda g: (order[g.family], g.method, g.name))
    return out


def results_rows(groups: Sequence[Group]) -> List[Dict[str, Any]]:
    """One dict per group: name, method, family, eps, seeds, runs, and mean/std/n of every metric."""
    rows = []
    for g in groups:
        row: Dict[str, Any] = {"group": g.name, "method": g.method, "family": g.family, "eps": g.config["eps"],
                               "n_runs": len(g.runs), "seeds": " ".join(str(s) for s in g.seeds),
                               "runs": " ".join(r.name for r in g.runs)}
        for key, _ in REPORT_METRICS:
            st = g.stats(key)
            row[f"{key}_mean"], row[f"{key}_std"], row[f"{key}_n"] = st.mean, st.std, st.n
            row[f"{key}_points"] = _points_text(g, (key,), empty="")
        row["notes"] = group_notes(g)
        rows.append(row)
    return rows


#: Metrics of the results table measured by ``certkd evaluate`` (else verify) and by the complete verifier.
_EVAL_KEYS = ("clean_accuracy", "pgd_accuracy", "ibp_verified_accuracy")
_VERIFIER_KEYS = ("crown_verified_accuracy", "verified_accuracy")


def _points_text(g: Group, keys: Sequence[str], empty: str = "–") -> str:
    """The number(s) of test points behind ``keys`` over a group's runs: "360", or "300/500" when they differ."""
    ns = sorted({n for r in g.runs for k in keys for n in [r.points(k)] if n is not None})
    return "/".join(str(n) for n in ns) if ns else empty


def group_notes(g: Group) -> str:
    """The runs' :meth:`RunRecord.notes`; in a group of several seeds each with "(k/N runs)"."""
    if len(g.runs) == 1:
        return "; ".join(g.runs[0].notes())
    counts: Dict[str, int] = {}
    for r in g.runs:
        for note in r.notes():
            key = re.sub(r" \(epoch \d+/\d+\)", "", note)
            counts[key] = counts.get(key, 0) + 1
    return "; ".join(f"{note} ({c}/{len(g.runs)} runs)" for note, c in counts.items())


def results_table(groups: Sequence[Group]) -> str:
    """Markdown table of the groups: accuracies in % as mean ± std over seeds, the number of test points
    ``n`` behind each block of columns, and notes (unfinished, collapsed, IBP and verified on other points)."""
    header = (["configuration", "ε", "seeds"] + [label for k, label in REPORT_METRICS if k in _EVAL_KEYS] + ["n"]
              + [label for k, label in REPORT_METRICS if k in _VERIFIER_KEYS] + ["n verified", "notes"])
    lines = []
    for g in groups:
        lines.append([g.name.replace("|", "\\|"), f"{g.config['eps']:g}", ",".join(str(s) for s in g.seeds)]
                     + [g.stats(key).format() for key, _ in REPORT_METRICS if key in _EVAL_KEYS]
                     + [_points_text(g, _EVAL_KEYS)]
                     + [g.stats(key).format() for key, _ in REPORT_METRICS if key in _VERIFIER_KEYS]
                     + [_points_text(g, _VERIFIER_KEYS), group_notes(g).replace("|", "\\|") or "–"])
    return _markdown_table(header, lines)


def _csv_text(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: ("" if row.get(c) is None else (repr(row[c]) if isinstance(row[c], float) else row[c]))
                         for c in columns})
    return buf.getvalue()


def measured_table(runs: Sequence[RunRecord]) -> str:
    """Markdown table: per run, the checkpoint and the points behind evaluation.json and verification.json."""
    lines = []
    for r in runs:
        ev, ver = r.evaluation, r.verification
        same = "–"
        if ev and ver:
            a, b = (ev.get("certifies") or {}).get("indices_sha256"), (ver.get("certifies") or {}).get("indices_sha256")
            same = "yes" if a and a == b else "no: IBP and verified are on different points"
        ckpt = f"{r.checkpoint.name} (sha256 {r.weights_sha256[:12]})" if r.checkpoint and r.weights_sha256 else "–"
        state = "; ".join(n for n in r.notes() if "different points" not in n) or "–"
        lines.append([r.name.replace("|", "\\|"), ckpt, measured_on(ev), measured_on(ver), same,
                      state.replace("|", "\\|")])
    return _markdown_table(["run", "latest checkpoint", "evaluation.json (clean, PGD, IBP)",
                            "verification.json (CROWN, verified)", "same points", "notes"], lines)


def results_csv(groups: Sequence[Group]) -> str:
    """CSV with one row per group; accuracies as fractions in [0, 1], std empty for a single seed."""
    cols = ["group", "method", "family", "eps", "n_runs", "seeds", "runs"]
    cols += [f"{k}_{s}" for k, _ in REPORT_METRICS for s in ("mean", "std", "n", "points")] + ["notes"]
    return _csv_text(results_rows(groups), cols)


def runs_csv(groups: Sequence[Group]) -> str:
    """CSV with one row per run (fractions in [0, 1]; empty where not measured)."""
    cols = ["run", "path", "group", "method", "seed", "eps", "epoch", "epochs", "weights_sha256", "evaluation_n",
            "evaluation_points", "verification_n", "verification_points"] + [k for k, _ in REPORT_METRICS] + ["notes"]
    rows = []
    for g in groups:
        for r in g.runs:
            ev, ver = r.evaluation or {}, r.verification or {}
            row = {"run": r.name, "path": str(r.path), "group": g.name, "method": r.method, "seed": r.config.seed,
                   "eps": r.config.eps, "epoch": r.epoch, "epochs": r.config.epochs,
                   "weights_sha256": r.weights_sha256, "evaluation_n": ev.get("n"),
                   "evaluation_points": ev and measured_on(ev), "verification_n": ver.get("n"),
                   "verification_points": ver and measured_on(ver)}
            row.update({k: r.value(k) for k, _ in REPORT_METRICS})
            row["notes"] = "; ".join(r.notes())
            rows.append(row)
    return _csv_text(rows, cols)


# --------------------------------------------------------------------------------------------
# Exact commands
# --------------------------------------------------------------------------------------------

# Config keys with a dedicated `certkd train` flag; every other key goes through --set.
_TRAIN_FLAGS = ("dataset", "data_dir", "model", "method", "eps", "alpha", "beta", "teacher", "dist_combination",
                "dist_target", "feature_adapter", "epochs", "batch_size", "lr", "seed", "device")


def _set_value(value: Any) -> str:
    """A --set value that the CLI (yaml.safe_load, then the field's type) reads back as ``value``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(", ", ": "))
    if isinstance(value, str):
        try:
            same = yaml.safe_load(value) == value
        except yaml.YAMLError:
            same = False
        return value if same and value.strip() == value and value else json.dumps(value)
    return str(value)


def _train_args(cfg: TrainConfig, base: TrainConfig) -> Optional[List[str]]:
    """Flags turning ``base`` into ``cfg`` (None when a key cannot be expressed, e.g. a value back to None).

    A different ``--epochs`` rescales the base's schedule (:func:`certkd.config.rescale_schedule`), so
    schedule keys are compared with the rescaled base: only those that differ from it need a ``--set``.
    """
    if cfg.epochs != base.epochs:
        base = dataclasses.replace(rescale_schedule(base, cfg.epochs), epochs=base.epochs)
    target, ref = cfg.to_dict(), base.to_dict()
    args: List[str] = []
    for f in dataclasses.fields(TrainConfig):
        key, v = f.name, target[f.name]
        if v == ref[key] and type(v) is type(ref[key]):
            continue
        if v is None:  # resolve_config ignores None overrides
            return None
        if key in _TRAIN_FLAGS:
            args += [f"--{key.replace('_', '-')}", repr(v) if isinstance(v, float) else str(v)]
        else:
            args += ["--set", f"{key}={_set_value(v)}"]
    return args


def _resolves_to(args: Sequence[str], cfg: TrainConfig, command: str = "train") -> bool:
    """Whether ``certkd COMMAND ARGS`` (parsed by the real CLI; COMMAND train or teacher) resolves to ``cfg``."""
    try:
        from certkd.cli import _overrides, cli
        from certkd.config import resolve_config

        ctx = cli.commands[command].make_context(command, list(args), resilient_parsing=False)
        got = resolve_config(ctx.params.get("preset"), _overrides(ctx.params), teacher=command == "teacher")
        return got.to_dict() == cfg.to_dict()
    except Exception:  # a preset that no longer loads, a flag the CLI lacks, ...
        return False


def display_path(path: Optional[str]) -> Optional[str]:
    """An absolute path relative to the current folder when it lies at most two levels above it (e.g.
    ``../shared/data/mnist``), so that commands written into reports hold no machine-specific prefix."""
    if not path or not Path(path).is_absolute():
        return path
    try:
        rel = os.path.relpath(path, Path.cwd())
    except ValueError:  # another drive (Windows)
        return path
    return rel if Path(rel).parts[:3] != ("..", "..", "..") else path


def train_command(cfg: TrainConfig, out, preset: Optional[str] = None, infer_preset: bool = True) -> str:
    """The ``certkd train`` (for an empirical method: ``certkd teacher``) command line that resolves to
    exactly ``cfg`` and writes to ``out``.

    Keys are compared with the :class:`TrainConfig` defaults, or with a preset: the one the run
    recorded, else (``infer_preset``) the preset giving the shortest command. Dedicated flags are
    used where the CLI has them, ``--set key=value`` otherwise. Each candidate is parsed back
    through the CLI and kept only if it resolves to ``cfg`` exactly. A data directory is written
    relative to the current folder where that is short (:func:`display_path`).
    """
    from certkd.config import list_presets

    cfg = dataclasses.replace(cfg, data_dir=display_path(cfg.data_dir))
    names: List[Optional[str]] = [preset] if preset else (list(list_presets()) if infer_preset else [])
    tail = ["--out", str(out)]
    commands = (["teacher"] if cfg.method in EMPIRICAL_METHODS else []) + ["train"]
    for command in commands:
        teacher = command == "teacher"
        candidates: List[List[str]] = []
        for name in names:
            try:
                base = base_config(name, teacher=teacher)
            except CertkdError:
                continue
            # exact but misleading: another dataset's or another architecture's preset
            if not preset and (base.dataset != cfg.dataset or base.model != cfg.model):
                continue
            args = _train_args(cfg, base)
            if args is not None:
                candidates.append(["--preset", str(name)] + args)
        plain = _train_args(cfg, base_config(None, teacher=teacher))
        if plain is not None:
            candidates.append(plain)
        candidates.sort(key=len)
        chosen = next((c for c in candidates if _resolves_to(c + tail, cfg, command)), None)
        if chosen is not None:
            return " ".join(shlex.quote(a) for a in ["certkd", command] + chosen + tail)
    # cannot happen for a valid config; keep the explicit form
    return " ".join(shlex.quote(a) for a in ["certkd", "train"] + (_train_args(cfg, TrainConfig()) or []) + tail)


def _evaluate_flags(run: RunRecord) -> Optional[Tuple[str, ...]]:
    ev = run.evaluation
    if ev is None:
        return None
    flags: List[str] = []
    if isinstance(ev.get("eps"), (int, float)) and not math.isclose(float(ev["eps"]), run.config.eps):
        flags += ["--eps", repr(float(ev["eps"]))]
    if isinstance(ev.get("n"), int):
        flags += ["--limit", str(ev["n"])]
    return tuple(flags)


def evaluate_command(run: RunRecord) -> Optional[str]:
    """``certkd evaluate RUN [--eps E] --limit N`` reproducing the run's evaluation.json."""
    flags = _evaluate_flags(run)
    return None if flags is None else _join(["certkd", "evaluate", str(run.path), *flags])


def _evaluate_commands(runs: Sequence[RunRecord]) -> List[str]:
    """One ``certkd evaluate`` line per set of flags, listing every run evaluated with them."""
    by_flags: Dict[Tuple[str, ...], List[RunRecord]] = {}
    for r in runs:
        flags = _evaluate_flags(r)
        if flags is not None:
            by_flags.setdefault(flags, []).append(r)
    return [_join(["certkd", "evaluate", *[str(r.path) for r in rs], *flags]) for flags, rs in by_flags.items()]


def _join(args: Sequence[str]) -> str:
    return " ".join(shlex.quote(a) for a in args)


def _sweep_of(run: RunRecord) -> Optional[Tuple[Path, str]]:
    """(sweep folder, its command) when the run was made by ``certkd sweep`` (listed in ../sweep.json) and
    that command, resolved today, still gives the run's config (it may not for a sweep made by an older
    certkd, e.g. before ``epochs`` rescaled the schedule: the run then gets its own exact command)."""
    path = run.path.parent / "sweep.json"
    if not path.is_file():
        return None
    try:
        stat = path.stat()
        command, planned = _planned_sweep(str(path), stat.st_mtime_ns, stat.st_size)
    except OSError:
        return None
    if not command or run.path.name not in planned:
        return None
    wanted = {k: v for k, v in run.config.to_dict().items() if k not in ("device",)}
    return (run.path.parent, command) if planned[run.path.name] == wanted else None


@functools.lru_cache(maxsize=64)
def _planned_sweep(path: str, mtime_ns: int, size: int) -> Tuple[Optional[str], Dict[str, Dict[str, Any]]]:
    """(command, {run name: config dict without runtime keys}) of a sweep.json, as its command resolves now."""
    from certkd.sweep import plan_sweep

    try:
        from certkd.cli import cli

        data = json.loads(Path(path).read_text())
        names = {r.get("name") for r in data.get("runs", [])}
        command = data.get("command")
        # the command as the CLI parses it: grid values as typed, which is how the run folders were named
        p = cli.commands["sweep"].make_context("sweep", shlex.split(str(command))[2:], resilient_parsing=False).params
        runs = plan_sweep(Path(path).parent, p.get("preset"), list(p.get("grid") or ()), p.get("seeds"),
                          list(p.get("sets") or ()))
    except Exception:  # an unreadable or foreign sweep.json: each run gets its own command
        return None, {}
    planned = {r.name: {k: v for k, v in r.config.to_dict().items() if k not in ("device",)}
               for r in runs if r.name in names}
    return (str(command) if command else None), planned


def verify_command(run: RunRecord) -> Optional[str]:
    ver = run.verification
    if ver is None:
        return None
    st = ver.get("settings") or {}
    args = ["certkd", "verify", str(run.path)]
    if isinstance(st.get("eps"), (int, float)) and not math.isclose(float(st["eps"]), run.config.eps):
        args += ["--eps", repr(float(st["eps"]))]
    if "timeout" in st:
        args += ["--timeout", f"{st['timeout']:g}"]
    if "engine" in st:
        args += ["--engine", str(st["engine"])]
    if st.get("attack_restarts", 1) != 1:
        args += ["--restarts", str(st["attack_restarts"])]
    if st.get("alpha_iterations", 20) != 20:
        args += ["--alpha-iterations", str(st["alpha_iterations"])]
    n = ver.get("n_requested", ver.get("n"))
    if isinstance(n, int):
        args += ["--limit", str(n)]
    return " ".join(shlex.quote(a) for a in args)


def reproduce_commands(groups: Sequence[Group]) -> List[str]:
    """Train commands per group (teachers first; a sweep's runs as its one ``certkd sweep`` line),
    then evaluate and verify commands."""
    lines: List[str] = []
    sweeps_done = set()
    for g in groups:
        own = []
        for r in g.runs:
            sweep = _sweep_of(r)
            if sweep is None:
                own.append(train_command(r.config, r.path, r.preset))
            elif sweep[0] not in sweeps_done:
                sweeps_done.add(sweep[0])
                n = sum(1 for gg in groups for rr in gg.runs if _sweep_of(rr) and _sweep_of(rr)[0] == sweep[0])
                lines += [f"# sweep {sweep[0]} (makes {n} of the reported runs)", sweep[1]]
        if own:
            lines += [f"# {g.name}"] + own
    runs = [r for g in groups for r in g.runs]
    ev = _evaluate_commands(runs)
    if ev:
        lines += ["# evaluation (evaluation.json)"] + ev
    ver = [c for c in (verify_command(r) for r in runs) if c]
    if ver:
        lines += ["# complete verification (verification.json)"] + ver
    return lines


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------

_STYLE = {"teacher": ("s", "tab:gray"), "certified": ("o", "tab:blue"), "distillation": ("^", "tab:red"),
          "other": ("D", "tab:green")}


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise CertkdError("plots need matplotlib: pip install 'certkd[report]' (or pip install matplotlib)") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save_png(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def pareto_front(points: Sequence[Tuple[float, float]]) -> List[int]:
    """Indices of the points not dominated (maximising both coordinates), sorted by x."""
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any((x2 >= x and y2 >= y) and (x2 > x or y2 > y) for j, (x2, y2) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], -points[i][1]))


def plot_pareto(groups: Sequence[Group], path, title: str = "") -> Optional[Path]:
    """Clean accuracy (x) against verified accuracy (y) per group, seeds as faint points.

    Filled markers: y from a complete verifier (verification.json); hollow: IBP-verified
    (evaluation.json), a lower bound. Error bars: sample std over seeds. The Pareto front of the
    group means is drawn as a staircase. Returns None when no group has both numbers.
    """
    plt = _pyplot()
    from matplotlib.lines import Line2D

    pts, items, extent = [], [], []  # extent: every plotted coordinate (seeds, error bars) for the limits
    for g in groups:
        x, y, complete = g.pareto()
        if x.mean is not None and y.mean is not None:
            pts.append((100 * x.mean, 100 * y.mean))
            items.append((g, x, y, complete))
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 5.0))
    for (g, x, y, complete), (px, py) in zip(items, pts):
        marker, colour = _STYLE[g.family]
        if len(g.runs) > 1:  # individual seeds
            for r in g.runs:
                rx = r.value("clean_accuracy")
                ry = r.pareto_y()[0] if complete else r.value("ibp_verified_accuracy")
                if rx is not None and ry is not None:
                    ax.scatter(100 * rx, 100 * ry, marker=marker, s=14, color=colour, alpha=0.35, linewidths=0)
                    extent.append((100 * rx, 100 * ry))
        sx, sy = 100 * (x.std or 0.0), 100 * (y.std or 0.0)
        extent += [(px - sx, py - sy), (px + sx, py + sy)]
        if x.std is not None or y.std is not None:
            ax.errorbar(px, py, xerr=None if x.std is None else 100 * x.std,
                        yerr=None if y.std is None else 100 * y.std, fmt="none", ecolor=colour, elinewidth=1,
                        capsize=3, alpha=0.8)
        ax.scatter(px, py, marker=marker, s=70, zorder=3, linewidths=1.5,
                   facecolors=colour if complete else "white", edgecolors=colour)
    front = pareto_front(pts)
    if len(front) > 1:
        ax.step([pts[i][0] for i in front], [pts[i][1] for i in front], where="pre", linestyle="--", color="black",
                linewidth=1, zorder=2)
    else:
        ax.scatter([pts[front[0]][0]], [pts[front[0]][1]], s=220, facecolors="none", edgecolors="black",
                   linestyle="--", zorder=2)
    xs, ys = [p[0] for p in pts + extent], [p[1] for p in pts + extent]
    pad_x = max(1.5, 0.08 * (max(xs) - min(xs)))
    pad_y = max(1.5, 0.08 * (max(ys) - min(ys)))
    x0, x1 = max(-1.5, min(xs) - pad_x), min(101.5, max(xs) + 2.5 * pad_x)
    y0, y1 = max(-1.5, min(ys) - pad_y), min(101.5, max(ys) + 2 * pad_y)
    x1, y1 = max(x1, x0 + 10), max(y1, y0 + 10)  # at least 10 points per axis: no magnified noise
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    ax.set_xlabel("standard (clean) accuracy [%]")
    ax.set_ylabel("verified robust accuracy [%]")
    ax.grid(True, alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    handles = [Line2D([], [], marker=_STYLE[f][0], color=_STYLE[f][1], linestyle="none", markersize=8, label=label)
               for f, label in FAMILIES if any(g.family == f for g, *_ in items)]
    handles += [Line2D([], [], color="black", linestyle="--", linewidth=1, label="Pareto front (group means)"),
                Line2D([], [], marker="o", color="0.35", linestyle="none", markersize=7,
                       label="filled: complete verifier"),
                Line2D([], [], marker="o", color="0.35", markerfacecolor="white", linestyle="none", markersize=7,
                       label="hollow: IBP-verified (lower bound)")]
    if any(len(g.runs) > 1 for g, *_ in items):
        handles.append(Line2D([], [], marker="o", color="0.35", alpha=0.35, linestyle="none", markersize=4,
                              label="single seeds; bars: ± std"))
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0,
              frameon=False)
    _place_labels(fig, ax, [(px, py, g.name) for (g, *_), (px, py) in zip(items, pts)])
    out = Path(path)
    _save_png(fig, out)
    plt.close(fig)
    return out


def _place_labels(fig, ax, items: Sequence[Tuple[float, float, str]]) -> None:
    """Annotate points so that labels overlap neither each other nor the markers, where possible:
    each label takes the first free spot of a list of offsets (a leader line when far)."""
    from matplotlib.transforms import Bbox

    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    axes_box = ax.get_window_extent(renderer)
    to_px = ax.transData.transform
    blocked = [Bbox.from_extents(*(to_px((x, y)) - 7), *(to_px((x, y)) + 7)) for x, y, _ in items]
    placed: List[Any] = []
    near = [(6, 4), (6, -4), (-6, 4), (-6, -4), (0, 9), (0, -9)]
    far = [(dx, dy) for r in (18, 30, 45, 60) for dx, dy in ((r, r), (r, -r), (-r, r), (-r, -r), (0, r), (0, -r),
                                                                (r, 0), (-r, 0))]

    def area(a, b) -> float:
        w = min(a.x1, b.x1) - max(a.x0, b.x0)
        h = min(a.y1, b.y1) - max(a.y0, b.y0)
        return w * h if w > 0 and h > 0 else 0.0

    order = sorted(range(len(items)), key=lambda i: -items[i][1])
    for i in order:
        x, y, text = items[i]
        best = None
        for dx, dy in near + far:
            ha = "left" if dx > 0 else "right" if dx < 0 else "center"
            va = "bottom" if dy > 0 else "top" if dy < 0 else "center"
            t = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", ha=ha, va=va, fontsize=7.5,
                            color="0.1")
            bb = t.get_window_extent(renderer).expanded(1.04, 1.15)
            t.remove()
            outside = bb.width * bb.height - area(bb, axes_box)
            cost = sum(area(bb, o) for o in placed + [b for j, b in enumerate(blocked) if j != i]) + 3 * outside
            cost += 0.05 * (abs(dx) + abs(dy))  # prefer near spots among equally free ones
            if best is None or cost < best[0]:
                best = (cost, dx, dy, ha, va, bb)
            if cost < 1.0:
                break
        _, dx, dy, ha, va, bb = best
        arrow = dict(arrowstyle="-", color="0.5", linewidth=0.6) if (dx, dy) not in near else None
        ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", ha=ha, va=va, fontsize=7.5,
                    color="0.1", arrowprops=arrow)
        placed.append(bb)


#: Loss terms of metrics.jsonl's "train" records (epoch means), with their legend labels.
LOSS_COMPONENTS = (("ce_clean", "clean cross-entropy"), ("ce_adv", "adversarial cross-entropy"),
                   ("kl", "TRADES KL"), ("robust_loss", "certified / expressive loss"), ("ibp_loss", "IBP loss"),
                   ("reg", "warm-up regulariser (before λ)"))


def plot_curves(run: RunRecord, path) -> Optional[Path]:
    """Training curves of one run from metrics.jsonl, per (integer) epoch: the total training loss, its
    components, the distillation term on its own (distillation methods), the ε schedule, the test
    accuracies and the training-batch accuracies."""
    if not run.metrics:
        return None
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    recs = sorted(run.metrics, key=lambda m: m["epoch"])
    ep = [m["epoch"] for m in recs]
    train = [m.get("train", {}) for m in recs]
    nan = float("nan")
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.6))
    ax_loss, ax_comp, ax_dist, ax_eps, ax_test, ax_acc = axes.flat
    ax_loss.plot(ep, [t.get("loss", nan) for t in train], marker="o", markersize=3, color="tab:purple")
    ax_loss.set_title("training loss (total)")
    shown = 0
    for key, label in LOSS_COMPONENTS:
        values = [t.get(key, nan) for t in train]
        if any(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            ax_comp.plot(ep, values, marker="o", markersize=3, label=label)
            shown += 1
    ax_comp.set_title("loss components (unweighted)")
    if shown:
        ax_comp.legend(fontsize=7)
    dist = [t.get("dist", nan) for t in train]
    if any(isinstance(v, (int, float)) and math.isfinite(v) for v in dist):
        ax_dist.plot(ep, dist, marker="o", markersize=3, color="tab:red", label="D (unweighted)")
        ax_dist.set_title(f"distillation term D (the loss adds β·D, β={run.config.beta:g})", fontsize=9)
        ax_dist.legend(fontsize=7)
    else:
        ax_dist.set_title("distillation term", fontsize=9)
        ax_dist.text(0.5, 0.5, "none: not a distillation run", ha="center", va="center", transform=ax_dist.transAxes,
                     color="0.4")
        ax_dist.set_yticks([])
    ax_eps.plot(ep, [t.get("eps", nan) for t in train], marker="o", markersize=3, color="tab:orange",
                label="mean training ε")
    target = run.config.eps * run.config.train_eps_mul
    ax_eps.axhline(target, linestyle="--", color="0.4", linewidth=1, label=f"target training ε={target:g}")
    ax_eps.set_title("ε schedule")
    ax_eps.legend(fontsize=7)
    tests = [m for m in recs if isinstance(m.get("test"), dict)]
    for key, label, colour in (("clean_accuracy", "clean", "tab:green"), ("pgd_accuracy", "PGD", "tab:red"),
                               ("ibp_verified_accuracy", "IBP-verified", "tab:blue")):
        ax_test.plot([m["epoch"] for m in tests], [100 * m["test"].get(key, nan) for m in tests],
                     marker="o", markersize=4, label=label, color=colour)
    n = tests[-1]["test"].get("n") if tests else None
    ax_test.set_title("test accuracy [%]" + (f" (n={n})" if n else ""))
    ax_test.set_ylim(-2, 102)
    if tests:
        ax_test.legend(fontsize=7)
    for key, label in (("acc_clean", "clean"), ("acc_adv", "adversarial"), ("acc_ibp", "IBP-verified")):
        values = [100 * t[key] if isinstance(t.get(key), (int, float)) else nan for t in train]
        if any(math.isfinite(v) for v in values):
            ax_acc.plot(ep, values, marker="o", markersize=3, label=label)
    ax_acc.set_title("training-batch accuracy [%] (at the training ε)", fontsize=9)
    ax_acc.set_ylim(-2, 102)
    if ax_acc.lines:
        ax_acc.legend(fontsize=7)
    lo, hi = min(ep), max(ep)
    pad = max(0.3, 0.04 * (hi - lo))
    for ax in axes.flat:  # one epoch axis for all panels, whole epochs only
        ax.set_xlabel("epoch")
        ax.set_xlim(lo - pad, hi + pad)
        if hi - lo <= 12:
            ax.set_xticks(list(range(lo, hi + 1)))
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
    notes = run.notes()
    fig.suptitle(f"{run.name} ({run.method})" + (f": {'; '.join(notes)}" if notes else ""), fontsize=10)
    fig.tight_layout()
    out = Path(path)
    _save_png(fig, out)
    plt.close(fig)
    return out


def _safe_filename(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=+-]+", "_", name.replace("/", "__")).strip("_") or "run"


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------

def write_report(paths: Iterable, out_dir, command: Optional[str] = None) -> Dict[str, Any]:
    """Collect runs and write report.md, results.csv, runs.csv, pareto.png and curves/ into ``out_dir``.

    Returns a summary: ``runs``, ``groups``, ``missing`` (run names without any evaluation),
    ``warnings`` (one line each) and ``files`` (paths written).
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CertkdError(f"--out {out} exists and is not a directory; choose another --out")
    if is_run_dir(out) or (out / "checkpoints").is_dir():
        raise CertkdError(f"--out {out} is a run directory; write the report elsewhere (e.g. report/)")
    # `certkd report runs/* --out runs/report` run twice: the glob then names the report itself
    paths_given = [Path(p) for p in paths if not (Path(p).exists() and Path(p).resolve() == out.resolve())]
    runs = collect_runs(paths_given)
    groups = group_runs(runs)
    files: List[Path] = []

    atomic_write_text(out / "results.csv", results_csv(groups))
    atomic_write_text(out / "runs.csv", runs_csv(groups))
    files += [out / "results.csv", out / "runs.csv"]

    datasets = sorted({r.config.dataset for r in runs})
    eps_values = sorted({r.config.eps for r in runs})
    title = f"{', '.join(datasets)}, ε = {', '.join(f'{e:g}' for e in eps_values)}"
    pareto = plot_pareto(groups, out / "pareto.png", title=title)
    if pareto is not None:
        files.append(pareto)
    curves: Dict[str, Path] = {}
    for r in runs:
        p = plot_curves(r, out / "curves" / f"{_safe_filename(r.name)}.png")
        if p is not None:
            curves[r.name] = p
            files.append(p)

    warnings = [f"`{r.name}`: {w}" for r in runs for w in r.warnings]
    not_evaluated = [r for r in runs if r.needs_evaluation]
    if not_evaluated:
        names = ", ".join(f"`{r.name}`" for r in not_evaluated)
        warnings.insert(0, f"not evaluated ({len(not_evaluated)} runs: {names}); `certkd report` does not evaluate, "
                           f"run `{_join(['certkd', 'evaluate'] + [str(r.path) for r in not_evaluated])}` and "
                           "report again")
    if len(eps_values) > 1:
        warnings.append(f"runs use different ε ({', '.join(f'{e:g}' for e in eps_values)}); compare points of the "
                        "Pareto plot at equal ε only")
    missing = [r.name for r in not_evaluated]

    md = [f"# certkd report: {title}", ""]
    md.append(f"{len(runs)} runs in {len(groups)} configurations. Accuracies in % on the test set, "
              "mean ± sample standard deviation over seeds; (k/N): only k of the N seeds have the number.")
    md.append("clean, PGD, IBP: `evaluation.json` (PGD-40; else `verification.json`), on the `n` test points of "
              "that column; CROWN and verified: `verification.json` (complete verifier, incl. its timeouts), on "
              "`n verified` points (a/b: runs measured on different numbers of points); – : not measured. Notes mark "
              "unfinished and collapsed runs, runs trained to a smaller ε than they are evaluated at, and IBP and "
              "verified numbers that come from different test points (then they cannot be compared).")
    md += ["", results_table(groups), ""]
    if pareto is not None:
        md += ["![Clean vs verified accuracy with the Pareto front](pareto.png)", "",
               "*Verified accuracy: complete verifier where `verification.json` exists (filled markers), "
               "else IBP-verified (hollow, a lower bound).* Data: `results.csv` (per configuration), "
               "`runs.csv` (per run).", ""]
    md += ["## What each run's numbers were measured on", "", measured_table(runs), ""]
    if warnings:
        md += ["## Missing and warnings", ""] + [f"- {w}" for w in warnings] + [""]
    if curves:
        links = [f"[{name}](<curves/{p.name}>)" for name, p in curves.items()]
        md += ["## Training curves", "", " · ".join(links), ""]
    md += ["## Commands", "", "Each `certkd train` / `certkd teacher` line resolves to its run's `config.yaml` "
           "exactly (checked when this report was written); teachers come first. Data folders are written relative "
           "to the folder `certkd report` ran in.", "", "```bash"]
    md += reproduce_commands(groups)
    md += ["# this report", command or _join(["certkd", "report"] + [str(p) for p in paths_given] + ["--out", str(out)])]
    md += ["```", ""]
    atomic_write_text(out / "report.md", "\n".join(md))
    files.insert(0, out / "report.md")
    return {"runs": len(runs), "groups": [g.name for g in groups], "missing": missing, "warnings": warnings,
            "files": [str(f) for f in files], "report": str(out / "report.md")}


# --------------------------------------------------------------------------------------------
# Model card and release folder
# --------------------------------------------------------------------------------------------

def _teacher_info(teacher: str) -> Tuple[Optional[str], str]:
    """(method, description) of a teacher path; the method is None when it cannot be read."""
    p = Path(teacher)
    try:
        if is_run_dir(p):
            t = load_run(p)
            ev = t.value("clean_accuracy"), t.value("pgd_accuracy")
            acc = (f"; clean {100 * ev[0]:.1f}%, PGD {100 * ev[1]:.1f}% at ε={t.evaluation.get('eps', t.config.eps):g}"
                   if None not in ev and t.evaluation else "")
            return t.method, f"`{teacher}`: {t.method}, {t.config.model}, trained at ε={t.config.eps:g}{acc}"
        from certkd.checkpoints import resolve_checkpoint

        meta = read_meta(resolve_checkpoint(p))
        method = meta.get("config", {}).get("method")
        return method, f"`{teacher}`: {method or 'unknown method'} ({meta['model'].get('name')})"
    except (CertkdError, OSError, KeyError, TypeError, AttributeError) as e:
        return None, f"`{teacher}` (not readable from here: {e})"


def _parameter_count(spec_dict: Mapping[str, Any]) -> Optional[int]:
    try:
        from certkd.models import ModelSpec, create_model_from_spec

        model = create_model_from_spec(ModelSpec.from_dict(dict(spec_dict)))
        return sum(p.numel() for p in model.parameters())
    except Exception:  # an unknown architecture must not break the card
        return None


def model_card(run, release_dir=None) -> str:
    """Markdown model card of a trained run (architecture, data, ε, method, teacher, metrics, commands)."""
    rec = load_run(run)
    if rec.checkpoint is None or rec.meta is None:
        raise CertkdError(f"{rec.path} has no checkpoint; train it first (certkd train ... --out {rec.path})")
    cfg, meta = rec.config, rec.meta
    spec = meta["model"]
    params = _parameter_count(spec)
    shape = f"{spec.get('in_channels')}×{spec.get('input_size')}×{spec.get('input_size')}"
    md = [f"# Model card: {rec.path.name}", ""]
    md.append(f"A `{spec.get('name')}` classifier trained with **{cfg.method}** on **{meta.get('dataset', cfg.dataset)}** "
              f"for L∞ robustness at **ε = {cfg.eps:g}** (pixel units, inputs in [0, 1]).")
    md += ["", "## Architecture", ""]
    md.append(f"- name: `{spec.get('name')}`" + (f", options {json.dumps(spec.get('kwargs'))}" if spec.get("kwargs") else ""))
    md.append(f"- input: {shape} (channels × height × width), pixel values in [0, 1]; normalisation inside the "
              f"model (mean {spec.get('mean')}, std {spec.get('std')})")
    md.append(f"- classes: {spec.get('num_classes')}")
    md.append(f"- parameters: {params:,}" if params is not None else "- parameters: unknown (architecture not registered)")
    md.append(f"- checkpoint: `{rec.checkpoint.name}` (epoch {rec.epoch} of {cfg.epochs}), weights in safetensors")
    md += ["", "## Data", ""]
    md.append(f"- dataset: `{meta.get('dataset', cfg.dataset)}`" + (f" from `{cfg.data_dir}`" if cfg.data_dir else ""))
    md.append(f"- training: batch size {cfg.batch_size}, augmentation {'on' if cfg.augment else 'off'}")
    md += ["", "## Training", ""]
    md.append(f"- method: `{cfg.method}`, {dict(FAMILIES)[rec.family]}")
    ramp_end = cfg.eps_start + cfg.eps_length - 1
    ramp = (f"ramp from epoch {cfg.eps_start} over {cfg.eps_length} epochs" if cfg.eps_length > 0 else
            f"full ε from epoch {cfg.eps_start}")
    if cfg.eps_length > 0 and ramp_end > cfg.epochs:
        from certkd.schedules import training_eps_reached

        ramp += (f" (**not finished**: ends at epoch {ramp_end}, after the {cfg.epochs} epochs; the training ε "
                 f"reached {training_eps_reached(cfg, cfg.epochs):.4g})")
    md.append(f"- ε = {cfg.eps:g}; training ε × {cfg.train_eps_mul:g}, {ramp}")
    if rec.family in ("certified", "distillation"):
        md.append(f"- α = {cfg.alpha:g}; training attack: PGD-{cfg.attack_steps}, step {cfg.attack_step_size:g}·ρ")
    elif cfg.method != "standard":
        md.append(f"- training attack: PGD-{cfg.attack_steps}, step {cfg.attack_step_size:g}·ρ"
                  + (f", TRADES β = {cfg.trades_beta:g}" if cfg.method == "trades" else ""))
    decays = [m for m in cfg.lr_milestones if m < cfg.epochs]  # the lr decays after epoch m
    lr_text = (f"× {cfg.lr_gamma:g} after epoch{'s' if len(decays) > 1 else ''} {', '.join(map(str, decays))}"
               if decays else "no decay within the epochs")
    md.append(f"- optimiser: {cfg.optimizer}, lr {cfg.lr:g} ({lr_text}), {cfg.epochs} epochs, seed {cfg.seed}")
    teacher_method = None
    if rec.family == "distillation" and cfg.dist_target == "zero":
        md.append("- distillation target: 0 (no teacher; the control of SPEC §10.6)")
        md.append(f"- distillation: β = {cfg.beta:g}, combination `{cfg.dist_combination}`, distance "
                  f"`{cfg.dist_distance}`, reduction `{cfg.dist_reduction}`")
    elif cfg.teacher:
        teacher_method, desc = _teacher_info(cfg.teacher)
        md.append(f"- teacher: {desc}")
        md.append(f"- distillation: β = {cfg.beta:g}, combination `{cfg.dist_combination}`, distance "
                  f"`{cfg.dist_distance}`, reduction `{cfg.dist_reduction}`, feature adapter `{cfg.feature_adapter}`")
    md += ["", "## Metrics", ""]
    rows: List[List[str]] = []
    ev = rec.evaluation
    if ev is not None:
        n, e = ev.get("n"), ev.get("eps", cfg.eps)
        steps = ev.get("attack_steps", 40)
        size = ev.get("attack_step_size", 0.1)
        restarts = ev.get("attack_restarts", 1)
        where = f"`evaluation.json`, {measured_on(ev)}, ε = {e:g}"
        rows.append(["clean accuracy", _pct(ev.get("clean_accuracy")), f"argmax in eval mode; {where}"])
        rows.append(["PGD accuracy", _pct(ev.get("pgd_accuracy")),
                     f"L∞ PGD-{steps}, step {size:g}·ρ (ρ: clipped half-width), {restarts} restart(s), random "
                     f"start, margin-aware early stop; {where}"])
        rows.append(["IBP-verified accuracy", _pct(ev.get("ibp_verified_accuracy")),
                     f"interval bound propagation, correct and lower logit margins > 0; {where}"])
    ver = rec.verification
    if ver is not None:
        st = ver.get("settings") or {}
        n, e = ver.get("n"), st.get("eps", ver.get("eps", cfg.eps))
        where = f"`verification.json`, {measured_on(ver)}, ε = {e:g}"
        rows.append(["clean accuracy (verifier)", _pct(ver.get("clean_accuracy")), where])
        rows.append(["PGD accuracy (verifier)", _pct(ver.get("pgd_accuracy")),
                     f"PGD-{st.get('attack_steps', '?')}, step {st.get('attack_step_size', '?')}·ρ, "
                     f"{st.get('attack_restarts', '?')} restart(s), counterexamples re-checked; {where}"])
        rows.append(["IBP-verified (verifier)", _pct(ver.get("ibp_verified_accuracy")), where])
        rows.append(["CROWN-verified", _pct(ver.get("crown_verified_accuracy")),
                     f"IBP then CROWN (intermediate bounds: {st.get('crown_intermediate', '?')}); {where}"])
        rows.append(["α-CROWN-verified", _pct(ver.get("alpha_crown_verified_accuracy")),
                     f"+ α-CROWN, {st.get('alpha_iterations', '?')} iterations, lr {st.get('alpha_lr', '?')}; {where}"])
        counts = ", ".join(f"{k} {v}" for k, v in (ver.get("counts") or {}).items() if v)
        med = ver.get("median_time_s")
        rows.append(["verified accuracy", _pct(ver.get("verified_accuracy")),
                     f"complete verifier `{st.get('engine', '?')}`, timeout {st.get('timeout', '?')} s per point "
                     f"(timeouts count as not verified)"
                     + (f", median {med:.3g} s per point" if isinstance(med, (int, float)) else "")
                     + (f"; outcomes: {counts}" if counts else "") + f"; {where}"])
    if rows:
        md.append(_markdown_table(["metric", "value", "how it was measured"], rows))
    else:
        md.append(f"Not evaluated yet: run `certkd evaluate {shlex.quote(str(rec.path))}` "
                  f"(and `certkd verify {shlex.quote(str(rec.path))}` for complete verification).")
    if ev is not None and ("attack_steps" not in ev):
        md += ["", "*PGD settings of `evaluation.json` are those of `certkd evaluate` (not recorded in the file).*"]
    if rec.warnings:
        md += ["", "## Caveats", ""] + [f"- {w}" for w in rec.warnings]
    md += ["", "## Reproduce", "", "```bash"]
    if cfg.teacher and teacher_method is not None and is_run_dir(Path(cfg.teacher)):
        t = load_run(cfg.teacher)
        md.append(f"# teacher ({t.method})")
        md.append(train_command(t.config, cfg.teacher, t.preset))
    md.append(train_command(cfg, rec.path, rec.preset))
    md += [c for c in (evaluate_command(rec), verify_command(rec)) if c]
    md.append(f"certkd card {shlex.quote(str(rec.path))}")
    md += ["```", "", "## Use", "", "```python", "import certkd", "",
           f"model = certkd.load_model({str(release_dir or rec.path)!r})  # eval mode, inputs in [0, 1]",
           "logits = model(x)  # x: (N, " + shape.replace("×", ", ") + ")", "```", ""]
    md.append(f"Robustness is certified only for L∞ perturbations of radius ≤ {cfg.eps:g} on test points like the "
              "ones measured above; the numbers say nothing about other threat models or data.")
    md.append("")
    return "\n".join(md)


def _pct(v: Any) -> str:
    return f"{100 * float(v):.1f}%" if isinstance(v, (int, float)) else "–"


def write_card(run, out=None) -> Path:
    """Write the model card (default ``RUN/MODEL_CARD.md``); returns its path."""
    text = model_card(run)
    path = Path(out) if out is not None else Path(run) / "MODEL_CARD.md"
    if path.is_dir():
        path = path / "MODEL_CARD.md"
    atomic_write_text(path, text)
    return path


RELEASE_FILES = ("model.safetensors", "meta.json", "MODEL_CARD.md", "config.yaml", "evaluation.json",
                 "verification.json", "SHA256SUMS")


def make_release(run, out_dir) -> Path:
    """A self-contained folder: weights + meta of the latest checkpoint, model card, config and the
    evaluation/verification summaries. ``certkd.load_model(out_dir)`` loads it. Returns ``out_dir``."""
    rec = load_run(run)
    if rec.checkpoint is None or rec.meta is None:
        raise CertkdError(f"{rec.path} has no checkpoint; train it first")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CertkdError(f"release folder {out} exists and is not a directory; choose another")
    res_out, res_run = out.resolve(), rec.path.resolve()
    if res_out == res_run or res_run / "checkpoints" in (res_out, *res_out.parents):
        raise CertkdError(f"release folder {out} is inside the run {rec.path}; choose a folder outside it")
    meta = {k: v for k, v in rec.meta.items() if k != "optimizer"}  # optimiser state is for resuming only
    meta["release"] = {"source_run": str(rec.path), "checkpoint": rec.checkpoint.name}
    contents: Dict[str, bytes] = {
        "model.safetensors": (rec.checkpoint / "model.safetensors").read_bytes(),
        "meta.json": (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode(),
        "MODEL_CARD.md": model_card(run, release_dir=out).encode(),
        "config.yaml": (rec.path / "config.yaml").read_bytes(),
    }
    for name in ("evaluation.json", "verification.json"):
        src = rec.path / name
        if src.exists() and (name != "verification.json" or rec.verification is not None):
            contents[name] = src.read_bytes()
        elif (out / name).exists():
            (out / name).unlink()  # stale summary from an earlier release
    sums = "".join(f"{hashlib.sha256(data).hexdigest()}  {name}\n" for name, data in sorted(contents.items()))
    contents["SHA256SUMS"] = sums.encode()
    # meta.json goes first and comes back last: a crash never pairs new weights with another run's meta
    if (out / "meta.json").exists():
        (out / "meta.json").unlink()
    order = [n for n in contents if n not in ("model.safetensors", "meta.json")] + ["model.safetensors", "meta.json"]
    for name in order:
        atomic_write_bytes(out / name, contents[name])
    return out
