"""What every video source gives the pipeline: numbered videos and a way to cut a clip.

A source is random access (`len`, `clip`) so Grain can shuffle, shard and
checkpoint positions. `clip` draws everything random (frame stride, start
frame) from the generator it is handed, which the pipeline seeds from the
sample's global position: the same global batch comes out whatever the number
of hosts or workers.

A video that cannot give a clip raises `BadVideo` with one of `SKIP_REASONS`;
the pipeline skips it, counts the reason and takes another video, so one bad
file never stops training.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

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


class BadVideo(Exception):
  """This video cannot give a clip; `reason` is one of SKIP_REASONS."""

  def __init__(self, reason: str, detail: str = ""):
    if reason not in SKIP_REASONS:
      raise ValueError(f"unknown skip reason {reason!r}; use one of {SKIP_REASONS}")
    super().__init__(f"{reason}: {detail}" if detail else reason)
    self.reason = reason
    self.detail = detail


class VideoSource(Protocol):
  """Random-access videos; a clip is uint8 [data.num_frames, data.height, data.width, 3].

  Optional: `first_clip(index) -> uint8 [F, H, W, 3]`, frames 0, s, 2s, ...
  with s = data.frame_stride, which the held-out samples use when present
  (else they use `clip(index, default_rng([index]))`).

  Optional: `leading_frames(index, stride, max_frames=0) -> uint8 [T, H, W, 3]`,
  frames 0, stride, 2*stride, ... as many as the video has (T <= max_frames
  when > 0), which `python -m vgpt_jax.encode` needs to pre-encode a source.
  """

  def __len__(self) -> int: ...

  def clip(self, index: int, rng: np.random.Generator) -> np.ndarray:
    """A clip of video `index`, its stride and start drawn from `rng`; raises BadVideo."""
    ...

  def describe(self) -> str:
    """Where the videos come from (a directory, a manifest, a dataset name), for error messages."""
    ...


class NoUsableVideo(RuntimeError):
  """Every candidate video for a sample was bad; the message names the source and the reasons."""
