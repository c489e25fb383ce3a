"""Train-step benchmark: step time, compiled memory and model FLOPs utilisation per preset.

  python -m vgpt_jax.benchmarks.train_step --presets=tiny,100m [--batch_size=4] [--steps=5] \
      [--frames=8] [--size=32] [--dtype=bfloat16] [--remat=full] [--peak_tflops=989]

Prints a markdown table. Model FLOPs count the matmuls of the forward and
backward pass (6 x matmul parameters x tokens) plus attention over the entries
the hierarchical mask leaves visible (averaged over random splits): masked
entries and remat recomputation are not counted, so MFU is honest.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from configs import tiny
from vgpt_jax import parallel, train_step
from vgpt_jax.attention.accounting import visible_count
from vgpt_jax.benchmarks import DTYPES, benchmark_dtype, markdown_table
from vgpt_jax.layout import sample_splits, token_ids
from vgpt_jax.model import model_config
from vgpt_jax.model.transformer import REMAT_POLICIES
from vgpt_jax.run import Run, make_run


def step_config(preset: str, frames: int, size: int, batch_size: int, **model) -> ml_collections.ConfigDict:
  """The tiny config with model `preset` (fields in `model` replacing its values), `frames` frames of
  `size` x `size` pixels and `batch_size` samples per step: what the step benchmarks time."""
  c = tiny.get_config()
  c.model = model_config(preset)
  c.model.update(model)
  c.data.height = c.data.width = size
  c.data.num_frames = frames
  c.data.video_frames = max(c.data.video_frames, frames)
  c.train.batch_size = batch_size
  c.layout.split = "random"  # the paper's stages 2-4 split, as the recorded step times used
  return c


def bench_config(args: argparse.Namespace, preset: str) -> ml_collections.ConfigDict:
  return step_config(preset, args.frames, args.size, args.batch_size, dtype=args.dtype, remat=args.remat)


def model_flops_per_step(run: Run, batch_size: int, samples: int = 32) -> float:
  """Forward + backward FLOPs of one step, counting only visible attention entries."""
  m = run.config.model
  d, layers = m.hidden, m.num_layers
  matmul_params = layers * (4 * d * d + 3 * d * m.mlp_dim)
  tokens = run.layout.length
  splits = sample_splits(jax.random.key(0), samples, run.layout.num_frames, run.config.layout)
  visible = float(jnp.mean(visible_count(token_ids(run.layout, splits))))
  attention = layers * 2 * 2 * visible * d  # QK^T and PV, 2 FLOPs per multiply-add, all heads
  return 3.0 * batch_size * (2 * matmul_params * tokens + attention)


def step_times(step: Any, state: Any, video: jax.Array, skips: jax.Array, steps: int) -> tuple[Any, list[float]]:
  """(the state after `steps` calls of the compiled `step`, the seconds each took, waiting for its result)."""
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = step(state, video, skips)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  return state, times


def measure(preset: str, args: argparse.Namespace) -> dict:
  config = bench_config(args, preset)
  mesh = parallel.make_mesh(config.mesh)
  run = make_run(config)
  t0 = time.perf_counter()
  step = train_step.compile_train_step(run, mesh)
  compile_s = time.perf_counter() - t0
  memory = train_step.memory_summary(step)
  state = train_step.create_state(run, mesh)
  video = jax.device_put(
    jax.random.uniform(jax.random.key(0), (args.batch_size, args.frames, args.size, args.size, 3), minval=-1),
    parallel.batch_sharding(mesh),
  )
  skips = jax.device_put(train_step.no_skips(args.batch_size), parallel.batch_sharding(mesh))
  state, _ = step_times(step, state, video, skips, 1)  # warm-up
  step_s = float(np.median(step_times(step, state, video, skips, args.steps)[1]))
  flops = model_flops_per_step(run, args.batch_size)
  params = sum(x.size for x in jax.tree.leaves(state.params))
  row = {
    "preset": preset,
    "remat": args.remat,
    "params (M)": params / 1e6,
    "tokens/sample": run.layout.length,
    "batch": args.batch_size,
    "compile (s)": compile_s,
    "step (s)": step_s,
    "tokens/s": args.batch_size * run.layout.length / step_s,
    "model TFLOP/s": flops / step_s / 1e12,
    "compiled GiB/device": memory.get("total_gib", float("nan")),
  }
  if args.peak_tflops:
    row["MFU"] = flops / step_s / 1e12 / args.peak_tflops
  return row


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--presets", default="tiny,100m")
  parser.add_argument("--batch_size", type=int, default=4)
  parser.add_argument("--frames", type=int, default=8)
  parser.add_argument("--size", type=int, default=32, help="square frame size in pixels")
  parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
  parser.add_argument("--dtype", default="auto", choices=DTYPES, help="auto: bfloat16 on accelerators, else float32")
  parser.add_argument("--remat", default="none", choices=sorted(REMAT_POLICIES))
  parser.add_argument("--peak_tflops", type=float, default=0.0, help="device peak, for MFU (e.g. 989 for H100 bf16)")
  args = parser.parse_args()
  args.dtype = benchmark_dtype(args.dtype)
  rows = [measure(p, args) for p in args.presets.split(",")]
  print(f"\n{jax.devices()[0].device_kind} x{jax.device_count()}, jax {jax.__version__}, {args.dtype}")
  print(markdown_table(rows))


if __name__ == "__main__":
  main()
