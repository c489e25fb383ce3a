"""Benchmark scripts: each prints a table; the numbers are recorded in BENCHMARKS.md."""

DTYPES = ("auto", "float32", "bfloat16")


def benchmark_dtype(name: str) -> str:
  """The dtype a benchmark runs in: `auto` is bfloat16 on an accelerator (what training uses there; float32
  would time full-precision matmuls, 6-pass on a TPU MXU and without tensor cores on a GPU) and float32 on CPU."""
  if name != "auto":
    return name
  import jax

  return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def median_seconds(fn, *args, repeats: int = 3) -> float:
  """Median wall time of `fn(*args)` over `repeats` calls after one warm-up call (compiles), each waited for."""
  import time

  import jax
  import numpy as np

  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))
