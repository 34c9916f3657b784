""":func:`model_card` / :func:`write_card` (``certkd card``) and :func:`make_release`: a Markdown
model card for one run and a self-contained release folder that :func:`certkd.load_model` reads.
"""
from __future__ import annotations

import hashlib
import json
import shlex
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

from certkd.checkpoints import atomic_write_bytes, atomic_write_text, read_meta
from certkd.errors import CertkdError
from certkd.reporting.commands import evaluate_command, train_command, verify_command
from certkd.reporting.records import FAMILIES, load_run, measured_on
from certkd.reporting.tables import _markdown_table
from certkd.runs import (CONFIG_FILE, EVALUATION_FILE, VERIFICATION_FILE, VERIFICATION_ROWS_FILE, checkpoints_dir,
                         config_path, is_run_dir)

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
    shape = f"{spec.get('in_channels')}×{spec.get('input_size')}×{spec.get('input_size')}"
    md = [f"# Model card: {rec.path.name}", ""]
    md.append(f"A `{spec.get('name')}` classifier trained with **{cfg.method}** on **{meta.get('dataset', cfg.dataset)}** "
              f"for L∞ robustness at **ε = {cfg.eps:g}** (pixel units, inputs in [0, 1]).")
    md += _architecture_section(rec, spec, shape)
    md += ["", "## Data", ""]
    md.append(f"- dataset: `{meta.get('dataset', cfg.dataset)}`" + (f" from `{cfg.data_dir}`" if cfg.data_dir else ""))
    md.append(f"- training: batch size {cfg.batch_size}, augmentation {'on' if cfg.augment else 'off'}")
    training, teacher_method = _training_section(rec)
    md += training
    md += _metrics_section(rec)
    if rec.warnings:
        md += ["", "## Caveats", ""] + [f"- {w}" for w in rec.warnings]
    md += _reproduce_section(rec, teacher_method)
    md += ["", "## Use", "", "```python", "import certkd", "",
           f"model = certkd.load_model({str(release_dir or rec.path)!r})  # eval mode, inputs in [0, 1]",
           "logits = model(x)  # x: (N, " + shape.replace("×", ", ") + ")", "```", ""]
    md.append(f"Robustness is certified only for L∞ perturbations of radius ≤ {cfg.eps:g} on test points like the "
              "ones measured above; the numbers say nothing about other threat models or data.")
    md.append("")
    return "\n".join(md)


def _architecture_section(rec, spec: Dict[str, Any], shape: str) -> List[str]:
    params = _parameter_count(spec)
    md = ["", "## Architecture", ""]
    md.append(f"- name: `{spec.get('name')}`" + (f", options {json.dumps(spec.get('kwargs'))}" if spec.get("kwargs") else ""))
    md.append(f"- input: {shape} (channels × height × width), pixel values in [0, 1]; normalisation inside the "
              f"model (mean {spec.get('mean')}, std {spec.get('std')})")
    md.append(f"- classes: {spec.get('num_classes')}")
    md.append(f"- parameters: {params:,}" if params is not None else "- parameters: unknown (architecture not registered)")
    md.append(f"- checkpoint: `{rec.checkpoint.name}` (epoch {rec.epoch} of {rec.config.epochs}), weights in safetensors")
    return md


def _training_section(rec) -> Tuple[List[str], Optional[str]]:
    """The card's training lines, and the teacher's method (None without a readable teacher)."""
    cfg = rec.config
    md = ["", "## Training", ""]
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
        md.append("- distillation target: 0 (no teacher; the control of docs/method.md §7.9)")
        md.append(f"- distillation: β = {cfg.beta:g}, combination `{cfg.dist_combination}`, distance "
                  f"`{cfg.dist_distance}`, reduction `{cfg.dist_reduction}`")
    elif rec.family == "distillation" and not cfg.teacher:  # cc-ibp-width: a penalty with no teacher
        md.append(f"- penalty on the student's feature box (no teacher; docs/method.md §7.11): β = {cfg.beta:g}, "
                  f"distance `{cfg.dist_distance}`, reduction `{cfg.dist_reduction}`")
    elif cfg.teacher:
        teacher_method, desc = _teacher_info(cfg.teacher)
        md.append(f"- teacher: {desc}")
        if cfg.dist_target == "class-mean":
            md.append("- distillation target: the teacher's mean feature of each class (docs/method.md §7.10)")
        md.append(f"- distillation: β = {cfg.beta:g}, combination `{cfg.dist_combination}`, distance "
                  f"`{cfg.dist_distance}`, reduction `{cfg.dist_reduction}`, feature adapter `{cfg.feature_adapter}`")
    return md, teacher_method


