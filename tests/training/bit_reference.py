"""Train the bit-identity reference runs and print SHA-256 digests of their final weights (issue #20).

Speed work on the training step must not change a single bit of what training computes.
``test_bit_identical.py`` trains these runs with the current tree and compares the digests with
``bit_reference.json``, which was written by this script under the tree *before* the speed work::

    PYTHONPATH=/tmp/baseline20/src OMP_NUM_THREADS=1 python tests/training/bit_reference.py \\
        > tests/training/bit_reference.json

Runs (bundled 8×8 digits, 1 torch thread, 3 epochs: warm-up, ε ramp with the regularisers on,
then the robust phase): a PGD-AT ``cnn-small`` teacher (1 epoch), then CC-IBP and CC-Dist
students with ``cnn-small`` (the ``digits-small`` preset) and with ``cnn7-w16`` (BatchNorm, so
the fused Conv2d→BatchNorm IBP rule is covered).
"""
from __future__ import annotations

import hashlib
import json
import platform
import sys
import tempfile
from pathlib import Path
from typing import Dict

import torch
from safetensors.torch import load_file

# warm-up (epoch 1), ramp with regularisers (epoch 2), robust phase (epoch 3); eval on 20 points only
COMMON = {"epochs": 3, "eps_start": 1, "eps_length": 1, "test_interval": 3, "eval_limit": 20}
RUNS = {
    "cc-ibp": {"method": "cc-ibp"},
    "cc-dist": {"method": "cc-dist", "beta": 0.5},
    "cc-ibp-cnn7w16": {"method": "cc-ibp", "model": "cnn7-w16"},
    "cc-dist-cnn7w16": {"method": "cc-dist", "beta": 0.5, "model": "cnn7-w16"},
}


def weights_digest(run: Path) -> str:
    """SHA-256 over the final checkpoint's tensors (name, dtype, shape and raw bytes, sorted by name)."""
    ck = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    tensors = load_file(str(ck / "model.safetensors"))
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def train_digests(root: Path, names=tuple(RUNS)) -> Dict[str, str]:
    """Train the teacher and the runs ``names`` under ``root``, on 1 torch thread; digest per run."""
    from certkd import resolve_config, train

    quiet = dict(progress=False, log=lambda s: None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # kernels' reduction order may depend on the thread count
    try:
        teacher = root / "teacher"
        train(resolve_config("digits-small", {"method": "pgd-at", "epochs": 1, "eval_limit": 20}, teacher=True),
              teacher, **quiet)
        out = {"teacher": weights_digest(teacher)}
        for name in names:
            extra = dict(RUNS[name])
            if "dist" in extra["method"]:
                extra["teacher"] = str(teacher)
            run = train(resolve_config("digits-small", {**COMMON, **extra}), root / name, **quiet)
            out[name] = weights_digest(run)
        return out
    finally:
        torch.set_num_threads(threads)


def environment() -> Dict[str, str]:
    """What a digest depends on besides the code: torch build, CPU architecture, Python."""
    return {"torch": torch.__version__, "machine": platform.machine(), "python": platform.python_version()}


def main() -> int:
    import certkd

    with tempfile.TemporaryDirectory() as tmp:
        digests = train_digests(Path(tmp))
    print(json.dumps({"command": "PYTHONPATH=/tmp/baseline20/src OMP_NUM_THREADS=1 python "
                                 "tests/training/bit_reference.py > tests/training/bit_reference.json",
                      "produced_by": str(Path(certkd.__file__).parents[1]), "environment": environment(),
                      "common": COMMON, "runs": RUNS, "sha256": digests}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
