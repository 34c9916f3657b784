"""benchmarks/bench_loader.py: the loader's time per batch and its share of a CC-IBP step, on a tiny dataset."""
from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_loader_reports_the_share_of_a_step(tmp_path):
    spec = importlib.util.spec_from_file_location("_certkd_bench_loader", ROOT / "benchmarks" / "bench_loader.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    res = mod.main(["--shape", "mnist", "--points", "256", "--batch", "64", "--steps", "1",
                    "--out", str(tmp_path / "r.json")])
    assert res["loader_ms_per_batch"] > 0 and res["cc_ibp_step_ms"] > 0
    assert res["loader_share"] == res["loader_ms_per_batch"] / res["cc_ibp_step_ms"]
    assert (tmp_path / "r.json").exists()
