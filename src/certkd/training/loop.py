"""The training loop, shared by teachers and students.

config → data → model (+ teacher) → per-batch loss (:mod:`certkd.training.step`) →
optimizer → per-epoch evaluation → atomic checkpoint. ``resume=True`` continues from the
last complete checkpoint with the optimiser and RNG state restored, so an interrupted run
ends with the same weights as an uninterrupted one.

Started by ``torchrun`` (``WORLD_SIZE`` > 1), every process runs :func:`train` on its slice
of each global batch (``batch_size`` is the global batch) with sync BatchNorm, global loss
means and averaged gradients, so the result equals one process up to float rounding; only
rank 0 writes the run directory and evaluates (design: :mod:`certkd.distributed`). TF32 is
off unless ``allow_tf32``, AMP is for empirical methods only (:mod:`certkd.precision`).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from certkd import distributed, precision
from certkd.attacks import PGD
from certkd.checkpoints import (append_jsonl, atomic_write_text, disk_full, latest_checkpoint, load_model,
                                load_weights, optimizer_from_tensors, read_meta, read_tensors, save_checkpoint)
from certkd.config import EMPIRICAL_METHODS, TrainConfig
from certkd.data import iterate_batches, load_dataset, num_batches
from certkd.errors import CertkdError
from certkd.methods import method_class
from certkd.models import create_model, ibp_initialize
from certkd.runs import (clear_run_dir, ensure_writable_dir, first_missing, lock_run_dir, metrics_path, read_config,
                         resolve_device, run_entries, write_config)
from certkd.schedules import SmoothedEpsilonSchedule, multistep_lr
from certkd.training.allocator import keep_freed_memory
from certkd.training.monitor import NonFiniteError, StepMonitor, gradient_norms
from certkd.training.step import Teacher, training_loss
from certkd.training.teacher_stats import teacher_feature_stats
from certkd.verification import evaluate_accuracy


#: How the run-directory errors name the options: as flags of ``certkd train`` or as arguments of ``train()``.
_HINTS = {"cli": {"resume": "--resume", "force": "--force", "out": "--out"},
          "python": {"resume": "resume=True", "force": "force=True", "out": "out_dir"}}


def prepare_run_dir(out: Path, resume: bool, force: bool, check_only: bool = False, hints: str = "cli") -> None:
    """Refuse to overwrite a run by accident; --force starts afresh, --resume continues.

    ``check_only`` raises the same errors without touching the disk: training checks first,
    loads data, model and teacher, and only then deletes a run it was told to --force over,
    so a typo in another flag never costs the old run. ``hints``: "cli" names the fixes as
    command-line flags (--resume), "python" as arguments of :func:`train` (resume=True).
    """
    h = _HINTS.get(hints, _HINTS["cli"])
    if resume and force:
        raise CertkdError(f"{h['resume']} and {h['force']} contradict each other; pass only one")
    if out.exists() and not out.is_dir():
        raise CertkdError(f"output path {out} exists and is not a directory; choose another {h['out']}")
    if resume:
        if latest_checkpoint(out) is None:
            raise CertkdError(f"{h['resume']}: no checkpoint in {out}; start a new run without {h['resume']}")
        return
    if run_entries(out):  # the lock file of this writer is not content
        if not force:
            raise CertkdError(f"output directory {out} already exists; pass {h['resume']} to continue it or "
                              f"{h['force']} to overwrite" + (" (or choose another out_dir)" if hints == "python" else ""))
        if check_only:
            return
        clear_run_dir(out)  # not rmtree: the lock file stays until this writer releases it
    ensure_writable_dir(out, create=not check_only, probe=True)


def _create_run_dir(out: Path, force: bool, state: Dict[str, Any], hints: str = "cli") -> None:
    """prepare_run_dir for a new run, noting in ``state["created"]`` what to remove should the run fail
    before its first checkpoint: the topmost folder this call (or its run lock) creates (``out`` itself
    when --force replaces a run), or None for an empty folder that already existed."""
    lock = state.get("lock")
    if lock is not None and lock.created is not None:
        state["created"] = lock.created
    else:
        state["created"] = (out if run_entries(out) else None) if out.exists() else first_missing(out)
    prepare_run_dir(out, False, force, hints=hints)


def load_teacher(cfg: TrainConfig, student: nn.Module, device: torch.device) -> Optional[Teacher]:
    """Load and freeze the teacher of a distillation method; check it fits the student.

    None for non-distillation methods and for ``dist_target: zero`` (the no-teacher control).
    With ``feature_adapter: linear`` the adapter maps the *student's* features to the teacher's
    (``nn.Linear(m_S, m_T)``), trained with the student; the teacher's target stays fixed.
    """
    if not method_class(cfg.method).needs_teacher or cfg.dist_target == "zero":
        return None
    model = load_model(cfg.teacher, device=device)
    for p in model.parameters():
        p.requires_grad_(False)
    if model.num_classes != student.num_classes:
        raise CertkdError(f"teacher {cfg.teacher} predicts {model.num_classes} classes but the student "
                          f"{student.num_classes}; use a teacher trained on the same dataset")
    adapter = None
    if cfg.method != "cc-ibp-kd" and model.feature_dim != student.feature_dim:
        if cfg.feature_adapter != "linear":
            raise CertkdError(f"teacher features have {model.feature_dim} dimensions but student features have "
                              f"{student.feature_dim}; pass --feature-adapter linear or use a teacher with matching features")
    if cfg.feature_adapter == "linear" and cfg.method != "cc-ibp-kd":
        adapter = nn.Linear(student.feature_dim, model.feature_dim).to(device)
    return Teacher(model=model, adapter=adapter)


def _batchnorm_drop_last(model: nn.Module, cfg: TrainConfig, n: int, log: Callable[[str], None]) -> bool:
    """Whether to drop the last (global) batch of every epoch: for a BatchNorm model when it holds a
    single point, as BatchNorm (and its IBP batch statistics) cannot normalise one sample."""
    bn = next((m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)), None)
    if bn is None:
        return False
    if cfg.batch_size < 2:
        raise CertkdError(f"batch_size 1 cannot train {cfg.model}: its BatchNorm layers need at least 2 points per "
                          "batch; pass --batch-size 2 or more, or a model without BatchNorm (mlp, cnn-small)")
    if n < 2:
        raise CertkdError(f"{cfg.model} has BatchNorm layers, which need at least 2 training points per batch, but "
                          f"the training set has {n}; raise train_limit to 2 or more")
    if n % cfg.batch_size == 1:
        log(f"note: {n} training points leave a last batch of 1 point, which BatchNorm cannot normalise; it is "
            "skipped every epoch (a different point each epoch)")
        return True
    return False


def _make_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def _clip_gradients(params, max_norm: float) -> Tuple[torch.Tensor, List[int]]:
    """Per-parameter gradient norms and the indices they belong to (:func:`gradient_norms`); clips to
    ``max_norm`` when > 0, with ``clip_grad_norm_``'s arithmetic and no read-back to the host. A non-finite
    norm scales the gradients by NaN; the :class:`StepMonitor` then stops the run before any checkpoint.
    """
    norms, total, present = gradient_norms(params)
    if max_norm > 0 and present:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return norms, present


def train(cfg: TrainConfig, out_dir, *, resume: bool = False, force: bool = False, progress: bool = True,
          log: Callable[[str], None] = print, tensorboard: bool = False, hints: str = "python",
          on_epoch: Optional[Callable[[Dict[str, Any]], None]] = None) -> Path:
    """Train a model as ``cfg`` says and write the run to ``out_dir``; returns the run directory.

    Args:
        resume: continue the run in ``out_dir`` from its last checkpoint (its stored config wins).
        force: replace an existing run in ``out_dir``.
        progress: a tqdm bar per epoch (``log`` gets one line per epoch either way).
        tensorboard: also write the metrics.jsonl scalars to ``out_dir/tensorboard`` (needs the
            ``tensorboard`` extra: :mod:`certkd.training.tblog`).
        hints: how errors name the fixes: "python" (``resume=True``) or "cli" (``--resume``).
        on_epoch: called by the writing process with each epoch's metrics record once its checkpoint is
            saved (``certkd tune`` reports the validation metrics to its pruner there); what it raises
            ends training with that checkpoint kept.

    Under torchrun every process calls this (see :mod:`certkd.distributed`). The TF32 flags
    are set from ``cfg.allow_tf32`` for the run and restored on return.

    The writing process (rank 0) holds the run directory's lock (:func:`certkd.runs.lock_run_dir`) from
    its first check to its last write: a second writer into ``out_dir`` gets one line naming this one.
    """
    saved = precision.tf32_flags()
    state: Dict[str, Any] = {}  # what _train created ("created"), its process group ("dctx"), the lock ("lock")
    try:
        with ExitStack() as stack:
            if os.environ.get("RANK", "0") == "0":  # only rank 0 writes the run directory
                state["lock"] = stack.enter_context(lock_run_dir(out_dir, "certkd train", _HINTS.get(
                    hints, _HINTS["cli"])["out"]))
            try:
                return _train(cfg, out_dir, resume=resume, force=force, progress=progress, log=log, state=state,
                              tensorboard=tensorboard, hints=hints, on_epoch=on_epoch)
            except BaseException as e:
                out = Path(out_dir)
                ckpt = _discard_unsaved_run(out, state)
                full = disk_full(e) if isinstance(e, Exception) else None
                if full is None:
                    raise
                kept = (f"the checkpoint of epoch {ckpt.name.split('-')[-1].lstrip('0') or '0'} is intact; free "
                        "space and rerun with --resume, or choose another --out" if ckpt is not None else
                        "nothing was saved; free space or choose another --out")
                raise CertkdError(f"disk full while writing the run {out} ({full.strerror}): {kept}") from None
    finally:
        precision.set_tf32_flags(*saved)
        distributed.shutdown(state.get("dctx"))


def _discard_unsaved_run(out: Path, state: Dict[str, Any]) -> Optional[Path]:
    """After a failed run: remove what this call created in ``out`` if no checkpoint was ever saved
    (no stub folder is left behind); returns the run's latest checkpoint (None: there is none)."""
    try:
        ckpt = latest_checkpoint(out)
    except CertkdError:
        return None
    if ckpt is not None or "created" not in state:  # a saved checkpoint, or nothing created by this call
        return ckpt
    root = state["created"]
    lock = state.get("lock")
    try:
        if root is not None and lock is None:
            shutil.rmtree(root, ignore_errors=True)
        elif out.is_dir():  # the lock file stays until its holder releases it
            clear_run_dir(out)
            if root is not None:  # the lock removes the emptied folders on release
                lock.created = root
    except OSError:
        pass
    return None


