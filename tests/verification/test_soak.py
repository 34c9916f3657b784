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
