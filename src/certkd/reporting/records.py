"""The run model: :class:`RunRecord`, :func:`load_run` and :func:`collect_runs` read run directories
(grouping and statistics are in :mod:`certkd.reporting.groups`).
"""
from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from certkd.checkpoints import latest_checkpoint, read_meta, read_tensors
from certkd.config import TrainConfig
from certkd.methods import method_category
from certkd.errors import CertkdError
from certkd.runs import (EVALUATION_FILE, VERIFICATION_FILE, evaluation_path, is_run_dir, metrics_path,
                         read_stored_config, result_warnings, verification_path, verification_rows_path, weights_sha256)

#: (key, label) of the report table, in column order.
REPORT_METRICS = (("clean_accuracy", "clean"), ("pgd_accuracy", "PGD"), ("ibp_verified_accuracy", "IBP"),
                  ("crown_verified_accuracy", "CROWN"), ("verified_accuracy", "verified"))
#: Config keys that do not define a configuration: runs differing only in these are seeds of one group.
GROUP_IGNORED_KEYS = ("seed", "device", "data_dir")
#: Families of methods, in report order: (family id, legend label).
FAMILIES = (("teacher", "teachers (standard / PGD-AT / TRADES)"), ("certified", "CC-IBP family (certified training)"),
            ("distillation", "CC-Dist family (distillation)"), ("other", "other"))
_PRETTY_KEYS = {"beta": "β", "alpha": "α", "eps": "ε", "trades_beta": "β_TRADES", "kd_temperature": "T"}


_REPORT_FAMILY = {"empirical": "teacher", "certified": "certified", "distillation": "distillation"}


def method_family(method: str) -> str:
    """How reports group a method: its registry category (empirical methods train teachers), or "other"."""
    return _REPORT_FAMILY.get(method_category(method), "other")


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


def load_run(path, name: Optional[str] = None) -> RunRecord:
    """Read one run directory (config.yaml, latest checkpoint meta, metrics, evaluation, verification)."""
    p = Path(path)
    if not p.exists():
        raise CertkdError(f"no such run directory: {p}")
    if not is_run_dir(p):
        raise CertkdError(f"{p} is not a certkd run directory (no config.yaml); pass run directories such as runs/*")
    cfg, preset = read_stored_config(p, fix="restore it, or leave this run out of the report")
    rec = RunRecord(path=p, name=name or p.name, config=cfg, preset=preset)
    ck = latest_checkpoint(p)
    if ck is not None:
        try:
            rec.meta = read_meta(ck)
            rec.checkpoint = ck
        except CertkdError as e:
            rec.warnings.append(str(e))
    ev_hint = f"rerun `certkd evaluate {shlex.quote(str(p))}`"
    rec.evaluation = _read_json(evaluation_path(p), rec.warnings, ev_hint)
    ver = _read_json(verification_path(p), rec.warnings, f"rerun `certkd verify {shlex.quote(str(p))}`")
    if ver is not None:
        ver = checked_against_rows(ver, p, rec.warnings)
    if ver is not None:
        if ver.get("complete", True) and ver.get("n", 0):
            rec.verification = ver
        else:
            rec.warnings.append(f"verification incomplete ({ver.get('n', 0)}/{ver.get('n_requested', '?')} points); "
                                f"finish it with `certkd verify {shlex.quote(str(p))} --resume` (same settings)")
    metrics = metrics_path(p)
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
    for name, res in ((EVALUATION_FILE, rec.evaluation), (VERIFICATION_FILE, rec.verification)):
        rec.warnings += [f"{name}: {w}" for w in result_warnings(res or {})]
    if rec.evaluation is not None and rec.epoch is not None and rec.evaluation.get("checkpoint_epoch") not in (
            None, rec.epoch):
        rec.warnings.append(f"evaluation.json is from epoch {rec.evaluation.get('checkpoint_epoch')} but the latest "
                            f"checkpoint is epoch {rec.epoch}; rerun `certkd evaluate {shlex.quote(str(p))}`")
    return rec


# The order in which a disagreement is named: the number of points, then the headline number.
_CHECK_ORDER = ("n", "verified_accuracy", "counts", "crown_verified_accuracy", "alpha_crown_verified_accuracy",
                "ibp_verified_accuracy", "clean_accuracy", "pgd_accuracy", "empirical_robust_accuracy",
                "falsified_by_verifier", "median_time_s", "verified_float_proof")


def _same_number(a: Any, b: Any) -> bool:
    if isinstance(b, dict):  # counts: a status missing from an older summary counts 0
        return isinstance(a, dict) and all(a.get(k, 0) == v for k, v in b.items()) and set(a) <= set(b)
    if a is None or b is None:
        return a is b
    if isinstance(a, bool) or not isinstance(a, (int, float)):
        return False
    return abs(float(a) - float(b)) <= 1e-9 * max(1.0, abs(float(b)))


def checked_against_rows(ver: Dict[str, Any], run: Path, warnings: List[str]) -> Optional[Dict[str, Any]]:
    """A complete ``verification.json`` checked against the per-point rows of ``verification.jsonl``.

    The summary is what ``report`` and ``card`` show, so it must follow from the rows: the numbers are
    recomputed with the verifier's own :func:`certkd.verification.pipeline.summarize_rows`. When they
    disagree (a hand-edited or mixed-up file) the numbers from the rows replace the summary's, with a
    one-line warning; without readable rows the summary is not used. An incomplete summary is returned
    as it is (:func:`load_run` reports it as incomplete and uses none of its numbers).
    """
    if not (ver.get("complete", True) and ver.get("n", 0)):
        return ver
    from certkd.verification.pipeline import ROW_KEYS, read_rows, summarize_rows

    fix = f"rerun `certkd verify {shlex.quote(str(run))} --force`"
    rows_path = verification_rows_path(run)
    if not rows_path.is_file():
        warnings.append(f"verification.json has no verification.jsonl beside it, so its numbers cannot be checked "
                        f"against the per-point results: not used; {fix}")
        return None
    try:
        numbers = summarize_rows(read_rows(rows_path))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        warnings.append(f"verification.jsonl is not a list of verification results ({e}): verification.json not "
                        f"used; {fix}")
        return None
    diff = [k for k in _CHECK_ORDER if k in ROW_KEYS and k in ver and not _same_number(ver[k], numbers[k])]
    if not diff:
        return ver
    k = diff[0]
    shown = {side: (f"{100 * v:.1f}%" if k.endswith("accuracy") and isinstance(v, (int, float)) else
                    json.dumps(v, sort_keys=True) if isinstance(v, dict) else str(v))
             for side, v in (("stored", ver[k]), ("rows", numbers[k]))}
    warnings.append(f"verification.json disagrees with verification.jsonl ({k} {shown['stored']} in the summary, "
                    f"{shown['rows']} from its {numbers['n']} rows): the numbers from the rows are used; {fix}")
    n_req = ver.get("n_requested")
    complete = numbers["n"] == (n_req if isinstance(n_req, int) and not isinstance(n_req, bool) else ver.get("n"))
    return dict(ver, **numbers, complete=complete)


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
    for attr, name, cmd in (("evaluation", EVALUATION_FILE, "evaluate"), ("verification", VERIFICATION_FILE, "verify")):
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


