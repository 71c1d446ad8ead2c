"""Benchmarks of the policy pipeline; `python bench/dsl.py` runs them (see bench/README.md)."""