def _train(cfg: TrainConfig, out_dir, *, resume: bool, force: bool, progress: bool,
           log: Callable[[str], None], state: Optional[Dict[str, Any]] = None, tensorboard: bool = False,
           hints: str = "python", on_epoch: Optional[Callable[[Dict[str, Any]], None]] = None) -> Path:
    cfg.validate()
    out = Path(out_dir)
    if tensorboard:
        from certkd.training.tblog import summary_writer_class

        summary_writer_class()  # a missing package fails now, before any work
    if resume:  # read-only checks, done on every rank; the stored config wins: a resumed run must be the same run
        prepare_run_dir(out, resume, force, hints=hints)
        cfg = _stored_config(out)
    dctx = distributed.setup(cfg.device)  # None in a single process
    if state is not None:
        state["dctx"] = dctx  # train() leaves the process group on the way out
    world, rank = (dctx.world_size, dctx.rank) if dctx is not None else (1, 0)
    main = rank == 0
    if not main:  # rank 0 logs and writes; the others compute
        log, progress = (lambda s: None), False
    if cfg.batch_size % world:
        raise CertkdError(f"batch_size {cfg.batch_size} is the global batch and must be a multiple of the "
                          f"{world} processes; use --batch-size {cfg.batch_size // world * world or world}")
    if not resume:
        prepare_run_dir(out, resume, force, check_only=True, hints=hints)
    device = dctx.device if dctx is not None else resolve_device(cfg.device)
    precision.set_tf32_flags(cfg.allow_tf32, cfg.allow_tf32)
    if cfg.amp and device.type != "cuda":
        log("note: amp has no effect on CPU; training runs in float32")
    torch.manual_seed(cfg.seed)
    keep_freed_memory()  # steps reuse their pages (same numbers, less page faulting: allocator.py)

    train_set, test_set, info = load_dataset(cfg.dataset, cfg.data_dir)
    val_set = None
    if cfg.val_fraction > 0:  # held out before train_limit samples, so it is never trained on
        try:
            train_set, val_set = train_set.split_validation(cfg.val_fraction)
        except ValueError as e:
            raise CertkdError(f"val_fraction: {e}; choose a fraction that leaves points on both sides") from None
    if cfg.train_limit is not None:  # fixed seed 0, not cfg.seed: every run/seed sees the same points
        train_set = train_set.sample(cfg.train_limit, seed=0)
    model = create_model(cfg.model, info.in_channels, info.input_size, info.num_classes, info.mean, info.std,
                         **cfg.model_kwargs)
    drop_last = _batchnorm_drop_last(model, cfg, len(train_set), log)
    if cfg.ibp_init:
        ibp_initialize(model)
    model.to(device)
    if dctx is not None:
        distributed.convert_batchnorm(model)  # batch statistics of the global batch
    if cfg.compile:  # in place: the state dict and the checkpoints are those of the plain model
        model.compile()
    with torch.random.fork_rng(devices=[]):  # loading a teacher must not change the student's random stream
        teacher = load_teacher(cfg, model, device)
    if teacher is not None and teacher.model.spec.input_size != info.input_size:
        raise CertkdError(f"teacher expects {teacher.model.spec.input_size}×{teacher.model.spec.input_size} inputs "
                          f"but {cfg.dataset} has {info.input_size}×{info.input_size}; use a teacher of this dataset")
    if teacher is not None and (cfg.dist_distance == "standardized" or cfg.dist_target == "class-mean"):
        with torch.random.fork_rng(devices=[]):  # docs/method.md §7.4, §7.10: once, over the training set
            teacher.stats = teacher_feature_stats(teacher.model, train_set, info.num_classes, device,
                                                  cfg.eval_batch_size)
    if not resume:  # everything loaded: only now may --force replace the old run
        distributed.on_main(dctx, lambda: _create_run_dir(out, force, {} if state is None else state, hints))
    params = list(model.parameters()) + (list(teacher.adapter.parameters()) if teacher and teacher.adapter else [])
    optimizer = _make_optimizer(cfg, params)

    steps_per_epoch = num_batches(len(train_set), cfg.batch_size, drop_last)
    schedule = SmoothedEpsilonSchedule(cfg.eps, cfg.eps_start, cfg.eps_length, steps_per_epoch)
    attack = PGD(cfg.attack_steps, cfg.attack_step_size, cfg.attack_restarts, amp=cfg.amp)
    model_meta = {"model": model.spec.to_dict(), "config": cfg.to_dict(), "dataset": info.name}

    start_epoch = 1
    if resume:
        ckpt = latest_checkpoint(out)
        meta = read_meta(ckpt)
        load_weights(model, ckpt / "model.safetensors")
        tensors = read_tensors(ckpt / "optimizer.safetensors")
        extra = {k[len("extra."):]: v for k, v in tensors.items() if k.startswith("extra.")}
        optimizer_from_tensors(optimizer, {k: v for k, v in tensors.items() if not k.startswith("extra.")},
                               meta["optimizer"])
        if teacher is not None and teacher.adapter is not None:
            _load_adapter(teacher.adapter, extra, out)
        torch.set_rng_state(extra["rng_cpu"])
        if device.type == "cuda" and "rng_cuda" in extra:
            torch.cuda.set_rng_state(extra["rng_cuda"])
        start_epoch = int(meta["epoch"]) + 1
        metrics = metrics_path(out)
        if main and metrics.exists():
            kept = [l for l in metrics.read_text().splitlines() if _epoch_of(l) is not None and _epoch_of(l) < start_epoch]
            atomic_write_text(metrics, "".join(l + "\n" for l in kept))
        log(f"resuming {out} from epoch {meta['epoch']}")
    elif main:
        write_config(out, cfg)
    distributed.broadcast_module(dctx, model, teacher.adapter if teacher is not None else None)
    tb = None
    if tensorboard and main:
        from certkd.training.tblog import TensorBoardLog

        tb = TensorBoardLog(out, purge_step=start_epoch if resume else None)
    try:
        _epochs(cfg, out, model, teacher, optimizer, params, schedule, attack, model_meta, train_set, test_set, info,
                drop_last, steps_per_epoch, start_epoch, device, dctx, world, rank, main, progress, log, tb,
                val_set=val_set, on_epoch=on_epoch)
    finally:
        if tb is not None:
            tb.close()
    return out


