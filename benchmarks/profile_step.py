"""Where the time of one certified training step goes: a per-phase breakdown (issue #20).

One step is what ``bench_step.py`` times (``training_loss`` + backward + gradient clipping + the
optimiser step, as ``certkd.training.loop`` does it), for CC-IBP and CC-Dist (frozen teacher of
the same architecture), in the robust phase (ε_s = ε) with the regularisers off
(``reg_active=False``, the bulk of training) and on (``reg_active=True``, the ε ramp).

Phases are wall-clock timers around the functions of the step, installed by wrapping them from
outside (nothing in ``src/`` is instrumented, so the step is the one that trains); a timer
inside another counts towards its own row only (exclusive times, summing to the step):

* ``attack`` (PGD, eval mode: its forward and input-gradient backward), ``clean forward``
  (train mode; BN running statistics, clean accuracy), ``teacher forward`` (CC-Dist only);
* ``IBP pass`` (the train-mode point+box pass, ``adversarial_pass``) with ``BN statistics``
  (the point's batch statistics and its BN forward inside that pass) split out;
* ``robust loss`` (logit-difference loss), ``distance`` (CC-Dist term), ``regulariser``
  (warm-up regulariser and δ0), ``l1 penalty``, ``other loss glue`` (the rest of
  ``training_loss``: head, logit differences, logged numbers);
* ``backward`` (one ``loss.backward()``, all phases' gradients together), ``grad clip``,
  ``optimiser`` (Adam step incl. ``zero_grad``).

Each figure is the median over ``--repeats`` steps after ``--warmup`` steps; the two methods'
steps alternate. Timer overhead is one ``perf_counter`` pair per wrapped call (a few µs per step).

Usage::

    python benchmarks/profile_step.py --quick            # cnn7-w16, 64x1x28x28, 1 thread (about a minute)
    python benchmarks/profile_step.py                    # the full grid below (long: CNN7 at batch 256)
    python benchmarks/profile_step.py --configs cnn7-w16:1:28 --batches 64,256 --threads-list 1,2

Grid (default): cnn7-w16 at MNIST shape (1x28x28) and CIFAR shape (3x32x32), cnn7 at CIFAR
shape; batch 64 and 256; 1 and 2 threads. Writes ``benchmarks/results/profile_step[_<tag>].{md,json}``.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as _dt
import functools
import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Dict, List

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, os.environ.get("CERTKD_SRC") or str(ROOT / "src"))

import certkd  # noqa: E402
import certkd.graph.layers.batchnorm as _bn  # noqa: E402
import certkd.losses.certified as _cert  # noqa: E402
import certkd.methods._parts as _parts  # noqa: E402
from certkd.attacks import PGD  # noqa: E402
from certkd.checkpoints import atomic_write_json, atomic_write_text  # noqa: E402
from certkd.config import TrainConfig  # noqa: E402
from certkd.methods import method_class  # noqa: E402
from certkd.models import create_model, ibp_initialize  # noqa: E402
from certkd.training.loop import _clip_gradients, _make_optimizer  # noqa: E402

try:  # what certkd.training.loop.train sets up per process (trees before issue #20 have no such step)
    from certkd.training.allocator import keep_freed_memory
except ImportError:  # pragma: no cover - baseline trees
    def keep_freed_memory() -> bool:
        return False
from certkd.training.step import Teacher, training_loss  # noqa: E402

PHASES = ["attack", "clean forward", "teacher forward", "IBP pass", "BN statistics", "robust loss", "distance",
          "regulariser", "l1 penalty", "other loss glue", "backward", "grad clip", "optimiser"]
FULL_GRID = ["cnn7-w16:1:28", "cnn7-w16:3:32", "cnn7:3:32"]


class Phases:
    """Nested wall-clock timers; ``self.excl[name]`` collects exclusive seconds per step."""

    def __init__(self):
        self.stack: List[list] = []  # [name, start, children's time]
        self.excl: Dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def timed(self, name: str):
        self.start(name)
        try:
            yield
        finally:
            self.stop()

    def start(self, name: str) -> None:
        self.stack.append([name, time.perf_counter(), 0.0])

    def stop(self) -> None:
        nm, t0, kids = self.stack.pop()
        total = time.perf_counter() - t0
        self.excl[nm] += total - kids
        if self.stack:
            self.stack[-1][2] += total

    def wrap(self, fn: Callable, name: str) -> Callable:
        @functools.wraps(fn)
        def inner(*a, **k):
            with self.timed(name):
                return fn(*a, **k)
        return inner

    def take(self) -> Dict[str, float]:
        out, self.excl = dict(self.excl), defaultdict(float)
        return out


@contextlib.contextmanager
def instrumented(ph: Phases, methods):
    """Wrap the step's functions (module attributes and method classes) for the duration."""
    saved = []

    def patch(obj, attr, name):
        saved.append((obj, attr, obj.__dict__[attr] if isinstance(obj, type) else getattr(obj, attr)))
        setattr(obj, attr, ph.wrap(getattr(obj, attr), name))

    patch(_parts, "adversarial_pass", "IBP pass")
    patch(_bn, "batch_stats", "BN statistics")
    patch(_parts, "warmup_regularizer", "regulariser")
    patch(_parts, "input_radius", "regulariser")
    patch(_cert, "l1_penalty", "l1 penalty")
    patch(Teacher, "targets", "teacher forward")
    for cls in methods:
        for attr, name in (("robust_loss", "robust loss"), ("distance", "distance")):
            owner = next(c for c in cls.__mro__ if attr in c.__dict__)
            if not any(o is owner and a == attr for o, a, _ in saved):
                patch(owner, attr, name)
    try:
        yield
    finally:
        for obj, attr, old in reversed(saved):
            setattr(obj, attr, old)


