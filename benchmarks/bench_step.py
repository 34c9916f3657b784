"""Cost of a CC-Dist training step relative to a CC-IBP step, measured side by side.

One step = ``training_loss`` + ``backward`` + gradient clipping + ``optimizer.step()``, exactly
as ``certkd.training.loop`` does it, in the robust phase (ε_s = ε) with the paper's training
attack PGD(1 step, step size 10). The two methods train their own copy of the same student
(same initialisation, each with its own Adam); CC-Dist also runs a frozen eval-mode teacher of
the same architecture. The methods' repetitions are interleaved (alternating order) so that
machine drift cancels, and two variants are timed: ``reg_active`` False (after the ε ramp, the
bulk of training) and True (during the ramp, warm-up regularisers on).

Runs on 1 torch thread unless ``--threads`` says otherwise, and reports the median and the
minimum of every timed thing and the load average at the start and end.

Also timed in the same rounds: the teacher's feature forward alone (``Teacher.targets``), which
is the part of CC-Dist that CC-IBP does not do, so the overhead can be attributed.

The final line reports the ``reg_active=False`` variant:
``cc-dist/cc-ibp step ratio: X.XX``  (target <= 1.2).

The method table (``--compare``) times the steps of several methods in the same interleaved rounds
and reports each against the first, e.g. the cost of CROWN-IBP, TAPS and STAPS over IBP. With
``--eps-frac`` below 1 the steps run at ε_s = frac·ε, inside the ramp: CROWN-IBP computes its
CROWN pass only there (β = 1 − ε_s/ε by default; at ε_s = ε it is IBP).

Usage::

    .venv/bin/python benchmarks/bench_step.py                          # cnn-small, 256 x 1x28x28
    .venv/bin/python benchmarks/bench_step.py --model cnn7 --channels 3 --size 32 --batch 32
    .venv/bin/python benchmarks/bench_step.py --model cnn7-w16 --channels 1 --size 28 --batch 32 \
        --compare ibp,crown-ibp,taps,staps --eps-frac 0.5 --variants false   # the method table

Writes ``benchmarks/results/bench_step_<model>.json`` (``bench_step_<model>_methods.json`` for the
method table), atomically.
"""
from __future__ import annotations