def _epochs(cfg, out, model, teacher, optimizer, params, schedule, attack, model_meta, train_set, test_set, info,
            drop_last, steps_per_epoch, start_epoch, device, dctx, world, rank, main, progress, log, tb,
            val_set=None, on_epoch=None) -> None:
    """The epochs start_epoch..cfg.epochs of :func:`_train` (one record, checkpoint and log line each;
    the validation split, when there is one, is evaluated every epoch)."""
    for epoch in range(start_epoch, cfg.epochs + 1):
        lr = multistep_lr(cfg.lr, epoch, cfg.lr_milestones, cfg.lr_gamma)
        for group in optimizer.param_groups:
            group["lr"] = lr
        reg_active = epoch <= schedule.ramp_end_epoch()
        model.train()
        names = {id(p): n for n, p in model.named_parameters()}
        monitor = StepMonitor(epoch, [names.get(id(p), "the feature adapter") for p in params],
                              lambda what, e=epoch: _nonfinite_fix(e, what))
        start = time.perf_counter()
        batches = iterate_batches(train_set, cfg.batch_size // world, shuffle=True, seed=cfg.seed * 1000 + epoch,
                                  augmentation=info.augmentation if cfg.augment else "none",
                                  crop_padding=info.crop_padding, drop_last=drop_last, rank=rank, world_size=world,
                                  device=device)
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(batches, total=steps_per_epoch, desc=f"epoch {epoch}/{cfg.epochs}", leave=False,
                       dynamic_ncols=True)
            batches = bar
        for i, (x, y) in enumerate(batches):
            q = (epoch - 1) * steps_per_epoch + i
            eps_sched = schedule(q)
            n_global = min(cfg.batch_size, len(train_set) - i * cfg.batch_size)
            # the step's shard goes to the losses and attack; its sync BN modules hold it for the step
            with distributed.sharded_batch(dctx, x.shape[0], n_global, model) as shard, \
                    precision.autocast(cfg.amp and cfg.method in EMPIRICAL_METHODS, device):  # bounds: never
                loss, logs = training_loss(model, x, y, cfg, eps_sched, reg_active, attack, teacher, shard=shard)
            logs = distributed.reduce_logs(dctx, logs, x.shape[0], n_global)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            distributed.average_gradients(dctx, params)
            norms = _clip_gradients(params, cfg.grad_clip)
            optimizer.step()
            if monitor.record(i, q, loss, norms, logs) and bar is not None:
                _show(bar, monitor.last)
        monitor.flush()  # before anything of this epoch is written
        if bar is not None:
            bar.close()
        record: Dict[str, Any] = {"epoch": epoch, "lr": lr, "time_s": round(time.perf_counter() - start, 3),
                                  "train": monitor.means()}
        if not main:  # rank 0 evaluates and writes; the others wait for it
            distributed.barrier(dctx)
            continue
        if epoch % cfg.test_interval == 0 or epoch == cfg.epochs:
            with precision.tf32(False):  # reported IBP-verified accuracy: sound bounds only
                record["test"] = evaluate_accuracy(model, test_set, cfg.eps, limit=cfg.eval_limit,
                                                   batch_size=cfg.eval_batch_size,
                                                   attack_steps=cfg.test_attack_steps,
                                                   attack_step_size=cfg.test_attack_step_size, device=device,
                                                   seed=cfg.seed)
        if val_set is not None:
            with precision.tf32(False):
                record["val"] = evaluate_accuracy(model, val_set, cfg.eps, limit=cfg.eval_limit,
                                                  batch_size=cfg.eval_batch_size, attack_steps=cfg.test_attack_steps,
                                                  attack_step_size=cfg.test_attack_step_size, device=device,
                                                  seed=cfg.seed)
        extra = {"rng_cpu": torch.get_rng_state()}
        if device.type == "cuda":
            extra["rng_cuda"] = torch.cuda.get_rng_state()
        if teacher is not None and teacher.adapter is not None:
            extra.update({f"{_ADAPTER_KEY}{k}": v for k, v in teacher.adapter.state_dict().items()})
        # metrics first: a crash before the checkpoint is undone on resume (lines past the checkpoint are dropped)
        append_jsonl(metrics_path(out), record)
        save_checkpoint(out, epoch, model, model_meta, optimizer, extra)
        if tb is not None:
            tb.write(record)
        log(_epoch_line(record))
        distributed.barrier(dctx)
        if on_epoch is not None:
            on_epoch(record)


