"""Flags the sampling programs share (`sample`, `evaluate`, `benchmarks.learning_curve`), defined in one place."""

from __future__ import annotations

from absl import flags

from vgpt_jax.sampler import SamplingConfig


def define_sampling_flags(num_videos: int, batch_size: int) -> None:
  """The flags `sample` and `evaluate` share: the checkpoint, the lengths and how clips are generated."""
  flags.DEFINE_string("checkpoint", None, "A run's workdir (or its checkpoints directory).")
  flags.DEFINE_integer("num_videos", num_videos, "Videos to roll out.")
  flags.DEFINE_integer("context_frames", 0, "Context frames; 0: train.sample_context_frames.")
  flags.DEFINE_integer("frames", 0, "Frames to generate; 0: up to data.num_frames in all.")
  flags.DEFINE_integer(
    "clip_frames", 0, "Frames per generated clip; 0: train.sample_clip_frames (0 there: all the frames in one clip)."
  )
  flags.DEFINE_integer("window", 0, "Frames the model sees at once; 0: data.num_frames.")
  flags.DEFINE_integer("steps", 0, "Euler steps per clip; 0: train.sample_steps (the end-of-run sample's).")
  flags.DEFINE_float("shift", 1.0, "Timestep shift (1: none).")
  flags.DEFINE_float("guidance", 1.0, "Classifier-free guidance scale (1: off; the reference uses 1.5).")
  flags.DEFINE_integer("seed", 0, "Noise seed.")
  flags.DEFINE_enum("weights", "auto", ["auto", "params", "ema"], "auto: the EMA when the run kept one.")
  flags.DEFINE_integer("step", -1, "Checkpoint step; -1: the newest readable.")
  flags.DEFINE_integer("batch_size", batch_size, "Videos generated together.")
  flags.mark_flags_as_required(["checkpoint"])


def sampling_from_flags() -> SamplingConfig:
  """The SamplingConfig the shared flags ask for (steps and clip_frames 0 are resolved by `with_run_defaults`)."""
  f = flags.FLAGS
  return SamplingConfig(steps=f.steps, shift=f.shift, guidance=f.guidance, clip_frames=f.clip_frames, window=f.window)
