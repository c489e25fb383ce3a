"""Aspect-ratio buckets (data/buckets.py): assignment, the share of the picture kept, the batch's bucket."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from vgpt_jax.benchmarks import buckets as bench
from vgpt_jax.data.buckets import (
  Bucket,
  BucketSchedule,
  assign,
  frame_size,
  kept_fraction,
  parse_buckets,
  probabilities,
)
from vgpt_jax.data.sources import cover_crop

PAPER = parse_buckets([(176, 320), (320, 176), (240, 240)], downsample=8, patch=2)


@pytest.mark.parametrize(
  "width, height, want",
  [(1920, 1080, 0), (1080, 1920, 1), (500, 500, 2), (4000, 1000, 0), (1000, 4000, 1), (330, 300, 2)],
  ids=["landscape", "portrait", "square", "extreme-wide", "extreme-tall", "near-square"],
)
def test_videos_go_to_the_nearest_aspect(width, height, want):
  assert assign(width, height, PAPER) == want
  others = [kept_fraction(width, height, b) for i, b in enumerate(PAPER) if i != want]
  assert kept_fraction(width, height, PAPER[want]) >= max(others)  # the nearest aspect keeps the most


@pytest.mark.parametrize("width, height", [(1920, 1080), (1080, 1920), (500, 500), (4000, 1000)])
def test_kept_fraction_is_what_cover_crop_keeps(width, height):
  for bucket in PAPER:
    new_h, new_w, _, _ = cover_crop(height, width, bucket.height, bucket.width)
    assert kept_fraction(width, height, bucket) == pytest.approx(bucket.height * bucket.width / (new_h * new_w), 0.01)


def test_the_paper_buckets_share_one_token_budget_and_bad_ones_are_refused():
  assert [b.tokens(8, 2, 1) for b in PAPER] == [220, 220, 225]
  assert Bucket(176, 320, 80).tokens(8, 2, 48) == 80 * 220  # its own frame count wins
  with pytest.raises(ValueError, match="multiples of 16"):
    parse_buckets([(170, 320)], 8, 2)
  with pytest.raises(ValueError, match="positive"):
    parse_buckets([(176,)], 8, 2)


def test_each_batch_bucket_is_drawn_from_seed_and_step_in_proportion():
  counts = [600, 300, 100]
  p = probabilities(counts)
  schedule = BucketSchedule(0, p, block=512)  # several blocks
  draws = [schedule.bucket(g) for g in range(6000)]
  fresh = BucketSchedule(0, p, block=512)
  assert draws == [fresh.bucket(g) for g in reversed(range(6000))][::-1]  # any host, any order, any restart
  np.testing.assert_allclose(np.bincount(draws, minlength=3) / 6000, [0.6, 0.3, 0.1], atol=0.02)
  assert draws != [BucketSchedule(1, p, block=512).bucket(g) for g in range(6000)]  # another seed
  # seen(g): the batches before g of g's bucket, asked in any order
  later = BucketSchedule(0, p, block=512)
  for g in (5999, 17, 3000, 512, 511, 0):
    assert later.seen(g) == draws[:g].count(draws[g])
  shipped = pickle.loads(pickle.dumps(later))  # as Grain ships it to worker processes (its lock is remade)
  assert [shipped.bucket(g) for g in range(600)] == draws[:600] and shipped.seen(5999) == later.seen(5999)
  assert {BucketSchedule(0, probabilities(counts, [0, 1, 0])).bucket(g) for g in range(50)} == {1}
  one = BucketSchedule(3, [1.0])
  assert [one.bucket(g) for g in range(5)] == [0] * 5 and one.seen(123) == 123
  with pytest.raises(ValueError, match="not all 0"):
    probabilities(counts, [0, 0, 0])
  with pytest.raises(ValueError, match="hold no usable videos"):
    probabilities([5, 0, 1], [1, 1, 1])


@pytest.mark.parametrize(
  "width, height, frames, want",
  [(1920, 1080, 100, 1), (1920, 1080, 20, 0), (1920, 1080, 7, None), (1080, 1920, 100, 2)],
  ids=["long-landscape", "short-landscape", "too-short", "portrait"],
)
def test_duration_buckets_take_the_longest_clip_that_fits(width, height, frames, want):
  buckets = parse_buckets([(176, 320, 8), (176, 320, 32), (320, 176)], 8, 2)  # the last: data.num_frames (16)
  assert assign(width, height, buckets, frames, num_frames=16, stride=2) == want


def test_buckets_keep_more_of_a_mixed_corpus():
  rows = {kind: (fixed, bucketed) for kind, _, fixed, bucketed, _ in bench.table()}
  assert rows["portrait 9:16"][0] < 0.35 and rows["portrait 9:16"][1] > 0.95
  assert rows["all"][1] > rows["all"][0] + 0.25


def test_frame_size_is_the_nearest_buckets_or_the_configs():
  from tests.conftest import data_config

  bucketed = data_config(height=176, width=320, buckets=((176, 320), (320, 176), (240, 240)))
  assert frame_size(bucketed, 1080, 1920) == (320, 176)  # a portrait phone video
  assert frame_size(bucketed, 1920, 1080) == (176, 320)
  assert frame_size(bucketed, 640, 600) == (240, 240)
  assert frame_size(data_config(height=32, width=48), 1080, 1920) == (32, 48)  # no buckets: the config's size
