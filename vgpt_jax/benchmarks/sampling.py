"""Sampling benchmark: KV-cached rollouts against recomputing the whole sequence at every step.

  python -m vgpt_jax.benchmarks.sampling [--preset=tiny --clips=4 --steps=50 --batch=16 --context_frames=7]

Both paths generate the same clips (tests/test_sampling.py checks it); the
table gives their steady-state time (compilation excluded: each path runs
once to warm up, then `--repeats` times) and the speed-up.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
from absl import app, flags

from configs import tiny
from vgpt_jax.benchmarks import markdown_table, median_seconds
from vgpt_jax.model import model_config
from vgpt_jax.run import init_params, make_run
from vgpt_jax.sampler import Sampler, SamplingConfig


def measure(
  preset: str, clips: int, clip_frames: int, context_frames: int, steps: int, batch: int, repeats: int
) -> dict:
  config = tiny.get_config()
  config.model = model_config(preset)
  run = make_run(config)
  params = nn.unbox(init_params(run, jax.random.key(0)))
  sampler = Sampler(run, SamplingConfig(steps=steps, clip_frames=clip_frames))
  context = jax.random.normal(jax.random.key(1), (batch, context_frames, *run.latent_shape))
  keys = jax.random.split(jax.random.key(2), batch)
  frames = clips * clip_frames
  row = {"preset": preset, "frames/clip": clip_frames, "clips": clips, "steps": steps, "batch": batch}
  for name, cached in (("cached", True), ("recompute", False)):
    rollout = functools.partial(sampler.rollout, cached=cached)
    row[f"{name} (s)"] = median_seconds(rollout, params, context, keys, frames, repeats=repeats)
  row["speed-up"] = row["recompute (s)"] / row["cached (s)"]
  return row


def main(argv: list[str]) -> None:
  del argv
  f = flags.FLAGS
  row = measure(f.preset, f.clips, f.clip_frames, f.context_frames, f.steps, f.batch, f.repeats)
  print(f"backend: {jax.default_backend()} ({jax.devices()[0].device_kind}); context {f.context_frames} frames")
  print(markdown_table([row]))


if __name__ == "__main__":
  flags.DEFINE_string("preset", "tiny", "Model preset.")
  flags.DEFINE_integer("clips", 4, "Clips generated one after another.")
  flags.DEFINE_integer("clip_frames", 1, "Frames per clip.")
  flags.DEFINE_integer("context_frames", 7, "Context frames (7 of the tiny model's 8: a long rollout's steady state).")
  flags.DEFINE_integer("steps", 50, "Euler steps per clip.")
  flags.DEFINE_integer("batch", 16, "Videos per rollout (the evaluate CLI's default batch).")
  flags.DEFINE_integer("repeats", 3, "Timed runs per path (the median is reported).")
  app.run(main)
