"""Held-out videos (the end-of-run sample's, `sample`'s and `evaluate`'s) and the user's files to continue.

Each video comes at the run's frame stride and frame size (with data.buckets: its bucket's), from its
first frame, as long as it is (up to the frames asked for).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from vgpt_jax.data import video_files
from vgpt_jax.data.buckets import frame_size
from vgpt_jax.data.pipeline import held_out_members, make_source, to_float
from vgpt_jax.data.sources import SKIP_REASONS, BadVideo, NoUsableVideo, VideoSource
from vgpt_jax.run import Run
from vgpt_jax.sampler import Videos


def held_out_videos(
  data_cfg: Any, count: int, frames: int = 0, source: VideoSource | None = None, any_bucket: bool = False
) -> Videos:
  """The first `count` usable held-out videos: frames 0, s, 2s, ... (s = data.frame_stride), `frames` of each.

  frames 0: data.num_frames; a video with fewer gives what it has (at least
  data.num_frames). Float32 frames in [-1, 1], or a latents source's stored
  latents. With data.buckets, only the videos at data.height x data.width, or
  with `any_bucket` every video at its bucket's size. Bad videos are skipped;
  NoUsableVideo when fewer than `count` are usable. `source`: the eval source
  when the caller has built it already. The end-of-run sample, `sample` and
  `evaluate` all read their held-out videos here.
  """
  source = make_source(data_cfg, "eval") if source is None else source
  frames = frames or source.num_frames
  members = range(len(source)) if any_bucket else held_out_members(source, data_cfg)
  if not 0 <= count <= len(members):
    raise ValueError(
      f"count must lie in [0, {len(members)}] (the held-out videos: {source.describe()}; "
      f"data.num_eval_videos={data_cfg.num_eval_videos}), got {count}."
    )
  out: Videos = []
  skipped = dict.fromkeys(SKIP_REASONS, 0)
  for index in members:
    if len(out) == count:
      break
    try:
      clip_frames = source.shapes()[source.bucket(index)][0]
      video = source.leading_frames(index, source.strides[0], max(frames, clip_frames))[:frames]
    except BadVideo as e:
      skipped[e.reason] += 1
      continue
    out.append((f"heldout_{index:04d}", video if source.yields == "latents" else to_float(video)))
  if len(out) < count:
    counts = ", ".join(f"{r}={n}" for r, n in skipped.items() if n)
    raise NoUsableVideo(
      f"only {len(out)} of the {count} held-out videos asked for are usable ({counts}) in {source.describe()}"
    )
  return out


def held_out_clips(data_cfg: Any, count: int, source: VideoSource | None = None) -> np.ndarray:
  """float32 [count, F, ...]: `held_out_videos` of data.num_frames frames each, stacked (frames or latents)."""
  return np.stack([video for _, video in held_out_videos(data_cfg, count, 0, source)])


def context_videos(run: Run, count: int, frames: int) -> Videos:
  """`held_out_videos` of the run's data as frames (a latents source's are decoded; the sampler encodes them)."""
  source = make_source(run.config.data, "eval")
  videos = held_out_videos(run.config.data, min(count, len(source)), frames, source, any_bucket=True)
  if run.inputs != "latents":
    return videos
  decode = jax.jit(run.tokenizer.decode)
  return [(name, np.clip(np.asarray(decode(jnp.asarray(latents))), -1, 1)) for name, latents in videos]


def file_videos(run: Run, path: str, count: int, frames: int) -> Videos:
  """Up to `count` videos from a file or a directory, up to `frames` frames each, at the run's stride and size
  (with data.buckets: the size of the bucket nearest each video's aspect)."""
  data = run.config.data
  paths = [path] if Path(path).is_file() else video_files.find_videos(path)
  if not paths:
    raise ValueError(f"--context={path}: no video file there (extensions {list(video_files.VIDEO_EXTENSIONS)})")
  stride = int(data.frame_stride)

  def window(available: int) -> tuple[int, int, int]:
    if available < stride:
      raise BadVideo("too_short", f"no frame at stride {stride}")
    return 0, stride, min(available // stride, frames)

  out: Videos = []
  for p in paths[:count]:
    try:
      size = (int(data.height), int(data.width))
      if len(data.buckets):
        info = video_files.probe(p)
        size = frame_size(data, info.width, info.height)
      clip, _ = video_files.read_clip(p, window, height=size[0], width=size[1])
    except BadVideo as e:
      logging.warning("skipped %s: %s", p, e)
      continue
    out.append((Path(p).stem, to_float(clip)))
  return out
