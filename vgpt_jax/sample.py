"""Generate video continuations from a checkpoint and write them as files people can open.

  python -m vgpt_jax.sample --checkpoint=WORKDIR [--context=VIDEO_OR_DIR] [--frames=16]
      [--context_frames=4 --clip_frames=4 --steps=0 --shift=1 --guidance=1 --num_videos=4
       --output=DIR --weights=auto|params|ema --nocached]

Without --context, the run's held-out videos are continued (the synthetic
physics world's eval split by default). Each video's first --context_frames
frames (at the run's frame stride, scaled and cropped to its frame size) are
the context; --frames more are generated, --clip_frames at a time, with the
KV-cached sampler (vgpt_jax/sampling.py). Written to DIR (default
WORKDIR/samples):

  NAME.mp4, NAME.gif          context then prediction (generated frames framed in red)
  NAME_vs_truth.mp4/.gif      truth | prediction side by side, when the video has the frames
  NAME_frames/frame_XXX.png   every frame of NAME.mp4
  samples.json                per video: frames, and the MSE against the truth where known
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from tqdm import tqdm

from vgpt_jax import checkpoint, media
from vgpt_jax.data import video_files
from vgpt_jax.data.pipeline import make_source, to_float, to_uint8
from vgpt_jax.data.sources import BadVideo
from vgpt_jax.sampling import Sampler, SamplingConfig, with_run_defaults
from vgpt_jax.trainer import Setup

Videos = list[tuple[str, np.ndarray]]  # (name, float32 frames [T, H, W, 3] in [-1, 1]), T may differ per video


def held_out_videos(setup: Setup, count: int, frames: int) -> Videos:
  """The first `count` usable held-out videos of the run's data, up to `frames` frames each (at its stride)."""
  data = setup.config.data
  source = make_source(data, "eval")
  out: Videos = []
  decode = jax.jit(setup.tokenizer.decode)
  for index in range(len(source)):
    if len(out) == count:
      break
    try:
      if getattr(source, "yields", "video") == "latents":  # shown decoded; the context is encoded again
        latents = source.record(index)["latents"][:: source.strides[0]][:frames]
        video = np.clip(np.asarray(decode(jnp.asarray(latents, jnp.float32))), -1, 1)
      else:
        # Sources refuse a read shorter than data.num_frames; read at least that many, keep `frames`.
        video = to_float(source.leading_frames(index, int(data.frame_stride), max(frames, data.num_frames))[:frames])
    except BadVideo as e:
      logging.warning("skipped held-out video %d: %s", index, e)
      continue
    out.append((f"heldout_{index:04d}", video))
  return out


def file_videos(setup: Setup, path: str, count: int, frames: int) -> Videos:
  """Up to `count` videos from a file or a directory, up to `frames` frames each, at the run's stride and size."""
  data = setup.config.data
  paths = [path] if Path(path).is_file() else video_files.find_videos(path)
  if not paths:
    raise ValueError(f"--context={path}: no video file there (extensions {list(video_files.VIDEO_EXTENSIONS)})")
  stride = int(data.frame_stride)
  out: Videos = []
  for p in paths[:count]:
    try:
      available = video_files.probe(p).frames // stride
      if available < 1:
        raise BadVideo("too_short", f"{p}: no frame at stride {stride}")
      clip, _ = video_files.read_clip(
        p,
        lambda n: (0, stride),
        num_frames=min(available, frames),
        height=int(data.height),
        width=int(data.width),
      )
    except BadVideo as e:
      logging.warning("skipped %s: %s", p, e)
      continue
    out.append((Path(p).stem, to_float(clip)))
  return out


def _framed(frames: np.ndarray) -> np.ndarray:
  """uint8 [T, H, W, 3] with a one-pixel red border: marks generated frames."""
  frames = frames.copy()
  frames[:, [0, -1], :] = frames[:, :, [0, -1]] = (255, 0, 0)
  return frames


