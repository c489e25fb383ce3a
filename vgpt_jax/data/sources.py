"""The one contract every video source meets, and the one place clip windows are chosen.

A source (the physics world, video files, TFDS, pre-encoded latents) is
random access so Grain can shuffle, shard and checkpoint positions. It says
how many videos it has (`len`) and where they come from (`describe`), and it
reads frames at indices (`read(index, window)`: the window is asked for the
video's frame count and answers which frames). Everything else is built
here, once, on `read`: a training clip (`clip`: stride and start drawn from
the generator it is handed, which the pipeline seeds from the sample's global
position, so the same global batch comes out whatever the number of hosts or
workers) and a video's frames from the first at a stride (`leading_frames`:
the held-out clips, the samples' contexts and pre-encoding).

A video that cannot give a clip raises `BadVideo` with one of `SKIP_REASONS`;
the pipeline skips it, counts the reason and takes another video, so one bad
file never stops training.
"""

from __future__ import annotations

import types
from typing import Any, Callable, Mapping

import numpy as np
from PIL import Image

# Why a video was skipped; the pipeline counts each. In the order the checks meet them: a file with
# two faults is counted under the first.
SKIP_REASONS = (
  "unreadable",  # missing, zero-byte, not a container FFmpeg knows, decoder error, no frame
  "no_video_stream",  # a container without moving pictures (audio only, cover art only)
  "bad_aspect",  # long side / short side over data.max_aspect
  "too_small",  # shorter side under data.min_size
  "too_short",  # fewer frames than num_frames * stride
  "truncated",  # decoding stops before the frames the header promises (a file cut short)
)


def stride_range(data_cfg: Any) -> tuple[int, int]:
  """(min, max) frame stride of a clip: [data.frame_stride, data.frame_stride_max], max = min unless larger."""
  low = int(data_cfg.frame_stride)
  return low, max(low, int(data_cfg.frame_stride_max))


def cover_crop(height: int, width: int, out_height: int, out_width: int) -> tuple[int, int, int, int]:
  """(scaled height, scaled width, top, left): a frame scaled, aspect kept, to the smallest size covering
  out_height x out_width, then the centre crop's corner. Every source that resizes frames fits them this way
  (`fit_frames`, and the video-file decoder's scaler)."""
  scale = max(out_width / width, out_height / height)
  new_h, new_w = max(out_height, round(height * scale)), max(out_width, round(width * scale))
  return new_h, new_w, (new_h - out_height) // 2, (new_w - out_width) // 2


def fit_frames(frames: np.ndarray, height: int, width: int) -> np.ndarray:
  """uint8 [T, h, w, C] (C = 1 or 3) -> uint8 [T, height, width, 3]: the one resize of decoded frames.

  Resized (PIL bicubic) to `cover_crop`'s size, then centre-cropped; frames
  already that size are returned untouched, so stored pixels come back bit for
  bit. Grey becomes RGB. (Video files are scaled the same way inside the
  decoder, by swscale, so a 4K frame is never held at full size.)
  """
  t, h, w, c = frames.shape
  if (h, w) != (height, width):
    new_h, new_w, top, left = cover_crop(h, w, height, width)
    out = np.empty((t, height, width, c), dtype=np.uint8)
    for i in range(t):
      image = Image.fromarray(frames[i, :, :, 0] if c == 1 else frames[i])
      resized = np.asarray(image.resize((new_w, new_h), Image.Resampling.BICUBIC))
      out[i] = resized.reshape(new_h, new_w, c)[top : top + height, left : left + width]
    frames = out
  if c == 1:
    frames = np.repeat(frames, 3, axis=-1)
  return frames


