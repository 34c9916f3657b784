"""The distillation study of issue #21 as a package: design (data), planner, provenance, execution, statistics,
report. The entry point is benchmarks/distillation_study.py; the protocol is docs/distillation_study/plan.md."""