def write_video_files(
  directory: Path, name: str, context: np.ndarray, prediction: np.ndarray, truth: np.ndarray | None, fps: int
) -> None:
  """Write NAME.mp4/.gif, NAME_frames/*.png and, with the truth, NAME_vs_truth.mp4/.gif (float [-1, 1] inputs)."""
  scale = max(1, 128 // context.shape[1])
  shown = np.concatenate([to_uint8(context), _framed(to_uint8(prediction))])
  media.save_mp4(directory / f"{name}.mp4", shown, fps=fps, scale=scale)
  media.save_gif(directory / f"{name}.gif", shown, fps=fps, scale=scale)
  frame_dir = directory / f"{name}_frames"
  frame_dir.mkdir(exist_ok=True)
  for i, frame in enumerate(shown):
    media.save_png(frame_dir / f"frame_{i:03d}.png", frame, scale=scale)
  if truth is not None and len(truth):
    real = np.concatenate([to_uint8(context), to_uint8(truth)])
    side = np.concatenate([real, shown[: len(real)]], axis=2)
    media.save_mp4(directory / f"{name}_vs_truth.mp4", side, fps=fps, scale=scale)
    media.save_gif(directory / f"{name}_vs_truth.gif", side, fps=fps, scale=scale)


def continue_videos(
  setup: Setup,
  params: Any,
  videos: Videos,
  sampling: SamplingConfig,
  context_frames: int,
  frames: int,
  seed: int,
  cached: bool = True,
  batch_size: int = 8,
) -> list[np.ndarray]:
  """float32 [frames, H, W, 3] continuations of each video's first `context_frames` frames, in batches.

  Video i's noise comes from fold_in(key(seed), i), so a video's sample does not
  depend on the batch it is generated in.
  """
  short = [name for name, v in videos if len(v) < context_frames]
  if short:
    raise ValueError(f"videos with fewer than --context_frames={context_frames} frames: {short}")
  sampler = Sampler(setup, sampling)
  encode, decode = jax.jit(setup.tokenizer.encode), jax.jit(setup.tokenizer.decode)
  clips = -(-frames // sampling.clip_frames)
  out: list[np.ndarray] = []
  with tqdm(total=clips * len(videos), desc="sample", unit="clip", dynamic_ncols=True) as progress:
    for first in range(0, len(videos), batch_size):
      batch = videos[first : first + batch_size]
      latents = encode(jnp.asarray(np.stack([v[:context_frames] for _, v in batch])))
      keys = jnp.stack([jax.random.fold_in(jax.random.key(seed), first + i) for i in range(len(batch))])
      generated = sampler.rollout(
        params, latents, keys, frames, cached=cached, on_clip=lambda done, _: progress.update(len(batch))
      )
      out.extend(np.clip(np.asarray(decode(generated)), -1, 1))
  return out


def run(
  checkpoint_path: str,
  output: str | Path,
  *,
  context: str = "",
  num_videos: int = 4,
  context_frames: int = 0,
  frames: int = 0,
  sampling: SamplingConfig | None = None,
  seed: int = 0,
  weights: str = "auto",
  step: int = -1,
  cached: bool = True,
  fps: int = 8,
  batch_size: int = 8,
) -> dict[str, Any]:
  """The CLI's work; returns what samples.json holds. 0 for lengths means the run's defaults (`with_run_defaults`)."""
  setup, params, step = checkpoint.load_model(checkpoint_path, step, weights)
  context_frames, frames, sampling = with_run_defaults(setup.config, context_frames, frames, sampling)
  wanted = context_frames + frames
  if context:
    videos = file_videos(setup, context, num_videos, wanted)
  else:
    videos = held_out_videos(setup, num_videos, wanted)
  if not videos:
    raise ValueError(f"no usable video to continue in {context or 'the held-out set'}")
  predictions = continue_videos(setup, params, videos, sampling, context_frames, frames, seed, cached, batch_size)
  directory = Path(output)
  directory.mkdir(parents=True, exist_ok=True)
  report: dict[str, Any] = {"checkpoint": str(checkpoint_path), "step": step, "videos": {}}
  report["sampling"] = {k: getattr(sampling, k) for k in ("steps", "shift", "guidance", "clip_frames", "window")}
  for (name, video), prediction in zip(videos, predictions):
    truth = video[context_frames:]
    write_video_files(directory, name, video[:context_frames], prediction, truth if len(truth) else None, fps)
    entry = {"context_frames": context_frames, "generated_frames": frames, "truth_frames": len(truth)}
    if len(truth):
      entry["mse_vs_truth"] = float(np.mean(np.square(prediction[: len(truth)] - truth)))
    report["videos"][name] = entry
  (directory / "samples.json").write_text(json.dumps(report, indent=2))
  return report


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


def _define_flags() -> None:
  define_sampling_flags(num_videos=4, batch_size=8)
  flags.DEFINE_string("context", "", "A video file or a directory of videos; empty: the run's held-out videos.")
  flags.DEFINE_string("output", "", "Where to write; default CHECKPOINT/samples.")
  flags.DEFINE_bool("cached", True, "KV-cached sampling; --nocached recomputes everything per step (reference).")
  flags.DEFINE_integer("fps", 8, "Frame rate of the written videos.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  output = f.output or str(Path(f.checkpoint) / "samples")
  try:
    report = run(
      f.checkpoint,
      output,
      context=f.context,
      num_videos=f.num_videos,
      context_frames=f.context_frames,
      frames=f.frames,
      sampling=sampling_from_flags(),
      seed=f.seed,
      weights=f.weights,
      step=f.step,
      cached=f.cached,
      fps=f.fps,
      batch_size=f.batch_size,
    )
  except (ValueError, checkpoint.CheckpointError) as e:
    raise SystemExit(f"sample: {e}") from None
  print(f"wrote {len(report['videos'])} videos to {output} (mp4, gif, png frames, samples.json)")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
