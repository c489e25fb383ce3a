"""Aspect buckets on a mixed corpus: the picture kept, fixed size against buckets, and the train step per bucket.

  python -m vgpt_jax.benchmarks.buckets [--preset=tiny --frames=8 --batch_size=2 --steps=5]

The corpus (made here, deterministic): 60 videos, a third landscape 16:9 (320x180), a third portrait 9:16
(180x320), and 4:3, 3:4, square and 3:1 ones. Each is fitted the way the pipeline fits frames (cover-scale,
centre crop, sources.cover_crop), to the paper's fixed 176x320, or to the nearest of the buckets 176x320,
320x176 and 240x240 (220, 220 and 225 tokens at 8x down and patch 2). The first table is the mean share of
each video's picture kept, per kind of video.

The second: the train step of each bucket, compiled as the job compiles it (train.compile_bucket_steps:
ahead of time, before the first step) at the paper's token budget (pixel tokenizer 8x down, so a frame of
each bucket is 220 or 225 tokens as with the SDXL VAE; model --preset): its compile time, compiled memory
per device, and the steady-state step time and throughput (median of --steps, inputs of that shape).
"""

from __future__ import annotations

import argparse

import numpy as np

from vgpt_jax.benchmarks import markdown_table
from vgpt_jax.data.buckets import assign, kept_fraction, parse_buckets

CORPUS = {  # kind -> (width, height, how many)
  "landscape 16:9": (320, 180, 20),
  "portrait 9:16": (180, 320, 20),
  "landscape 4:3": (320, 240, 5),
  "portrait 3:4": (240, 320, 5),
  "square": (256, 256, 5),
  "panorama 3:1": (480, 160, 5),
}
FIXED = [(176, 320)]
BUCKETS = [(176, 320), (320, 176), (240, 240)]


def table() -> list[tuple[str, int, float, float, str]]:
  """(kind, videos, kept with the fixed size, kept with buckets, bucket chosen) per kind, then the whole corpus."""
  fixed, buckets = parse_buckets(FIXED, 8, 2), parse_buckets(BUCKETS, 8, 2)
  rows, all_fixed, all_buckets = [], [], []
  for kind, (width, height, count) in CORPUS.items():
    chosen = buckets[assign(width, height, buckets)]
    kept_fixed = kept_fraction(width, height, fixed[0])
    kept_bucket = kept_fraction(width, height, chosen)
    rows.append((kind, count, kept_fixed, kept_bucket, f"{chosen.height}x{chosen.width}"))
    all_fixed += [kept_fixed] * count
    all_buckets += [kept_bucket] * count
  rows.append(("all", len(all_fixed), float(np.mean(all_fixed)), float(np.mean(all_buckets)), ""))
  return rows


def step_table(preset: str, frames: int, batch_size: int, steps: int) -> list[dict]:
  """Per bucket: tokens per sample, compile seconds, compiled GiB per device, step seconds, tokens per second."""
  import jax

  from vgpt_jax import parallel, train_step
  from vgpt_jax.benchmarks.train_step import step_config, step_times
  from vgpt_jax.run import bucket_runs, make_run
  from vgpt_jax.train import compile_bucket_steps

  config = step_config(preset, frames, 240, batch_size)
  config.data.height, config.data.width = 240, 240
  config.data.buckets = tuple(BUCKETS)
  config.tokenizer.downsample = 8  # pixel tokenizer at the VAE's reduction: the paper's tokens per frame
  mesh = parallel.make_mesh(config.mesh)
  run = make_run(config)
  compiled, report = compile_bucket_steps(run, mesh, list(range(len(BUCKETS))))
  state = train_step.create_state(run, mesh)
  rows = []
  for b, bucket_run in enumerate(bucket_runs(run)):
    shape = bucket_run.input_shape(batch_size)
    video = jax.device_put(jax.random.uniform(jax.random.key(b), shape, minval=-1), parallel.batch_sharding(mesh))
    skips = jax.device_put(train_step.no_skips(batch_size), parallel.batch_sharding(mesh))
    state, _ = step_times(compiled[b], state, video, skips, 1)  # warm-up
    state, times = step_times(compiled[b], state, video, skips, steps)
    step_s = float(np.median(times))
    rows.append(
      {
        "bucket": f"{shape[2]}x{shape[3]}",
        "tokens/sample": bucket_run.layout.length,
        "compile (s)": report[b]["compile_seconds"],
        "compiled GiB/device": report[b]["memory_gib"].get("total_gib", float("nan")),
        "step (s)": step_s,
        "tokens/s": batch_size * bucket_run.layout.length / step_s,
      }
    )
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--preset", default="tiny")
  parser.add_argument("--frames", type=int, default=8)
  parser.add_argument("--batch_size", type=int, default=2)
  parser.add_argument("--steps", type=int, default=5, help="timed steps per bucket (median reported)")
  parser.add_argument("--no_steps", action="store_true", help="only the picture-kept table")
  args = parser.parse_args()
  tokens = {f"{h}x{w}": b.tokens(8, 2, 1) for (h, w), b in zip(BUCKETS, parse_buckets(BUCKETS, 8, 2))}
  print(f"tokens per frame: {tokens}")
  print("| videos | count | picture kept, fixed 176x320 | picture kept, buckets | bucket |")
  print("|---|---|---|---|---|")
  for kind, count, fixed, bucketed, chosen in table():
    print(f"| {kind} | {count} | {fixed:.1%} | {bucketed:.1%} | {chosen} |")
  if args.no_steps:
    return
  import jax

  rows = step_table(args.preset, args.frames, args.batch_size, args.steps)
  print(
    f"\n{jax.devices()[0].device_kind} x{jax.device_count()}, model {args.preset}, {args.frames} frames, "
    f"batch {args.batch_size}"
  )
  print(markdown_table(rows))


if __name__ == "__main__":
  main()