class TimedAttack:
    """The attack, timed; the model's forward inside it counts as attack."""

    def __init__(self, attack: PGD, ph: Phases):
        self.attack, self.ph = attack, ph

    def __call__(self, *a, **k):
        with self.ph.timed("attack"):
            return self.attack(*a, **k)


def profile_config(model_name: str, channels: int, size: int, batch: int, threads: int, repeats: int, warmup: int,
                   variants: List[bool]) -> dict:
    """Per-phase medians (ms) of CC-IBP and CC-Dist steps for one model/shape/batch/thread count."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    eps = 0.1 if channels == 1 else 8 / 255
    student = ibp_initialize(create_model(model_name, channels, size, 10))
    teacher_model = create_model(model_name, channels, size, 10)
    with torch.no_grad():
        for _ in range(2):
            teacher_model(torch.rand(batch, channels, size, size))
    teacher_model.eval().requires_grad_(False)
    x, y = torch.rand(batch, channels, size, size), torch.randint(0, 10, (batch,))
    base = dict(model=model_name, alpha=0.5, eps=eps, batch_size=batch)
    cfgs = {"cc-ibp": TrainConfig(method="cc-ibp", **base).validate(),
            "cc-dist": TrainConfig(method="cc-dist", teacher="profile-teacher", **base).validate()}
    ph = Phases()
    attack = TimedAttack(PGD(1, 10.0), ph)
    out = {}
    with instrumented(ph, [method_class(c.method) for c in cfgs.values()]):
        for reg_active in variants:
            runs = {}
            for name, cfg in cfgs.items():
                model = copy.deepcopy(student).train()
                params = list(model.parameters())
                opt = _make_optimizer(cfg, params)
                teacher = Teacher(model=teacher_model) if name == "cc-dist" else None
                runs[name] = (model, params, opt, cfg, teacher)

            def step(name):
                model, params, opt, cfg, teacher = runs[name]
                opened: List[bool] = []  # per model call: whether it opened a 'clean forward' timer

                def pre(m, i):
                    opened.append(ph.stack[-1][0] == "other loss glue")  # not the attack's forwards
                    if opened[-1]:
                        ph.start("clean forward")

                def post(m, i, o):
                    if opened.pop():
                        ph.stop()

                handles = [model.register_forward_pre_hook(pre), model.register_forward_hook(post)]
                t0 = time.perf_counter()
                with ph.timed("step"):
                    with ph.timed("other loss glue"):
                        loss, _ = training_loss(model, x, y, cfg, cfg.eps, reg_active, attack, teacher)
                    with ph.timed("backward"):
                        loss.backward()
                    with ph.timed("grad clip"):
                        _clip_gradients(params, cfg.grad_clip)
                    with ph.timed("optimiser"):
                        opt.step()
                        opt.zero_grad(set_to_none=True)
                wall = time.perf_counter() - t0
                for h in handles:
                    h.remove()
                got = ph.take()
                got.pop("step", None)
                return wall, got

            samples = {n: {"wall": [], "phases": defaultdict(list)} for n in runs}
            for i in range(warmup + repeats):
                for name in (list(runs) if i % 2 == 0 else list(runs)[::-1]):
                    wall, got = step(name)
                    if i >= warmup:
                        samples[name]["wall"].append(wall)
                        for k in PHASES:
                            samples[name]["phases"][k].append(got.get(k, 0.0))
            out[f"reg_active={str(reg_active).lower()}"] = {
                n: {"step_ms_median": 1e3 * statistics.median(s["wall"]), "step_ms_min": 1e3 * min(s["wall"]),
                    "phases_ms_median": {k: 1e3 * statistics.median(v) for k, v in s["phases"].items()}}
                for n, s in samples.items()}
    return out


def _table(key: str, res: dict) -> List[str]:
    lines = [f"#### {key}", "", "| phase | cc-ibp ms | cc-ibp % | cc-dist ms | cc-dist % |",
             "|---|---:|---:|---:|---:|"]
    a, b = res["cc-ibp"], res["cc-dist"]
    for k in PHASES:
        va, vb = a["phases_ms_median"].get(k, 0.0), b["phases_ms_median"].get(k, 0.0)
        if va == 0 and vb == 0:
            continue
        lines.append(f"| {k} | {va:.1f} | {100 * va / a['step_ms_median']:.0f} | {vb:.1f} | "
                     f"{100 * vb / b['step_ms_median']:.0f} |")
    lines.append(f"| **step (median; min)** | **{a['step_ms_median']:.1f}**; {a['step_ms_min']:.1f} | 100 | "
                 f"**{b['step_ms_median']:.1f}**; {b['step_ms_min']:.1f} | 100 |")
    return lines + [""]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one config: cnn7-w16, 64x1x28x28, 1 thread")
    ap.add_argument("--configs", default=",".join(FULL_GRID), help="model:channels:size,... (default: the grid)")
    ap.add_argument("--batches", default="64,256")
    ap.add_argument("--threads-list", default="1,2")
    ap.add_argument("--variants", default="false,true", help="reg_active values")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--tag", default=None, help="results/profile_step_<tag>.{md,json} (default: quick or full)")
    args = ap.parse_args(argv)
    if args.quick:
        args.configs, args.batches, args.threads_list = "cnn7-w16:1:28", "64", "1"
    tag = args.tag or ("quick" if args.quick else "full")
    variants = [v.strip().lower() in ("true", "1", "yes") for v in args.variants.split(",") if v.strip()]
    load0 = list(os.getloadavg())
    allocator = keep_freed_memory()  # as train() does
    result = {"benchmark": "profile_step", "date": _dt.datetime.now().isoformat(timespec="seconds"),
              "keep_freed_memory": allocator,
              "torch": torch.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
              "certkd_src": str(Path(certkd.__file__).resolve().parents[1]), "repeats": args.repeats,
              "warmup": args.warmup, "attack": "PGD(1, 10.0)", "alpha": 0.5, "loadavg_start": load0, "configs": {}}
    lines = [f"# profile_step ({tag})", "",
             f"`python benchmarks/profile_step.py {' '.join(argv if argv is not None else sys.argv[1:])}`; "
             f"torch {torch.__version__}, certkd from {result['certkd_src']}; medians of {args.repeats} steps "
             f"after {args.warmup} warm-up steps, exclusive wall-clock ms per phase; load average at the start "
             f"{load0[0]:.2f}.", ""]
    for conf in args.configs.split(","):
        model_name, channels, size = conf.split(":")
        for batch in (int(b) for b in args.batches.split(",")):
            for threads in (int(t) for t in args.threads_list.split(",")):
                key = f"{model_name} {batch}x{channels}x{size}x{size} threads={threads}"
                print(f"profiling {key} ...", flush=True)
                res = profile_config(model_name, int(channels), int(size), batch, threads, args.repeats,
                                     args.warmup, variants)
                result["configs"][key] = res
                lines.append(f"### {key}")
                lines.append("")
                for var, r in res.items():
                    lines += _table(var, r)
                    print("\n".join(_table(f"{key} {var}", r)), flush=True)
    result["loadavg_end"] = list(os.getloadavg())
    lines.append(f"Load average at the end {result['loadavg_end'][0]:.2f}.")
    res_dir = ROOT / "benchmarks" / "results"
    atomic_write_json(res_dir / f"profile_step_{tag}.json", result)
    atomic_write_text(res_dir / f"profile_step_{tag}.md", "\n".join(lines) + "\n")
    print(f"wrote benchmarks/results/profile_step_{tag}.{{md,json}}")
    return result


if __name__ == "__main__":
    main()
