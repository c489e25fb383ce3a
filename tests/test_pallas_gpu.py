"""The Pallas GPU (Triton) flash attention against the dense reference, run in interpret mode on CPU.

Interpret mode executes the kernels' own code (id-built tile masks, visit lists,
online softmax, the dk/dv and dq kernels) with XLA on the CPU; the lowering
test checks that the same kernels also lower to Triton IR for CUDA. What needs a
GPU (Triton compilation, speed, TF32-free float32 accuracy on tensor cores) is
left to a GPU run.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vgpt_jax import layout as L
from vgpt_jax.attention.dense import dense_attention
from vgpt_jax.attention.pallas_gpu import pallas_gpu_attention, visible_tiles

RANDOM = ml_collections.ConfigDict(dict(split="random", min_clips=2, max_clips=-1))


def random_ids(seed: int, batch: int, frames: int, tokens: int) -> L.TokenIds:
  split = L.sample_splits(jax.random.key(seed), batch, frames, RANDOM)
  return L.token_ids(L.training_layout(frames, tokens), split)


def normal(seed: int, *shapes) -> list[jax.Array]:
  return [
    jax.random.normal(key, shape) for key, shape in zip(jax.random.split(jax.random.key(seed), len(shapes)), shapes)
  ]


def rel(a: jax.Array, b: jax.Array) -> float:
  return float(jnp.linalg.norm((a - b).astype(jnp.float32)) / jnp.linalg.norm(b.astype(jnp.float32)))


def kernel(block_q: int, block_k: int, bwd_block_q: int | None = None, bwd_block_k: int | None = None):
  blocks = dict(block_q=block_q, block_k=block_k, bwd_block_q=bwd_block_q, bwd_block_k=bwd_block_k)
  return lambda q, k, v, a, b: pallas_gpu_attention(q, k, v, a, b, **blocks, interpret=True)


def check_against_dense(fn, q, k, v, q_ids, k_ids, tol: float = 1e-5) -> None:
  """Forward and dq, dk, dv of a random linear loss equal the dense reference's."""
  (w,) = normal(99, q.shape)
  assert rel(fn(q, k, v, q_ids, k_ids), dense_attention(q, k, v, q_ids, k_ids)) < tol
  loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v, q_ids, k_ids) * w)  # noqa: E731
  got = jax.grad(loss(fn), argnums=(0, 1, 2))(q, k, v)
  want = jax.grad(loss(dense_attention), argnums=(0, 1, 2))(q, k, v)
  for name, g, r in zip("qkv", got, want):
    assert rel(g, r) < tol, f"d{name}"


@pytest.mark.parametrize(
  "frames, tokens, dim, block_q, block_k",
  # Lengths 49, 72 and 34: none a multiple of the blocks. Head dims 96 (the paper's) and 24 are zero-padded to
  # 128 and 32 for Triton's power-of-two dots.
  [(4, 5, 16, 16, 16), (5, 6, 32, 32, 16), (3, 4, 96, 16, 32), (3, 4, 24, 32, 16)],
)
def test_forward_and_gradients_equal_dense(frames, tokens, dim, block_q, block_k):
  for seed in range(2):  # fresh splits and inputs; same shapes, so one compile
    ids = random_ids(seed, 2, frames, tokens)
    t = ids.frame.shape[1]
    q, k, v = normal(seed + 10, *[(2, t, 2, dim)] * 3)
    check_against_dense(kernel(block_q, block_k), q, k, v, ids, ids)


@pytest.mark.parametrize("blocks", [(32, 16, 16, 32), (16, 32, 32, 16)])
def test_backward_tiles_of_their_own_give_the_same_gradients(blocks):
  """Forward tiles (block_q, block_k) and backward tiles of other sizes (the dk/dv kernel's registers want smaller
  ones on a GPU): lengths padded to all of them, gradients equal dense."""
  ids = random_ids(11, 2, 4, 6)
  q, k, v = normal(12, *[(2, ids.frame.shape[1], 2, 32)] * 3)
  check_against_dense(kernel(*blocks), q, k, v, ids, ids)


