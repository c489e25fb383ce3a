"""Benchmark scripts: each prints a table; the numbers are recorded in BENCHMARKS.md."""
