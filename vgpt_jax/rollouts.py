"""What `sample`, `evaluate` and `benchmarks.learning_curve` share: a request to roll a checkpoint out on videos,
its flags (defined here once), and the opening every one of them does (load, resolve the run's defaults, read).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from absl import flags

from vgpt_jax import checkpoint
from vgpt_jax.data.held_out import context_videos, file_videos
from vgpt_jax.run import Run
from vgpt_jax.sampler import SamplingConfig, Videos, with_run_defaults


@dataclasses.dataclass(frozen=True)
class RolloutRequest:
  """Which checkpoint to continue how many videos with, and how; 0 for a length means the run's own choice."""

  checkpoint: str
  num_videos: int = 4
  context_frames: int = 0  # 0: train.sample_context_frames
  frames: int = 0  # frames to generate; 0: up to data.num_frames in all
  sampling: SamplingConfig | None = None  # None or 0 steps / clip_frames: the run's train.sample_*
  seed: int = 0
  weights: str = "auto"  # params, ema, or auto: the EMA when the run kept one
  step: int = -1  # -1: the newest readable checkpoint
  batch_size: int = 8  # videos generated together


@dataclasses.dataclass(frozen=True)
class Opened:
  """A request made concrete: the model and its weights, the resolved lengths and sampling, the videos."""

  run: Run
  params: Any
  step: int
  context_frames: int
  frames: int
  sampling: SamplingConfig
  videos: Videos  # each as long as it is, up to context_frames + frames


def open_request(request: RolloutRequest, videos_from: str = "") -> Opened:
  """Load the checkpoint, resolve the run's defaults and read the videos (`videos_from`: a file or directory;
  empty: the run's held-out videos)."""
  run, params, step = checkpoint.load_model(request.checkpoint, request.step, request.weights)
  m, g, sampling = with_run_defaults(run.config, request.context_frames, request.frames, request.sampling)
  if videos_from:
    videos = file_videos(run, videos_from, request.num_videos, m + g)
  else:
    videos = context_videos(run, request.num_videos, m + g)
  return Opened(run, params, step, m, g, sampling, videos)


def define_flags(num_videos: int, batch_size: int) -> None:
  """The flags `sample` and `evaluate` share: the checkpoint, the lengths and how clips are generated."""
  flags.DEFINE_string("checkpoint", None, "A run's workdir (or its checkpoints directory).")
  flags.DEFINE_integer("num_videos", num_videos, "Videos to roll out.")
  flags.DEFINE_integer("context_frames", 0, "Context frames; 0: train.sample_context_frames.")
  flags.DEFINE_integer("frames", 0, "Frames to generate; 0: context + generated fill the window.")
  flags.DEFINE_integer(
    "clip_frames", 0, "Frames per generated clip; 0: train.sample_clip_frames (0 there: all the frames in one clip)."
  )
  flags.DEFINE_integer("window", 0, "Frames the model sees at once; 0: train.sample_window (0 there: data.num_frames).")
  flags.DEFINE_integer("steps", 0, "Euler steps per clip; 0: train.sample_steps (the end-of-run sample's).")
  flags.DEFINE_float("shift", 1.0, "Timestep shift (1: none).")
  flags.DEFINE_float(
    "guidance",
    0.0,
    "Classifier-free guidance scale (1: off); 0: train.sample_guidance (configs/paper.py: 1.5, "
    "the reference's inference script).",
  )
  flags.DEFINE_bool(
    "context_noise",
    None,
    "Noise the context frames as training does (diffusion.context_t_min/max); unset: "
    "train.sample_context_noise (off, as the reference's inference runs).",
  )
  flags.DEFINE_integer("seed", 0, "Noise seed.")
  flags.DEFINE_enum("weights", "auto", ["auto", "params", "ema"], "auto: the EMA when the run kept one.")
  flags.DEFINE_integer("step", -1, "Checkpoint step; -1: the newest readable.")
  flags.DEFINE_integer("batch_size", batch_size, "Videos generated together.")
  flags.mark_flags_as_required(["checkpoint"])


def request_from_flags() -> RolloutRequest:
  """The RolloutRequest the shared flags ask for."""
  f = flags.FLAGS
  sampling = SamplingConfig(
    steps=f.steps,
    shift=f.shift,
    guidance=f.guidance,
    clip_frames=f.clip_frames,
    window=f.window,
    context_noise=f.context_noise,
  )
  # Every other field has a flag of its name.
  named = {field.name: f[field.name].value for field in dataclasses.fields(RolloutRequest) if field.name != "sampling"}
  return RolloutRequest(sampling=sampling, **named)