def test_fully_visible_tiles_take_the_unmasked_branch_and_are_exact():
  """The plan marks kept tiles whose every entry is visible (entry = 2 * tile + 1); the kernels skip their mask.
  Both kinds occur here, and the result equals dense."""
  from vgpt_jax.attention.pallas_gpu import gpu_plan

  ids = random_ids(5, 2, 6, 6)
  plan = gpu_plan(ids, ids, block_q=16, block_k=16)
  for order, count in ((plan.q_order, plan.q_count), (plan.dkv_order, plan.dkv_count)):
    order, count = np.asarray(order), np.asarray(count)
    run = np.arange(order.shape[-1]) < count[..., None]
    full = (order & 1).astype(bool)
    assert (full & run).any() and (~full & run).any() and not (full & ~run).any()
  q, k, v = normal(6, *[(2, ids.frame.shape[1], 2, 16)] * 3)
  check_against_dense(kernel(16, 16), q, k, v, ids, ids)


def test_skipped_tiles_are_never_read():
  """NaN in one key tile: query tiles whose map entry is False stay finite and exact (forward and dq)."""
  ids = random_ids(3, 2, 5, 6)
  t, block = ids.frame.shape[1], 16
  kept = np.asarray(visible_tiles(ids, ids, block, block))  # [B, nq, nk]
  assert not kept.all() and kept.any()
  j = int(np.argmax((~kept).sum(axis=(0, 1))))  # the key tile skipped most often
  q, k, v = normal(4, *[(2, t, 2, 16)] * 3)
  poison = lambda x: x.at[:, j * block : (j + 1) * block].set(jnp.nan)  # noqa: E731
  fn = kernel(block, block)
  clean_out = fn(q, k, v, ids, ids)
  out = fn(q, poison(k), poison(v), ids, ids)
  dq = jax.grad(lambda q: jnp.sum(fn(q, poison(k), poison(v), ids, ids)))(q)
  clean_dq = jax.grad(lambda q: jnp.sum(fn(q, k, v, ids, ids)))(q)
  for b in range(2):
    skipped = np.repeat(~kept[b, :, j], block)[:t]  # query rows of tiles that skip key tile j
    assert skipped.any()
    np.testing.assert_array_equal(np.asarray(out[b, skipped]), np.asarray(clean_out[b, skipped]))
    np.testing.assert_array_equal(np.asarray(dq[b, skipped]), np.asarray(clean_dq[b, skipped]))
    if (~skipped).any():  # and the tiles that keep it do read it
      assert np.isnan(np.asarray(out[b, ~skipped])).any()


def test_queries_of_one_clip_against_cached_keys():
  """Tq != Tk: a noisy clip's tokens against the cached clean context and themselves, as sampling.py runs them."""
  lay = L.sampling_layout(5, 6)
  ids = L.token_ids(lay, jnp.asarray([[0, 0, 0, 1, 1], [0, 0, 0, 1, 1]]))
  q_tokens = L.segment_tokens(lay, L.NOISY, 3, 5)
  k_tokens = np.concatenate([L.segment_tokens(lay, L.CLEAN, 0, 3), q_tokens])
  q_ids, k_ids = ids[:, q_tokens], ids[:, k_tokens]
  q, k, v = normal(5, (2, len(q_tokens), 2, 16), *[(2, len(k_tokens), 2, 16)] * 2)
  check_against_dense(kernel(16, 16), q, k, v, q_ids, k_ids)


def test_a_query_that_sees_no_key_gives_zero_and_zero_gradients():
  lay = L.training_layout(4, 4)
  ids = L.token_ids(lay, jnp.asarray([[0, 0, 1, 1]]))
  q_ids, k_ids = ids[:, L.segment_tokens(lay, L.CLEAN, 1, 3)], ids[:, L.segment_tokens(lay, L.NOISY, 0, 4)]
  q, k, v = normal(6, (1, 12, 1, 16), *[(1, 24, 1, 16)] * 2)  # clean queries never see noisy keys
  fn = kernel(16, 16)
  np.testing.assert_array_equal(np.asarray(fn(q, k, v, q_ids, k_ids)), 0.0)
  grads = jax.grad(lambda *a: jnp.sum(fn(*a, q_ids, k_ids)), argnums=(0, 1, 2))(q, k, v)
  for g in grads:
    np.testing.assert_array_equal(np.asarray(g), 0.0)


