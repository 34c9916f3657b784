"""The method comparison of issue #23 (benchmarks/method_comparison.py)."""
