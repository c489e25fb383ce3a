"""Clips, token layout and positions (SPEC sections 2-3)."""

import collections

import jax
import ml_collections
import numpy as np
import pytest

from vgpt_jax import layout as L


def test_training_layout_shape_and_positions():
  n, s = 6, 4
  lay = L.training_layout(n, s)
  seg = s + 2
  assert lay.length == (2 * n - 1) * seg
  # Clean frames 0..N-2 first, then noisy frames 0..N-1.
  assert (lay.stream[: (n - 1) * seg] == L.CLEAN).all() and (lay.stream[(n - 1) * seg :] == L.NOISY).all()
  # Both copies of frame f occupy positions f*L .. f*L+L-1, each exactly once.
  for stream, frames in ((L.CLEAN, range(n - 1)), (L.NOISY, range(n))):
    for f in frames:
      sel = (lay.stream == stream) & (lay.frame == f)
      np.testing.assert_array_equal(np.sort(lay.position[sel]), np.arange(f * seg, (f + 1) * seg))
  # Segment contents: [<img>, patches, </img>] and [<diff>, TIME, patches].
  first_clean = lay.kind[:seg]
  assert first_clean.tolist() == [L.BOS] + [L.PATCH] * s + [L.EOS]
  first_noisy = lay.kind[(n - 1) * seg : n * seg]
  assert first_noisy.tolist() == [L.BOS, L.TIME] + [L.PATCH] * s
  # Every table entry used by a noisy patch exactly once; noisy_patch_index inverts it.
  idx = lay.noisy_patch_index()
  assert idx.shape == (n, s)
  assert (lay.source[idx] == n * s + np.arange(n * s).reshape(n, s)).all()


def test_interleaved_layout_is_a_reordering_plus_unused_clean_copies():
  sizes = (2, 1, 3)
  n, s = sum(sizes), 3
  ref = L.interleaved_layout(sizes, s)
  ours = L.training_layout(n, s)
  key = lambda lay: collections.Counter(zip(lay.stream, lay.frame, lay.kind, lay.position, lay.source))
  ref_tokens, our_tokens = key(ref), key(ours)
  assert not ref_tokens - our_tokens  # every reference token is in ours
  extra = our_tokens - ref_tokens  # ours adds clean copies of last-clip frames only
  assert {(int(st), int(f)) for st, f, *_ in extra} == {(L.CLEAN, 3), (L.CLEAN, 4)}


def _is_valid_split(split: np.ndarray) -> bool:
  return split[0] == 0 and np.all(np.diff(split) >= 0) and np.all(np.diff(split) <= 1)


def test_random_split_properties():
  n = 8
  fn = jax.jit(lambda k: L.random_split(k, n))
  counts = collections.Counter()
  cuts = np.zeros(n - 1)
  draws = 2000
  for i in range(draws):
    split = np.asarray(fn(jax.random.key(i)))
    assert _is_valid_split(split), split
    k = split[-1] + 1
    counts[k] += 1
    cuts += np.diff(split)
  assert fn._cache_size() == 1  # one compilation for every split
  # K ~ U{2..N}: each value about draws/7 times.
  assert set(counts) == set(range(2, n + 1))
  assert all(abs(c - draws / (n - 1)) < 0.35 * draws / (n - 1) for c in counts.values()), counts
  # Cut points uniform over the gaps.
  assert np.all(np.abs(cuts / cuts.mean() - 1) < 0.15), cuts


def test_random_split_respects_clip_bounds():
  for i in range(200):
    split = np.asarray(L.random_split(jax.random.key(i), 10, min_clips=3, max_clips=4))
    assert _is_valid_split(split) and 3 <= split[-1] + 1 <= 4


@pytest.mark.parametrize("mode", ["random", "per_frame", "fixed"])
def test_sample_splits_modes(mode):
  cfg = ml_collections.ConfigDict(dict(split=mode, min_clips=2, max_clips=-1, fixed_clip_sizes=(2, 3)))
  splits = np.asarray(L.sample_splits(jax.random.key(0), 16, 5, cfg))
  assert splits.shape == (16, 5)
  assert all(_is_valid_split(s) for s in splits)
  if mode == "random":
    assert len({tuple(s) for s in splits}) > 1  # independent per sample
  elif mode == "per_frame":
    assert (splits == np.arange(5)).all()
  else:
    assert (splits == [0, 0, 1, 1, 1]).all()


def test_token_ids_gather_block_per_sample():
  lay = L.training_layout(3, 2)
  split = np.array([[0, 1, 1], [0, 0, 1]], np.int32)
  ids = L.token_ids(lay, split)
  assert ids.clip.shape == (2, lay.length)
  np.testing.assert_array_equal(np.asarray(ids.clip), split[:, lay.frame])
  np.testing.assert_array_equal(np.asarray(ids.position[1]), lay.position)


def test_context_parallel_layout_is_balanced_with_sorted_slices():
  """The same tokens padded and reordered: each device's slice sorted by (stream, frame), the devices' attention
  work (visible entries of their queries) nearly equal, as contiguous slices of the training order are not."""
  from vgpt_jax.attention.mask import dense_mask

  frames, shards = 9, 4
  plain = L.pad_layout(L.training_layout(frames, 6), 2 * shards)
  balanced = L.context_parallel_layout(L.training_layout(frames, 6), shards)
  rows = lambda lay: sorted(zip(lay.frame, lay.stream, lay.kind, lay.position, lay.source))  # noqa: E731
  assert rows(balanced) == rows(plain)
  for piece in np.split(np.arange(balanced.length), shards):
    key = balanced.stream[piece] * frames + balanced.frame[piece]
    assert (np.diff(key) >= 0).all()
  split = np.array([[0, 0, 1, 1, 1, 2, 3, 3, 4]])

  def work(layout):
    ids = L.token_ids(layout, split)
    return np.asarray(dense_mask(ids, ids))[0].sum(axis=1).reshape(shards, -1).sum(axis=1)

  assert work(balanced).max() / work(balanced).min() < 1.2 < work(plain).max() / work(plain).min()
