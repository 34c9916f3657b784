"""What made each result: the commit (and whether the tree was dirty), the config hash, the weights hash.

Each run folder gets ``study.json``: one event per stage the study ran on it (train, validate, test,
teacher-eval) with the commit of that moment, and the run's config and weights hashes. A report
gathers the events of every result it uses and refuses to mix commits unless told to.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional

from study.planner import StudyError

ROOT = Path(__file__).resolve().parents[2]


def git_state(repo: Path = ROOT) -> Dict[str, Any]:
    """``{"commit": HEAD sha, "dirty": bool}``; dirty when tracked files differ from HEAD or untracked
    files are present (ignored files such as runs/ do not count). Commit "unknown" outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True)
        status = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True,
                                check=True)
    except (OSError, subprocess.CalledProcessError):
        return {"commit": "unknown", "dirty": True}
    return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip())}


def provenance_key(event: Mapping[str, Any]) -> str:
    """The commit a result is attributed to: ``sha`` or ``sha+dirty`` (a dirty tree is another code)."""
    return str(event["commit"]) + ("+dirty" if event.get("dirty") else "")


def run_weights_sha256(run: Path) -> Optional[str]:
    """certkd.runs.weights_sha256 of the run's latest checkpoint (None without one)."""
    from certkd.checkpoints import latest_checkpoint, read_tensors
    from certkd.runs import weights_sha256

    ck = latest_checkpoint(run) if run.exists() else None
    return None if ck is None else weights_sha256(read_tensors(ck / "model.safetensors"))


def config_sha256(cfg: Mapping[str, Any]) -> str:
    """SHA-256 of a config dict (canonical JSON). A teacher path is replaced by that teacher's weights
    hash, and data_dir is left out: moving the study or the data folder leaves the hash alone."""
    d = dict(cfg)
    d.pop("data_dir", None)
    if d.get("teacher"):
        d["teacher"] = "weights:" + str(run_weights_sha256(Path(d["teacher"])))
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def read_record(run: Path) -> Dict[str, Any]:
    path = run / "study.json"
    return json.loads(path.read_text()) if path.exists() else {"events": []}


def record(run: Path, stage: str, cfg: Optional[Mapping[str, Any]] = None, **extra: Any) -> Dict[str, Any]:
    """Append one stage event (now, this commit) to ``run/study.json``, with the weights hash and, when
    given, the config hash; returns the record."""
    from certkd.checkpoints import atomic_write_json

    rec = read_record(run)
    event = {"stage": stage, **git_state(), "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **extra}
    rec["events"].append(event)
    rec["weights_sha256"] = run_weights_sha256(run)
    if cfg is not None:
        rec["config_sha256"] = config_sha256(cfg)
    atomic_write_json(run / "study.json", rec)
    return rec


def commits_of(records: Iterable[Mapping[str, Any]]) -> Dict[str, int]:
    """How many stage events each commit key made, over ``records`` (study.json contents)."""
    out: Dict[str, int] = {}
    for rec in records:
        for e in rec.get("events", []):
            k = provenance_key(e)
            out[k] = out.get(k, 0) + 1
    return out


def check_one_commit(records: List[Mapping[str, Any]], allow_mixed: bool) -> Dict[str, int]:
    """The commits behind ``records``; raises StudyError when there is more than one (or a result without
    any event) unless ``allow_mixed``."""
    commits = commits_of(records)
    missing = sum(1 for r in records if not r.get("events"))
    if missing and not allow_mixed:
        raise StudyError(f"{missing} result(s) carry no study.json events (made outside this script): rerun them, "
                         "or pass --allow-mixed and the report will say so")
    if len(commits) > 1 and not allow_mixed:
        shown = ", ".join(f"{k[:12]}{'+dirty' if k.endswith('+dirty') else ''} ({n})" for k, n in commits.items())
        raise StudyError(f"results come from {len(commits)} commits: {shown}; rerun them under one commit, or pass "
                         "--allow-mixed and the report will say so")
    return commits


def require_clean_for_claims(state: Mapping[str, Any], allow_dirty: bool) -> None:
    """Refuse to start runs from a dirty tree: the commit would not name the code that made them."""
    if state.get("dirty") and not allow_dirty:
        raise StudyError("the working tree has uncommitted changes: commit them first (a result must name the commit "
                         "that made it), or pass --allow-dirty for a trial that no report will accept without "
                         "--allow-mixed")
