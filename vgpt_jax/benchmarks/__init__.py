"""Benchmark scripts: each prints a table; the numbers are recorded in BENCHMARKS.md."""

DTYPES = ("auto", "float32", "bfloat16")


def benchmark_dtype(name: str) -> str:
  """The dtype a benchmark runs in: `auto` is bfloat16 on an accelerator (what training uses there; float32
  would time full-precision matmuls, 6-pass on a TPU MXU and without tensor cores on a GPU) and float32 on CPU."""
  if name != "auto":
    return name
  import jax

  return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
  """The rows as a markdown table (columns: the first row's keys unless given); floats to 3 significant
  digits, a missing or None cell empty. Every benchmark prints its table through here."""
  columns = list(rows[0]) if columns is None else columns

  def cell(x) -> str:
    return f"{x:.3g}" if isinstance(x, float) else ("" if x is None else str(x))

  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
  return "\n".join(lines)


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
