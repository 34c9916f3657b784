"""Training throughput of CNN7 on CIFAR shapes (images/s): forward, forward+IBP, a CC-IBP and a CC-Dist step.

Part (b) of ``benchmarks/gpu_check.sh``; runs on any device (CUDA when present). Unlike the other benchmarks
here it reports absolute images/s, because the question is "how long will a GPU run take", not a ratio.
Every step is what ``certkd.training.loop`` does per batch (``training_loss`` + backward + clipping + Adam),
in the robust phase after the ε ramp (ε_s = ε, warm-up regularisers off), with the settings of the presets
``cifar10-2_255-ccibp`` / ``-ccdist`` (α = 0.01, 8-step PGD at attack_eps_factor 2.1, so CC-Dist also
carries the projected point through IBP) and β = 0.003. The CC-Dist teacher is a frozen CNN7 of the same
shape. TF32 is off (the training default) except in the row marked ``tf32`` (``--tf32``). The rows
``amp`` (``--amp``: the attack under bfloat16 autocast) and ``compile`` (``--compile``) give each option's
step time beside the plain CC-IBP step; the compiled row's first step (the compilation) is printed apart.
forward+IBP: eval mode, no_grad, ``interval_bounds`` of the features + the elided last layer.

Usage::

    PYTHONPATH=src python3 benchmarks/gpu_throughput.py --batch 128 --out results/throughput.json
    PYTHONPATH=src python3 benchmarks/gpu_throughput.py --device cpu --width 8 --linear 32 --batch 8 --repeats 2
"""
from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import measure, pick_device  # noqa: E402
from certkd import precision  # noqa: E402
from certkd.attacks import PGD, linf_box  # noqa: E402
from certkd.bounds import ibp_logit_difference_bounds  # noqa: E402
from certkd.config import resolve_config  # noqa: E402
from certkd.models import create_model, ibp_initialize  # noqa: E402
from certkd.training.step import Teacher, training_loss  # noqa: E402


def make_step(model, cfg, x, y, attack, teacher, tf32: bool):
    params = list(model.parameters())
    opt = torch.optim.Adam(params, lr=cfg.lr)

    def step():
        with precision.tf32(tf32):
            loss, _ = training_loss(model, x, y, cfg, cfg.eps, False, attack, teacher)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
        return loss

    return step


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--width", type=int, default=64, help="CNN7 width (64: the paper's)")
    ap.add_argument("--linear", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=None, help="JSON file to write")
    ap.add_argument("--no-compile", action="store_true", help="skip the --compile row (it compiles for a minute)")
    args = ap.parse_args(argv)
    device = pick_device(args.device)
    precision.set_tf32_flags(False, False)
    kw = {} if (args.width, args.linear) == (64, 512) else {"width": args.width, "linear": args.linear}
    torch.manual_seed(0)
    student = ibp_initialize(create_model("cnn7", 3, 32, 10, (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010),
                                          **kw)).to(device)
    teacher_net = create_model("cnn7", 3, 32, 10, **kw).to(device)
    b = args.batch
    x = torch.rand(b, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (b,), device=device)
    with torch.no_grad():  # non-trivial running statistics, then frozen
        teacher_net(x)
    teacher_net.eval().requires_grad_(False)
    common = {"model_kwargs": kw, "batch_size": b, "device": str(device)}
    cfg_ibp = resolve_config("cifar10-2_255-ccibp", common)
    cfg_dist = resolve_config("cifar10-2_255-ccdist", dict(common, teacher="benchmark-teacher", beta=0.003))
    attack = PGD(cfg_ibp.attack_steps, cfg_ibp.attack_step_size, cfg_ibp.attack_restarts)
    amp_attack = PGD(cfg_ibp.attack_steps, cfg_ibp.attack_step_size, cfg_ibp.attack_restarts, amp=True)
    teacher = Teacher(model=teacher_net)
    eval_model = copy.deepcopy(student).eval()
    lo, hi = linf_box(x, cfg_ibp.eps)

    def forward():
        with torch.no_grad():
            return eval_model(x)

    def forward_ibp():
        with torch.no_grad():
            return eval_model(x), ibp_logit_difference_bounds(eval_model, lo, hi, y)[0]

    fns = {
        "forward (eval)": forward,
        "forward+IBP (eval)": forward_ibp,
        "CC-IBP step": make_step(copy.deepcopy(student).train(), cfg_ibp, x, y, attack, None, False),
        "CC-Dist step": make_step(copy.deepcopy(student).train(), cfg_dist, x, y, attack, teacher, False),
        "CC-IBP step, tf32": make_step(copy.deepcopy(student).train(), cfg_ibp, x, y, attack, None, True),
        "CC-IBP step, amp (attack in bf16)": make_step(copy.deepcopy(student).train(), cfg_ibp, x, y, amp_attack, None,
                                                       False),
    }
    compile_s = None
    if not args.no_compile:  # --compile: the model's forward compiled in place, as certkd.training.loop does
        compiled = copy.deepcopy(student).train()
        compiled.compile()
        fns["CC-IBP step, compile"] = make_step(compiled, cfg_ibp, x, y, attack, None, False)
        t0 = time.perf_counter()
        fns["CC-IBP step, compile"]()  # the first step compiles: reported on its own, not in the median
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        compile_s = time.perf_counter() - t0
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"gpu_throughput: cnn7 width {args.width} linear {args.linear}, input {b}x3x32x32, device {device} "
          f"({name}), torch {torch.__version__}, attack {cfg_ibp.attack_steps} steps, "
          f"attack_eps_factor {cfg_ibp.attack_eps_factor}, repeats {args.repeats}, warmup {args.warmup}")
    times = measure(fns, args.repeats, args.warmup, device)
    rows = {}
    for k, t in times.items():
        med = statistics.median(t["wall"])
        rows[k] = {"median_s": med, "images_per_s": b / med, "n": len(t["wall"])}
    width = max(map(len, rows))
    print(f"{'what'.ljust(width)}  {'ms/batch':>9}  {'images/s':>9}")
    for k, r in rows.items():
        print(f"{k.ljust(width)}  {1e3 * r['median_s']:9.1f}  {r['images_per_s']:9.0f}")
    ratio = rows["CC-Dist step"]["median_s"] / rows["CC-IBP step"]["median_s"]
    print(f"cc-dist/cc-ibp step time: {ratio:.2f}")
    base = rows["CC-IBP step"]["median_s"]
    for k in rows:
        if k.startswith("CC-IBP step, "):
            print(f"{k} / CC-IBP step: {rows[k]['median_s'] / base:.2f}")
    if compile_s is not None:
        print(f"first compiled step (compilation included): {compile_s:.1f} s")
    result = {"benchmark": "gpu_throughput", "date": _dt.datetime.now().isoformat(timespec="seconds"),
              "device": str(device), "device_name": name, "torch": torch.__version__, "batch": b,
              "width": args.width, "linear": args.linear, "rows": rows, "cc-dist/cc-ibp": ratio,
              "first_compiled_step_s": compile_s}
    if device.type == "cuda":
        result["max_memory_allocated_GiB"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
        print(f"peak GPU memory allocated: {result['max_memory_allocated_GiB']:.2f} GiB")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