def _metrics_section(rec) -> List[str]:
    """The metrics table: each number with how and on what it was measured."""
    cfg = rec.config
    md = ["", "## Metrics", ""]
    rows: List[List[str]] = []
    ev = rec.evaluation
    if ev is not None:
        e = ev.get("eps", cfg.eps)
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
    if rec.verification is not None:
        rows += _verification_rows(rec.verification, cfg.eps)
    if rows:
        md.append(_markdown_table(["metric", "value", "how it was measured"], rows))
    else:
        md.append(f"Not evaluated yet: run `certkd evaluate {shlex.quote(str(rec.path))}` "
                  f"(and `certkd verify {shlex.quote(str(rec.path))}` for complete verification).")
    if ev is not None and ("attack_steps" not in ev):
        md += ["", "*PGD settings of `evaluation.json` are those of `certkd evaluate` (not recorded in the file).*"]
    return md


def _verification_rows(ver: Dict[str, Any], default_eps: float) -> List[List[str]]:
    st = ver.get("settings") or {}
    e = st.get("eps", ver.get("eps", default_eps))
    where = f"`verification.json`, {measured_on(ver)}, ε = {e:g}"
    rows = [["clean accuracy (verifier)", _pct(ver.get("clean_accuracy")), where]]
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
    proofs = ver.get("verified_float_proof")
    proofs = (f"; {proofs} verified points with float proof (margins above twice the rounding bound of the "
              f"network as run{', required' if st.get('strict_rounding') is True else ''})"
              if isinstance(proofs, int) and not isinstance(proofs, bool) else "")
    rows.append(["verified accuracy", _pct(ver.get("verified_accuracy")),
                 f"complete verifier `{st.get('engine', '?')}`, timeout {st.get('timeout', '?')} s per point "
                 f"(timeouts count as not verified)"
                 + (f", median {med:.3g} s per point" if isinstance(med, (int, float)) else "")
                 + (f"; outcomes: {counts}" if counts else "") + proofs + f"; {where}"])
    return rows


def _reproduce_section(rec, teacher_method: Optional[str]) -> List[str]:
    cfg = rec.config
    md = ["", "## Reproduce", "", "```bash"]
    if cfg.teacher and teacher_method is not None and is_run_dir(Path(cfg.teacher)):
        t = load_run(cfg.teacher)
        md.append(f"# teacher ({t.method})")
        md.append(train_command(t.config, cfg.teacher, t.preset))
    md.append(train_command(cfg, rec.path, rec.preset))
    md += [c for c in (evaluate_command(rec), verify_command(rec)) if c]
    md.append(f"certkd card {shlex.quote(str(rec.path))}")
    md.append("```")
    return md


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


RELEASE_FILES = ("model.safetensors", "meta.json", "MODEL_CARD.md", CONFIG_FILE, EVALUATION_FILE, VERIFICATION_FILE,
                 VERIFICATION_ROWS_FILE, "SHA256SUMS")


def make_release(run, out_dir) -> Path:
    """A self-contained folder: weights + meta of the latest checkpoint, model card, config and the
    evaluation/verification summaries (with the verification's per-point rows). ``certkd.load_model(out_dir)`` loads it. Returns ``out_dir``."""
    rec = load_run(run)
    if rec.checkpoint is None or rec.meta is None:
        raise CertkdError(f"{rec.path} has no checkpoint; train it first")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CertkdError(f"release folder {out} exists and is not a directory; choose another")
    res_out, res_run = out.resolve(), rec.path.resolve()
    if res_out == res_run or checkpoints_dir(res_run) in (res_out, *res_out.parents):
        raise CertkdError(f"release folder {out} is inside the run {rec.path}; choose a folder outside it")
    meta = {k: v for k, v in rec.meta.items() if k != "optimizer"}  # optimiser state is for resuming only
    meta["release"] = {"source_run": str(rec.path), "checkpoint": rec.checkpoint.name}
    contents: Dict[str, bytes] = {
        "model.safetensors": (rec.checkpoint / "model.safetensors").read_bytes(),
        "meta.json": (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode(),
        "MODEL_CARD.md": model_card(run, release_dir=out).encode(),
        CONFIG_FILE: config_path(rec.path).read_bytes(),
    }
    for name in (EVALUATION_FILE, VERIFICATION_FILE, VERIFICATION_ROWS_FILE):
        src = rec.path / name
        if src.exists() and (name == EVALUATION_FILE or rec.verification is not None):
            contents[name] = src.read_bytes()
        elif (out / name).exists():
            (out / name).unlink()  # stale summary from an earlier release
    if VERIFICATION_FILE in contents and json.loads(contents[VERIFICATION_FILE]) != rec.verification:
        # the summary disagreed with its rows (load_run warned): release the one recomputed from the rows
        contents[VERIFICATION_FILE] = (json.dumps(rec.verification, indent=2, sort_keys=True) + "\n").encode()
    sums = "".join(f"{hashlib.sha256(data).hexdigest()}  {name}\n" for name, data in sorted(contents.items()))
    contents["SHA256SUMS"] = sums.encode()
    # meta.json goes first and comes back last: a crash never pairs new weights with another run's meta
    if (out / "meta.json").exists():
        (out / "meta.json").unlink()
    order = [n for n in contents if n not in ("model.safetensors", "meta.json")] + ["model.safetensors", "meta.json"]
    for name in order:
        atomic_write_bytes(out / name, contents[name])
    return out
