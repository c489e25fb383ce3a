"""Aspect-ratio buckets: frame shapes of about one token budget, each video assigned to the one that keeps
most of its picture, and a deterministic per-batch choice of bucket.

Building blocks of issue 17's bucketed training (the reference trains every video at its own aspect; a fixed
frame size crops a portrait video to a sliver). Not yet wired into the data pipeline or the train step: what is
here is pure and tested (assignment, crop loss, the bucket of each global batch), and
`python -m vgpt_jax.benchmarks.buckets` measures the pixels kept on a mixed corpus.

A bucket is (height, width) in pixels, optionally with a frame count. `cover_crop` (sources.py) fits a frame
to a bucket by scaling it to cover the bucket and cropping the centre, so the share of the source picture
kept is min(a, b) / max(a, b) for source aspect a = width / height and bucket aspect b.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Bucket:
  height: int
  width: int
  frames: int = 0  # 0: the config's data.num_frames

  @property
  def aspect(self) -> float:
    return self.width / self.height

  def tokens(self, downsample: int, patch: int, num_frames: int) -> int:
    """Patch tokens of one sample in this bucket (frames x (h / (downsample * patch)) x (w / ...))."""
    side = downsample * patch
    return (self.frames or num_frames) * (self.height // side) * (self.width // side)


def parse_buckets(spec: Sequence[Sequence[int]], downsample: int, patch: int) -> list[Bucket]:
  """Buckets from [(height, width[, frames]), ...]; each side a multiple of downsample * patch (ValueError)."""
  side = downsample * patch
  buckets = []
  for entry in spec:
    if len(entry) not in (2, 3) or any(int(x) <= 0 for x in entry):
      raise ValueError(f"bucket {tuple(entry)}: give (height, width) or (height, width, frames), all positive")
    bucket = Bucket(*(int(x) for x in entry))
    if bucket.height % side or bucket.width % side:
      raise ValueError(
        f"bucket {bucket.height}x{bucket.width}: sides must be multiples of {side} (tokenizer downsample "
        f"{downsample} x patch {patch})"
      )
    buckets.append(bucket)
  if not buckets:
    raise ValueError("data.buckets is empty")
  return buckets


def kept_fraction(width: int, height: int, bucket: Bucket) -> float:
  """Share of a width x height picture that survives cover-scaling to `bucket` and the centre crop."""
  a, b = width / height, bucket.aspect
  return min(a, b) / max(a, b)


def assign(width: int, height: int, buckets: Sequence[Bucket]) -> int:
  """Index of the bucket nearest the video's aspect (|log aspect ratio|, so 2:1 and 1:2 are equally far from
  1:1); of equals, the larger bucket (less upscaling)."""
  log_aspect = math.log(width / height)
  return min(
    range(len(buckets)),
    key=lambda i: (round(abs(log_aspect - math.log(buckets[i].aspect)), 12), -buckets[i].height * buckets[i].width),
  )


def batch_bucket(seed: int, step: int, counts: Sequence[int], weights: Sequence[float] | None = None) -> int:
  """The bucket of global batch `step`: drawn in proportion to `counts` (videos per bucket), or to `weights`
  when given, from (seed, step) alone, so every host (any number of them) picks the same one and a resumed run
  continues the same sequence."""
  p = np.asarray(weights if weights is not None else counts, np.float64)
  if p.shape != (len(counts),) or (p < 0).any() or p.sum() <= 0:
    raise ValueError(f"bucket weights {list(p)} must be >= 0, one per bucket, not all 0")
  rng = np.random.default_rng([seed, step])
  return int(rng.choice(len(p), p=p / p.sum()))
