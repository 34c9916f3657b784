"""benchmarks/soak_verify.py on a small scale: 2 workers under an address-space cap, flat memory."""
import importlib.util
from pathlib import Path

import pytest

from certkd import resolve_config, train

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "soak_verify.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("soak_verify", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_soak_two_workers_memory_is_flat(tmp_path):
    soak = _load_script()
    run = train(resolve_config("digits-small", {"method": "cc-ibp", "epochs": 3, "eps_length": 1, "eval_limit": 10}),
                tmp_path / "run", progress=False, log=lambda s: None)
    r = soak.soak(str(run), limit=300, workers=2, timeout=2.0, mem_cap_gb=8.0, interval=0.5, out=tmp_path / "v")
    assert r["n"] == 300 and sum(r["counts"].values()) == 300
    assert r["peak_rss_total"] >= r["peak_rss_process"] > 50 * 2 ** 20   # torch alone is more than that
    assert max(s["processes"] for s in r["samples"]) >= 3               # parent + 2 workers were seen
    assert r["flat"], (r["growth_bytes"], r["rss_at"])


def test_tree_rss_sees_this_process():
    soak = _load_script()
    import os

    rss = soak.tree_rss(os.getpid())
    assert rss[os.getpid()] > 0


def _rss() -> int:
    import os

    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.slow
def test_repeated_verification_does_not_leak(tmp_path):
    """The same points verified 6 times in one process, a third of them decided by BaB (or its
    MILP leaves): after a warm-up round, the resident memory must not keep growing."""
    import torch

    from certkd import load_model
    from certkd.data import load_dataset
    from certkd.verification.pipeline import VerifyConfig, verify_sample

    run = train(resolve_config("digits-small", {"method": "cc-ibp", "epochs": 8, "eps_length": 3, "eval_limit": 10}),
                tmp_path / "run", progress=False, log=lambda s: None)
    model = load_model(run)
    _, test, _ = load_dataset("digits")
    cfg = VerifyConfig(eps=0.08, timeout=3.0)
    hard, easy = [], []
    for i in range(len(test)):
        x, y = test.get(torch.tensor([i]))
        row = verify_sample(model, x, int(y), cfg, index=i)
        (hard if row["status"] in ("verified-bab", "timeout") or row.get("stage") == "bab" else easy).append((x, y))
        if len(hard) >= 8 and len(easy) >= 16:
            break
    assert len(hard) >= 4, "no point needed branch and bound; the test would not exercise it"
    points = hard[:8] + easy[:16]
    rss = []
    for _ in range(6):
        for i, (x, y) in enumerate(points):
            verify_sample(model, x, int(y), cfg, index=i)
        rss.append(_rss())
    growth = rss[-1] - rss[1]
    assert growth < 10 * 2 ** 20, [r // 2 ** 20 for r in rss]
