"""Benchmark scripts: each prints a table; the numbers are recorded in BENCHMARKS.md."""

DTYPES = ("auto", "float32", "bfloat16")


def benchmark_dtype(name: str) -> str:
  """The dtype a benchmark runs in: `auto` is bfloat16 on an accelerator (what training uses there; float32
  would time full-precision matmuls, 6-pass on a TPU MXU and without tensor cores on a GPU) and float32 on CPU."""
  if name != "auto":
    return name
  import jax

  return "float32" if jax.default_backend() == "cpu" else "bfloat16"