def choose_window(
  video_frames: int, num_frames: int, strides: tuple[int, int], rng: np.random.Generator
) -> tuple[int, int]:
  """(start, stride) of a clip of `num_frames` frames in a video of `video_frames`: the stride uniform over
  `strides` capped to what fits, then the start uniform. Every source draws its windows here, in this order.

  Raises BadVideo("too_short") when even strides[0] needs more frames than the video has.
  """
  low, high = strides
  high = min(high, video_frames // num_frames)
  if high < low:
    raise BadVideo(
      "too_short",
      f"{video_frames} frames < data.num_frames * data.frame_stride = {num_frames} * {low} = {num_frames * low}",
    )
  stride = int(rng.integers(low, high + 1))
  start = int(rng.integers(0, video_frames - num_frames * stride + 1))
  return start, stride


class BadVideo(Exception):
  """This video cannot give a clip; `reason` is one of SKIP_REASONS."""

  def __init__(self, reason: str, detail: str = ""):
    if reason not in SKIP_REASONS:
      raise ValueError(f"unknown skip reason {reason!r}; use one of {SKIP_REASONS}")
    super().__init__(f"{reason}: {detail}" if detail else reason)
    self.reason = reason
    self.detail = detail


# frames in the video -> (start, stride, count): which frames `read` returns; raises BadVideo when none fit.
Window = Callable[[int], tuple[int, int, int]]


class VideoSource:
  """Base of every source: numbered videos, read at the frame indices a `Window` picks.

  A source sets, from the config:
    yields       "video" (uint8 frames [T, H, W, 3] at data.height x data.width) or "latents" (float32 [T, h, w, C])
    num_frames   F, frames per clip (data.num_frames)
    strides      (min, max) stride of a training clip, in the frames it stores
    clip_shape   shape of one clip, (F, H, W, 3) or (F, h, w, C)
  and implements `__len__`, `describe` and `read`. A source with aspect buckets (data.buckets, buckets.py)
  also sets `bucket_shapes` (the clip shape of each bucket) and `bucket_of` (each video's bucket); `read`
  then gives a video's frames at its bucket's size.
  """

  yields: str = "video"
  num_frames: int
  strides: tuple[int, int]
  clip_shape: tuple[int, ...]
  bucket_shapes: tuple[tuple[int, ...], ...] = ()  # empty: no buckets, every clip is clip_shape
  bucket_of: np.ndarray | None = None  # int [len(self)]: each video's bucket, with buckets
  excluded: Mapping[str, int] = types.MappingProxyType({})  # bad videos left out before numbering, by reason

  def bucket(self, index: int) -> int:
    """Video `index`'s bucket (0 without buckets)."""
    return 0 if self.bucket_of is None else int(self.bucket_of[index])

  def shapes(self) -> tuple[tuple[int, ...], ...]:
    """The clip shape of each bucket: (clip_shape,) without buckets."""
    return self.bucket_shapes or (self.clip_shape,)

  def name(self, index: int) -> str:
    """What to call video `index` in logs and records (video files: its path)."""
    return str(index)

  def __len__(self) -> int:
    raise NotImplementedError

  def describe(self) -> str:
    """Where the videos come from (a directory, a manifest, a dataset name), for error messages."""
    raise NotImplementedError

  def read(self, index: int, window: Window) -> np.ndarray:
    """The frames of video `index` that `window(its frame count)` picks; raises BadVideo."""
    raise NotImplementedError

  def clip_with_window(self, index: int, rng: np.random.Generator) -> tuple[np.ndarray, int, int]:
    """(clip, start, stride): a training clip, its stride and start drawn from `rng` by `choose_window`."""
    chosen: list[int] = []
    n = self.shapes()[self.bucket(index)][0]

    def window(frames: int) -> tuple[int, int, int]:
      chosen[:] = choose_window(frames, n, self.strides, rng)
      return chosen[0], chosen[1], n

    clip = self.read(index, window)
    return clip, chosen[0], chosen[1]

  def clip(self, index: int, rng: np.random.Generator) -> np.ndarray:
    """A training clip [F, ...] of video `index`, its stride and start drawn from `rng`; raises BadVideo."""
    return self.clip_with_window(index, rng)[0]

  def leading_frames(self, index: int, stride: int, max_frames: int = 0) -> np.ndarray:
    """[T, ...]: frames 0, stride, 2*stride, ..., as many as the video has (T <= max_frames when > 0).

    What the samples continue and `python -m vgpt_jax.encode` stores; raises BadVideo("too_short") when T < F.
    """
    n = self.shapes()[self.bucket(index)][0]

    def window(frames: int) -> tuple[int, int, int]:
      count = frames // stride if max_frames <= 0 else min(max_frames, frames // stride)
      if count < n:
        raise BadVideo("too_short", f"{frames} frames < data.num_frames={n} * stride {stride}")
      return 0, stride, count

    return self.read(index, window)


class NoUsableVideo(RuntimeError):
  """Every candidate video for a sample was bad; the message names the source and the reasons."""
