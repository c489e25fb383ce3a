"""Attention benchmark: dense vs chunked (forward + backward) at the paper's sequence lengths, reduced width.

  python -m vgpt_jax.benchmarks.attention [--frames=48,80 --tokens=220 --heads=1 --head_dim=64 --block=512]
      [--paths=dense,chunked] [--max_dense_gib=10] [--dtype=auto|float32|bfloat16]

One sample of the training layout (clean frames, then noisy frames) with a
random clip split. For each path: the compiled program's memory
(`memory_analysis`: arguments + temporaries, per device), the median time of
a jitted forward+backward, and achieved TFLOP/s counting only the visible
entries (attention/accounting.py). The tiles kept by the chunked path are
shown next to the visible share of the score matrix. Dense is only run where
its compiled memory is under --max_dense_gib (else its memory alone is shown).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags

from vgpt_jax.attention import accounting
from vgpt_jax.attention.select import attention_path
from vgpt_jax.benchmarks import DTYPES, benchmark_dtype, markdown_table, median_seconds
from vgpt_jax.layout import sample_splits, token_ids, training_layout

GIB = 1 << 30


def measure(
  frames: int, tokens: int, heads: int, head_dim: int, path: str, block: int, max_gib: float, dtype: str = "float32"
) -> dict:
  layout = training_layout(frames, tokens)
  split_cfg = ml_collections.ConfigDict(dict(split="random", min_clips=2, max_clips=-1))
  ids = token_ids(layout, sample_splits(jax.random.key(0), 1, frames, split_cfg))
  t = layout.length
  q, k, v = (jax.random.normal(jax.random.key(i), (1, t, heads, head_dim), dtype) for i in range(3))
  fn = attention_path(path, t, t, block)

  def loss(q, k, v):
    return jnp.sum(fn(q, k, v, ids, ids).astype(jnp.float32) ** 2)

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
  compiled = step.lower(q, k, v).compile()
  mem = compiled.memory_analysis()
  gib = (mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes) / GIB
  visible = float(accounting.visible_count(ids)[0])
  row = {
    "frames": frames,
    "tokens": t,
    "path": path,
    "dtype": dtype,
    "compiled GiB": gib,
    "time (s)": float("nan"),
    "TFLOP/s (visible)": float("nan"),
    "visible share": visible / t**2,
  }
  if path == "chunked":
    row["tiles kept"] = accounting.tile_fractions(ids, ids, block, block)["tiles_kept_fraction"]
  if gib > max_gib:
    return row
  row["time (s)"] = median_seconds(compiled, q, k, v, repeats=2)
  row["TFLOP/s (visible)"] = accounting.attention_flops(visible, head_dim, heads) / row["time (s)"] / 1e12
  return row


def main(argv: list[str]) -> None:
  del argv
  f = flags.FLAGS
  rows = []
  dtype = benchmark_dtype(f.dtype)
  for frames in map(int, f.frames):
    for path in f.paths:
      rows.append(measure(frames, f.tokens, f.heads, f.head_dim, path, f.block, f.max_dense_gib, dtype))
      print(rows[-1], flush=True)
  print(
    f"\nbackend: {jax.default_backend()}; {f.heads} heads x {f.head_dim}, tokens per frame {f.tokens}, block {f.block}"
  )
  columns = ["frames", "tokens", "path", "dtype", "compiled GiB", "time (s)", "TFLOP/s (visible)", "visible share"]
  columns.append("tiles kept")
  print(markdown_table(rows, columns))


if __name__ == "__main__":
  flags.DEFINE_list("frames", ["48", "80"], "Frames per sample (paper stage 2: 48, stage 4: 80).")
  flags.DEFINE_integer("tokens", 220, "Patch tokens per frame (176x320 frames: 11x20 patches; +2 specials = 222).")
  flags.DEFINE_integer("heads", 1, "Attention heads (reduced width: dense with 2 heads at 48 frames exceeds 24 GiB).")
  flags.DEFINE_integer("head_dim", 64, "Head dimension.")
  flags.DEFINE_integer("block", 512, "Tile size of the chunked path.")
  flags.DEFINE_list("paths", ["dense", "chunked"], "Attention paths.")
  flags.DEFINE_float("max_dense_gib", 10.0, "Only run a path whose compiled memory is below this.")
  flags.DEFINE_enum("dtype", "auto", DTYPES, "q, k, v dtype; auto: bfloat16 on accelerators, float32 on CPU.")
  app.run(main)