import argparse
import copy
import datetime as _dt
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
# compare_trees.py points CERTKD_SRC at the tree under test (PYTHONPATH alone would lose to this insert)
sys.path.insert(0, os.environ.get("CERTKD_SRC") or str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import certkd  # noqa: E402
from certkd.attacks import PGD  # noqa: E402
from certkd.checkpoints import atomic_write_json  # noqa: E402
from _timing import default_threads, measure, pick_device, ratio, summary  # noqa: E402
from certkd.config import TrainConfig  # noqa: E402
from certkd.models import create_model, ibp_initialize  # noqa: E402
from certkd.training.loop import _clip_gradients, _make_optimizer  # noqa: E402

try:  # what certkd.training.loop.train sets up per process (trees before issue #20 have no such step)
    from certkd.training.allocator import keep_freed_memory
except ImportError:  # pragma: no cover - baseline trees
    def keep_freed_memory() -> bool:
        return False
from certkd.training.step import Teacher, training_loss  # noqa: E402


def make_step(model, cfg: TrainConfig, x, y, eps_sched: float, reg_active: bool, attack: PGD, teacher) -> Callable[[], float]:
    """One training step as in ``certkd.training.loop.train`` (its optimiser and gradient clipping)."""
    params = list(model.parameters())
    opt = _make_optimizer(cfg, params)

    def step() -> float:
        loss, _ = training_loss(model, x, y, cfg, eps_sched, reg_active, attack, teacher)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        _clip_gradients(params, cfg.grad_clip)
        opt.step()
        return loss.item()

    return step


def method_table(args, methods, base: dict, student, x, y, attack: PGD, variants, device, allocator, load0,
                 shape) -> dict:
    """Step times of ``methods`` in the same interleaved rounds, each against the first."""
    cfgs = {m: TrainConfig(method=m, **base).validate() for m in methods}
    eps_sched = base["eps"] * args.eps_frac
    print(f"bench_step method table: model={args.model} input={'x'.join(map(str, shape))} eps={base['eps']:.4g} "
          f"eps_sched={eps_sched:.4g} device={device} threads={torch.get_num_threads()} repeats={args.repeats} "
          f"warmup={args.warmup} loadavg={load0[0]:.1f}")
    result = {"benchmark": "bench_step_methods", "date": _dt.datetime.now().isoformat(timespec="seconds"),
              "model": args.model, "input_shape": list(shape), "eps": base["eps"], "eps_sched": eps_sched,
              "device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "python": platform.python_version(), "machine": platform.machine(), "cpu_count": os.cpu_count(),
              "certkd_src": str(Path(certkd.__file__).resolve().parents[1]), "keep_freed_memory": allocator,
              "repeats": args.repeats, "warmup": args.warmup, "attack": repr(attack), "baseline": methods[0],
              "loadavg_start": load0, "variants": {}}
    for reg_active in variants:
        steps = {m: make_step(copy.deepcopy(student).train(), cfg, x, y, eps_sched, reg_active, attack, None)
                 for m, cfg in cfgs.items()}
        times = measure(steps, args.repeats, args.warmup, device)
        key = f"reg_active={str(reg_active).lower()}"
        rows = {m: {**summary(times[m]), "ratio": ratio(times, m, methods[0])} for m in methods}
        result["variants"][key] = rows
        print(f"[{key}] {'method':<10} {'median ms':>10} {'min ms':>8} {'/' + methods[0]:>8} {'CPU ratio':>10}")
        for m, row in rows.items():
            print(f"[{key}] {m:<10} {row['median_wall_s'] * 1e3:>10.0f} {row['min_wall_s'] * 1e3:>8.0f} "
                  f"{row['ratio']['ratio_of_medians']:>8.2f} {row['ratio']['cpu_time_ratio']:>10.2f}")
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"bench_step_{args.model}_methods.json"
    result["loadavg_end"] = list(os.getloadavg())
    atomic_write_json(out, result)
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    print(f"load average start {load0[0]:.2f}, end {result['loadavg_end'][0]:.2f}")
    return result


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="cnn-small")
    ap.add_argument("--channels", type=int, default=None, help="input channels (default 1; 3 for cnn7)")
    ap.add_argument("--size", type=int, default=None, help="input height = width (default 28; 32 for cnn7)")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--batch", type=int, default=None, help="default 256 (32 for cnn7)")
    ap.add_argument("--eps", type=float, default=None, help="default 0.1 (MNIST); 8/255 for 3-channel input")
    ap.add_argument("--repeats", type=int, default=7, help="timed steps per method and variant (>= 5)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--variants", default="false,true", help="reg_active values to time: false,true")
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: steadier on a shared machine; the core count here is "
                         f"{default_threads()})")
    ap.add_argument("--compare", default=None,
                    help="comma-separated methods timed against the first (the method table), "
                         "e.g. ibp,crown-ibp,taps,staps")
    ap.add_argument("--eps-frac", type=float, default=1.0, help="steps at ε_s = frac·ε (default 1: after the ramp)")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/bench_step_<model>.json)")
    args = ap.parse_args(argv)
    if args.repeats < 5:
        ap.error("--repeats must be >= 5 (medians of at least 5)")
    big = args.model.startswith("cnn7")
    channels = args.channels or (3 if big else 1)
    size = args.size or (32 if big else 28)
    batch = args.batch or (32 if big else 256)
    eps = args.eps if args.eps is not None else (0.1 if channels == 1 else 8 / 255)
    variants = [v.strip().lower() in ("true", "1", "yes") for v in args.variants.split(",") if v.strip()]

    torch.set_num_threads(args.threads)
    allocator = keep_freed_memory()  # as train() does
    device = pick_device(args.device)
    load0 = list(os.getloadavg())
    torch.manual_seed(0)
    student = ibp_initialize(create_model(args.model, channels, size, args.classes)).to(device)
    teacher_model = create_model(args.model, channels, size, args.classes).to(device)
    with torch.no_grad():  # give the teacher's BN non-trivial running statistics, then freeze it
        for _ in range(2):
            teacher_model(torch.rand(batch, channels, size, size, device=device))
    teacher_model.eval()
    for p in teacher_model.parameters():
        p.requires_grad_(False)
    teacher = Teacher(model=teacher_model)
    x = torch.rand(batch, channels, size, size, device=device)
    y = torch.randint(0, args.classes, (batch,), device=device)
    attack = PGD(1, 10.0)
    base = dict(model=args.model, alpha=0.5, eps=eps, batch_size=batch)
    if args.compare:
        return method_table(args, [m.strip() for m in args.compare.split(",") if m.strip()], base, student, x, y,
                            attack, variants, device, allocator, load0, (batch, channels, size, size))
    cfgs = {"cc-ibp": TrainConfig(method="cc-ibp", **base).validate(),
            "cc-dist": TrainConfig(method="cc-dist", teacher="benchmark-teacher", **base).validate()}

    print(f"bench_step: model={args.model} input={batch}x{channels}x{size}x{size} eps={eps:.4g} device={device} "
          f"threads={torch.get_num_threads()} torch={torch.__version__} repeats={args.repeats} warmup={args.warmup} loadavg={load0[0]:.1f}")
    result = {
        "benchmark": "bench_step", "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "model": args.model, "input_shape": [batch, channels, size, size], "eps": eps,
        "device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "python": platform.python_version(), "machine": platform.machine(), "cpu_count": os.cpu_count(),
        "certkd_src": str(Path(certkd.__file__).resolve().parents[1]), "keep_freed_memory": allocator,
        "repeats": args.repeats, "warmup": args.warmup, "attack": repr(attack), "alpha": 0.5,
        "target_ratio": 1.2, "loadavg_start": load0, "variants": {},
    }
    headline = None
    for reg_active in variants:
        steps = {}
        for name, cfg in cfgs.items():
            model = copy.deepcopy(student).train()  # same initialisation for both methods
            steps[name] = make_step(model, cfg, x, y, cfg.eps, reg_active, attack,
                                    teacher if name == "cc-dist" else None)

        def teacher_forward():
            return teacher.targets(x)

        times = measure({**steps, "teacher_forward": teacher_forward}, args.repeats, args.warmup, device)
        med = {k: statistics.median(v["wall"]) for k, v in times.items()}
        cpu = {k: statistics.median(v["cpu"]) for k, v in times.items()}
        r = ratio(times, "cc-dist", "cc-ibp")
        teacher_share = med["teacher_forward"] / med["cc-ibp"]
        residual = (med["cc-dist"] - med["cc-ibp"] - med["teacher_forward"]) / med["cc-ibp"]
        key = f"reg_active={str(reg_active).lower()}"
        result["variants"][key] = {
            **{k: summary(v) for k, v in times.items()},
            "cc-dist/cc-ibp": r, "teacher_forward/cc-ibp": teacher_share,
            "teacher_forward/cc-ibp_cpu_time": cpu["teacher_forward"] / cpu["cc-ibp"],
            "other_overhead/cc-ibp": residual,
        }
        mins = {k: min(v["wall"]) for k, v in times.items()}
        print(f"[{key}] median (min) ms: cc-ibp {med['cc-ibp'] * 1e3:.0f} ({mins['cc-ibp'] * 1e3:.0f}), cc-dist "
              f"{med['cc-dist'] * 1e3:.0f} ({mins['cc-dist'] * 1e3:.0f}), teacher forward "
              f"{med['teacher_forward'] * 1e3:.0f} ({mins['teacher_forward'] * 1e3:.0f})")
        print(f"[{key}] cc-dist/cc-ibp {r['ratio_of_medians']:.2f} (median of per-round ratios "
              f"{r['median_of_round_ratios']:.2f}, CPU-time ratio {r['cpu_time_ratio']:.2f}); overhead = teacher "
              f"forward {teacher_share:+.2f} (CPU {cpu['teacher_forward'] / cpu['cc-ibp']:+.2f}) + rest {residual:+.2f} "
              f"(fractions of a cc-ibp step)")
        ratio_headline = r["ratio_of_medians"]
        if not reg_active or headline is None:
            headline = ratio_headline
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"bench_step_{args.model}.json"
    result["headline"] = {"variant": "reg_active=false" if False in variants else f"reg_active={str(variants[0]).lower()}",
                          "cc-dist/cc-ibp": headline}
    result["loadavg_end"] = list(os.getloadavg())
    atomic_write_json(out, result)
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    print(f"load average start {load0[0]:.2f}, end {result['loadavg_end'][0]:.2f}")
    print(f"cc-dist/cc-ibp step ratio: {headline:.2f}")
    return result


if __name__ == "__main__":
    main()
