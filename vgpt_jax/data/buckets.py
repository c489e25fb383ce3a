"""Aspect-ratio buckets: frame shapes of about one token budget, each video assigned to the one that keeps
most of its picture, and a deterministic per-batch choice of bucket.

Why: the reference trains every video at its own aspect; one fixed frame size crops a portrait video to a
sliver. With `data.buckets` set, each video is assigned once to its bucket (`assign`), every global batch
holds videos of one bucket (`BucketSchedule` picks which, from the seed alone), and the train step is
compiled once per bucket. `python -m vgpt_jax.benchmarks.buckets` measures the pixels kept on a mixed corpus.

A bucket is (height, width) in pixels, optionally with a frame count. `cover_crop` (sources.py) fits a frame
to a bucket by scaling it to cover the bucket and cropping the centre, so the share of the source picture
kept is min(a, b) / max(a, b) for source aspect a = width / height and bucket aspect b.
"""

from __future__ import annotations

import dataclasses
import math
import threading
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


def config_buckets(data_cfg) -> list[Bucket]:
  """The buckets of `data.buckets` as given (sides checked against the tokenizer by config validation)."""
  return parse_buckets(data_cfg.buckets, 1, 1) if len(data_cfg.buckets) else []


def base_bucket(data_cfg) -> int | None:
  """Index of the bucket of data.height x data.width x data.num_frames; 0 without buckets; None when no bucket
  has that shape (config validation refuses such a config)."""
  d = data_cfg
  buckets = config_buckets(d)
  if not buckets:
    return 0
  shape = (d.height, d.width, d.num_frames)
  return next((i for i, b in enumerate(buckets) if (b.height, b.width, b.frames or d.num_frames) == shape), None)


def frame_size(data_cfg, width: int, height: int) -> tuple[int, int]:
  """(height, width) a width x height video is fitted to when sampled or evaluated: its nearest bucket's, or
  data.height x data.width without buckets."""
  buckets = config_buckets(data_cfg)
  if not buckets:
    return int(data_cfg.height), int(data_cfg.width)
  bucket = buckets[assign(width, height, buckets)]
  return bucket.height, bucket.width


def assign(
  width: int, height: int, buckets: Sequence[Bucket], video_frames: int = 0, num_frames: int = 0, stride: int = 1
) -> int | None:
  """Index of the bucket nearest the video's aspect (|log aspect ratio|, so 2:1 and 1:2 are equally far from
  1:1); of equals, the longest clip, then the larger frame (less upscaling).

  With `video_frames` > 0 only buckets whose clip fits the video count (frames, or `num_frames` for a bucket
  without its own, times `stride`); None when none does (the video is too short).
  """
  log_aspect = math.log(width / height)
  fits = [i for i, b in enumerate(buckets) if video_frames <= 0 or (b.frames or num_frames) * stride <= video_frames]
  if not fits:
    return None
  return min(
    fits,
    key=lambda i: (
      round(abs(log_aspect - math.log(buckets[i].aspect)), 12),
      -(buckets[i].frames or num_frames),
      -buckets[i].height * buckets[i].width,
    ),
  )


def probabilities(counts: Sequence[int], weights: Sequence[float] = ()) -> np.ndarray:
  """float64 [len(counts)]: how often each bucket's batches come: in proportion to its videos (`counts`), or to
  `weights` when given (data.bucket_weights); a weighted bucket without videos is an error (ValueError)."""
  p = np.asarray(weights if len(weights) else counts, np.float64)
  if p.shape != (len(counts),) or (p < 0).any() or p.sum() <= 0:
    raise ValueError(f"bucket weights {list(p)} must be >= 0, one per bucket, not all 0")
  empty = [i for i, (w, n) in enumerate(zip(p, counts)) if w > 0 and n == 0]
  if empty:
    raise ValueError(f"data.bucket_weights gives weight to buckets {empty}, which hold no usable videos")
  return p / p.sum()


class BucketSchedule:
  """The bucket of every global batch, drawn from the seed alone, and how many earlier batches share it.

  Every host (any number of them, any worker count) and a resumed run compute the same sequence. Batches are
  drawn in blocks of `block` from default_rng([seed, block number]); `seen(g)` (the batches before g of g's
  bucket) says where batch g starts in its bucket's own video stream, so each bucket's videos are used in
  turn, once per its epoch. One bucket: every batch is bucket 0 and seen(g) = g, with no draws.
  """

  def __init__(self, seed: int, p: Sequence[float], block: int = 4096):
    self.seed, self.p, self.block = int(seed), np.asarray(p, np.float64), block
    self._before = [np.zeros(len(self.p), np.int64)]  # per block: batches of each bucket in earlier blocks
    self._draws: dict[int, np.ndarray] = {}
    self._lock = threading.Lock()  # Grain's prefetch threads ask at once

  def __getstate__(self) -> dict:
    return {**self.__dict__, "_lock": None, "_draws": {}}

  def __setstate__(self, state: dict) -> None:
    self.__dict__.update(state, _lock=threading.Lock())

  def _block(self, k: int) -> np.ndarray:
    if k not in self._draws:
      if len(self._draws) > 4:
        self._draws.clear()
      rng = np.random.default_rng([self.seed, k])
      self._draws[k] = rng.choice(len(self.p), size=self.block, p=self.p).astype(np.int64)
    return self._draws[k]

  def bucket(self, g: int) -> int:
    """The bucket of global batch g."""
    if len(self.p) == 1:
      return 0
    with self._lock:
      return int(self._block(g // self.block)[g % self.block])

  def seen(self, g: int) -> int:
    """How many global batches before g hold g's bucket."""
    if len(self.p) == 1:
      return g
    k, r = divmod(g, self.block)
    with self._lock:
      while len(self._before) <= k:
        j = len(self._before) - 1
        self._before.append(self._before[j] + np.bincount(self._block(j), minlength=len(self.p)))
      before, draws = self._before[k], self._block(k)
    return int(before[draws[r]] + np.count_nonzero(draws[:r] == draws[r]))
