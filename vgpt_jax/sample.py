"""Generate video continuations from a checkpoint and write them as files people can open.

  python -m vgpt_jax.sample --checkpoint=WORKDIR [--context=VIDEO_OR_DIR] [--frames=16]
      [--context_frames=4 --clip_frames=4 --steps=0 --shift=1 --guidance=1 --num_videos=4
       --output=DIR --weights=auto|params|ema --nocached]

Without --context, the run's held-out videos are continued (the synthetic
physics world's eval split by default). Each video's first --context_frames
frames (at the run's frame stride, scaled and cropped to its frame size; with
data.buckets, to the size of the bucket nearest the video's aspect) are the
context; --frames more are generated, --clip_frames at a time, with the
KV-cached sampler (vgpt_jax/sampler.py). Written to DIR (default
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

import numpy as np
from absl import app, flags

from vgpt_jax import checkpoint, media
from vgpt_jax.data.pipeline import to_uint8
from vgpt_jax.data.sources import NoUsableVideo
from vgpt_jax.rollouts import RolloutRequest, define_flags, open_request, request_from_flags
from vgpt_jax.sampler import continue_videos


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


def write_samples(
  request: RolloutRequest, output: str | Path, *, context: str = "", cached: bool = True, fps: int = 8
) -> dict[str, Any]:
  """The CLI's work (`context`: a video file or directory; empty: the held-out videos); returns samples.json."""
  opened = open_request(request, context)
  run, videos, context_frames, frames = opened.run, opened.videos, opened.context_frames, opened.frames
  sampling = opened.sampling
  if not videos:
    raise ValueError(f"no usable video to continue in {context or 'the held-out set'}")
  predictions = continue_videos(
    run, opened.params, videos, sampling, context_frames, frames, request.seed, cached, request.batch_size
  )
  directory = Path(output)
  directory.mkdir(parents=True, exist_ok=True)
  report: dict[str, Any] = {"checkpoint": str(request.checkpoint), "step": opened.step, "videos": {}}
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


def _define_flags() -> None:
  define_flags(num_videos=4, batch_size=8)
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
    report = write_samples(request_from_flags(), output, context=f.context, cached=f.cached, fps=f.fps)
  except (ValueError, NoUsableVideo, checkpoint.CheckpointError) as e:
    raise SystemExit(f"sample: {e}") from None
  print(f"wrote {len(report['videos'])} videos to {output} (mp4, gif, png frames, samples.json)")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