# Checkpoint key prefix of the student-side feature adapter (student → teacher features). Older runs stored
# a teacher-side adapter (teacher → student) under "adapter."; it maps the other way and is not loaded.
_ADAPTER_KEY = "student_adapter."


def _load_adapter(adapter: nn.Module, extra: Dict[str, torch.Tensor], out: Path) -> None:
    state = {k[len(_ADAPTER_KEY):]: v for k, v in extra.items() if k.startswith(_ADAPTER_KEY)}
    if not state:
        old = any(k.startswith("adapter.") for k in extra)
        why = ("it was written by an older certkd whose feature adapter sat on the teacher's side"
               if old else "its checkpoint holds no feature adapter")
        raise CertkdError(f"--resume: cannot resume {out} with --feature-adapter linear: {why}; "
                          "start afresh with --force")
    adapter.load_state_dict(state)


def _show(bar, last: Dict[str, float]) -> None:
    """The progress bar's figures, refreshed at each read-back (never a read-back of its own)."""
    bar.set_postfix(loss=f"{last['loss']:.3f}", eps=f"{last.get('eps', 0.0):.4f}",
                    acc=f"{last.get('acc_clean', float('nan')):.2f}")


def _nonfinite_fix(epoch: int, what: str) -> str:
    """The fix after a NaN/Inf: --resume only when a checkpoint exists (every epoch before this one saved one)."""
    if epoch > 1:
        return f"the last good checkpoint is kept; {what}, then rerun with --resume"
    return (f"no checkpoint was saved yet (it failed in the first epoch), so there is nothing to resume; {what} "
            "(e.g. --lr a tenth of the current one) and rerun the command")


def _stored_config(out: Path) -> TrainConfig:
    """The config.yaml of a run being resumed, with a one-line error when it is missing or broken."""
    try:
        cfg = read_config(out, fix="restore it, or start afresh with --force")
    except CertkdError as e:
        raise CertkdError(f"--resume: {e}") from None
    return cfg.validate()


def _epoch_of(line: str) -> Optional[int]:
    try:
        return int(json.loads(line)["epoch"])
    except (ValueError, KeyError, TypeError):
        return None  # a torn line


def _epoch_line(record: Dict[str, Any]) -> str:
    tr = record["train"]
    line = f"epoch {record['epoch']}: loss {tr.get('loss', float('nan')):.4f} eps {tr.get('eps', 0.0):.4f} " \
           f"({record['time_s']:.1f}s)"
    for split in ("val", "test"):
        if split in record:
            t = record[split]
            line += (f" | {split} clean {t['clean_accuracy']:.3f} pgd {t['pgd_accuracy']:.3f} "
                     f"ibp-verified {t['ibp_verified_accuracy']:.3f}")
    return line
