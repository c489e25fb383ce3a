"""The hierarchical mask: every rule of SPEC section 3, checked against an independent oracle."""

import itertools

import numpy as np
import pytest

from vgpt_jax import layout as L
from vgpt_jax.attention.mask import dense_mask


def oracle(lay: L.Layout, clip_of_frame: np.ndarray) -> np.ndarray:
  """SPEC section 3 read literally, using offsets inside each segment instead of token kinds."""
  s = lay.tokens_per_frame
  seg = s + 2
  offset = lay.position - lay.frame * seg
  t = lay.length
  out = np.zeros((t, t), bool)
  for i, j in itertools.product(range(t), range(t)):
    fq, fk, oq, ok = lay.frame[i], lay.frame[j], offset[i], offset[j]
    if lay.stream[i] == L.CLEAN:
      if lay.stream[j] == L.NOISY:
        continue
      if fk < fq:
        out[i, j] = True
      elif fk == fq:
        if oq == 0:  # <img> sees itself
          out[i, j] = ok == 0
        elif oq <= s:  # patches see <img> and every patch of the frame
          out[i, j] = ok <= s
        else:  # </img> sees the whole segment
          out[i, j] = True
    else:
      bq, bk = clip_of_frame[fq], clip_of_frame[fk]
      if lay.stream[j] == L.CLEAN:
        out[i, j] = bk < bq
      elif bk == bq:
        if oq == 0:  # <diff> sees the <diff> tokens of its clip
          out[i, j] = ok == 0
        elif oq == 1:  # TIME sees <diff> and TIME tokens of its clip
          out[i, j] = ok <= 1
        else:  # patches see the whole clip
          out[i, j] = True
  return out


SPLITS_5 = [(1, 4), (4, 1), (2, 3), (3, 2), (1, 1, 3), (2, 2, 1), (1, 3, 1), (1, 1, 1, 1, 1)]


def _mask(lay: L.Layout, split: np.ndarray) -> np.ndarray:
  ids = L.token_ids(lay, split[None])
  return np.asarray(dense_mask(ids, ids))[0]


@pytest.mark.parametrize("sizes", SPLITS_5 + ["per_frame"])
@pytest.mark.parametrize("order", ["training", "interleaved"])
def test_mask_matches_spec_table(sizes, order):
  """5 frames, 3 tokens per frame: every (query, key) pair against the literal rules."""
  split = L.per_frame_split(5) if sizes == "per_frame" else L.fixed_split(sizes)
  lay = L.training_layout(5, 3) if order == "training" else L.interleaved_layout(np.bincount(split).tolist(), 3)
  np.testing.assert_array_equal(_mask(lay, split), oracle(lay, split))


def test_mask_rules_spelled_out():
  """Named facts of SPEC section 3 on one split, so a failure says which rule broke."""
  lay = L.training_layout(5, 3)
  split = L.fixed_split((2, 3))
  m = _mask(lay, split)
  clean, noisy = lay.stream == L.CLEAN, lay.stream == L.NOISY
  block = split[lay.frame]
  # Clean tokens never see noisy ones.
  assert not m[np.ix_(clean, noisy)].any()
  # A noisy clip never sees another noisy clip, nor the clean copy of itself or later clips.
  for b in range(2):
    q = noisy & (block == b)
    assert not m[np.ix_(q, noisy & (block != b))].any()
    assert not m[np.ix_(q, clean & (block >= b))].any()
    # ... but sees every clean token of earlier clips.
    assert m[np.ix_(q, clean & (block < b))].all()
  # The clean stream is frame-causal: a frame's tokens see all earlier clean frames.
  for f in range(1, 4):
    assert m[np.ix_(clean & (lay.frame == f), clean & (lay.frame < f))].all()
    assert not m[np.ix_(clean & (lay.frame == f), clean & (lay.frame > f))].any()
  # Inside noisy clip 1: <diff> sees only <diff>s, TIME sees <diff>s and TIMEs.
  q1 = noisy & (block == 1)
  kind = lay.kind
  diff_rows = m[q1 & (kind == L.BOS)][:, q1]
  np.testing.assert_array_equal(diff_rows, np.broadcast_to(kind[q1] == L.BOS, diff_rows.shape))
  time_rows = m[q1 & (kind == L.TIME)][:, q1]
  np.testing.assert_array_equal(time_rows, np.broadcast_to(kind[q1] <= L.TIME, time_rows.shape))
  # Every query sees at least itself (no empty softmax row).
  assert np.diag(m).all()


def test_stage1_mode_is_one_frame_per_clip():
  lay = L.training_layout(4, 2)
  split = L.per_frame_split(4)
  m = _mask(lay, split)
  noisy = lay.stream == L.NOISY
  for f in range(4):
    q = noisy & (lay.frame == f)
    # Noisy frame f sees exactly its own noisy segment and clean frames < f.
    expected_keys = (noisy & (lay.frame == f)) | ((lay.stream == L.CLEAN) & (lay.frame < f))
    assert not m[np.ix_(q, ~expected_keys)].any()
    assert m[np.ix_(q & (lay.kind == L.PATCH), expected_keys)].all()


def test_interval_form_equals_the_rule_for_every_layout_and_split():
  """`visible_by_rank` (one rank per key, two ranges per query: what the tiled kernels evaluate) equals `visible`
  on random splits of the training, context-parallel and sampling layouts, padding tokens included."""
  import jax
  import ml_collections

  from vgpt_jax.attention.chunked import pad_ids
  from vgpt_jax.attention.mask import key_rank, query_bounds, visible, visible_by_rank

  random = ml_collections.ConfigDict(dict(split="random", min_clips=1, max_clips=-1))
  for frames, tokens in ((5, 3), (12, 2)):
    splits = L.sample_splits(jax.random.key(frames), 16, frames, random)
    layouts = (
      L.training_layout(frames, tokens),
      L.context_parallel_layout(L.training_layout(frames, tokens), 4),
      L.sampling_layout(frames, tokens),
    )
    for lay in layouts:
      ids = pad_ids(L.token_ids(lay, splits), lay.length + 5)
      q = jax.tree.map(lambda x: x[:, :, None], ids)
      k = jax.tree.map(lambda x: x[:, None, :], ids)
      want = np.asarray(visible(q, k))
      assert want.any() and not want.all()
      np.testing.assert_array_equal(np.asarray(visible_by_rank(key_rank(k), query_bounds(q))), want)