def test_a_new_split_does_not_recompile():
  ids_a, ids_b = random_ids(0, 2, 4, 5), random_ids(1, 2, 4, 5)
  assert not np.array_equal(ids_a.clip, ids_b.clip)
  q, k, v = normal(7, *[(2, ids_a.frame.shape[1], 2, 16)] * 3)
  fn = jax.jit(kernel(16, 16))
  fn(q, k, v, ids_a, ids_a)
  fn(q, k, v, ids_b, ids_b)
  assert fn._cache_size() == 1  # noqa: SLF001


@pytest.mark.parametrize(
  "change, message",
  [
    (dict(dim=320), "head dim D=320 is over the Triton kernel's 256"),
    (dict(block_q=24), "block_q=24 must be a power of two"),
    (dict(block_k=8), "block_k=8 must be a power of two"),
    (dict(bwd_block_q=48), "bwd_block_q=48 must be a power of two"),
    (dict(k_dtype=jnp.bfloat16), "cast them"),
    (dict(kv_heads=1), "repeat k/v heads"),
    (dict(ids_length=10), "expected \\(B, T\\)"),
  ],
)
def test_bad_sizes_raise_a_clear_error(change, message):
  cfg = dict(dim=16, block_q=16, block_k=16, bwd_block_q=16, k_dtype=jnp.float32, kv_heads=2, ids_length=12)
  cfg.update(change)
  ids = L.token_ids(L.training_layout(2, 2), jnp.asarray([[0, 1]]))  # 12 tokens
  q = jnp.zeros((1, 12, 2, cfg["dim"]))
  k = jnp.zeros((1, 12, cfg["kv_heads"], cfg["dim"]), cfg["k_dtype"])
  k_ids = ids[:, : cfg["ids_length"]]
  with pytest.raises(ValueError, match=message):
    blocks = {name: cfg[name] for name in ("block_q", "block_k", "bwd_block_q")}
    pallas_gpu_attention(q, k, k, ids, k_ids, **blocks, interpret=True)


def test_kernels_lower_to_triton_for_cuda():
  """Without a GPU: the forward and both backward kernels pass the Pallas Triton lowering (shapes, primitives),
  at the paper's head size (96, padded to 128)."""
  ids = random_ids(0, 1, 5, 6)  # 72 tokens: 5 query tiles of 16, 3 key tiles of 32 (counts not powers of two)
  shape = jax.ShapeDtypeStruct((1, ids.frame.shape[1], 2, 96), jnp.bfloat16)
  blocks = dict(block_q=16, block_k=32, bwd_block_q=32, bwd_block_k=16)  # backward tiles of their own
  fn = lambda q, k, v: pallas_gpu_attention(q, k, v, ids, ids, **blocks)  # noqa: E731
  grad = jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2))
  try:
    text = jax.jit(grad).trace(shape, shape, shape).lower(lowering_platforms=("cuda",)).as_text()
  except RuntimeError as e:  # a jaxlib built without the CUDA lowering rules
    pytest.skip(f"no CUDA lowering here: {e}")
  assert text.count("__gpu$xla.gpu.triton") == 3  # forward, dk/dv, dq


@pytest.mark.parametrize("dim", [16, 96])
def test_bfloat16_close_to_dense(dim):
  ids = random_ids(8, 2, 4, 5)
  q, k, v = (x.astype(jnp.bfloat16) for x in normal(9, *[(2, ids.frame.shape[1], 2, dim)] * 3))
  out = kernel(16, 16)(q, k, v, ids, ids)
  assert out.dtype == jnp.bfloat16 and out.shape == q.shape
  assert rel(out, dense_attention(q, k, v, ids, ids)) < 2e-2


@pytest.mark.slow
@pytest.mark.parametrize("block_q, block_k", [(32, 32), (16, 64)])
def test_longer_sequences_and_stage_one_splits(block_q, block_k):
  """6 frames of 8 tokens (length 143), random and per-frame splits, heads of 32."""
  per_frame = ml_collections.ConfigDict(dict(split="per_frame"))
  for seed, cfg in enumerate((RANDOM, per_frame, RANDOM)):
    split = L.sample_splits(jax.random.key(seed), 2, 6, cfg)
    ids = L.token_ids(L.training_layout(6, 8), split)
    q, k, v = normal(seed + 20, *[(2, ids.frame.shape[1], 3, 32)] * 3)
    check_against_dense(kernel(block_q, block_k), q, k, v, ids, ids)
