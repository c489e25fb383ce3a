"""Fast attention paths against the dense reference; tile skipping and exact visible-entry accounting."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from tests.conftest import small_config
from vgpt_jax import layout as L
from vgpt_jax import train_step
from vgpt_jax.attention import accounting, select
from vgpt_jax.attention.chunked import chunked_attention, pad_ids, tile_map
from vgpt_jax.attention.dense import dense_attention, masked_attention
from vgpt_jax.attention.mask import dense_mask
from vgpt_jax.run import init_params, make_run

RANDOM = ml_collections.ConfigDict(dict(split="random", min_clips=2, max_clips=-1))


def random_ids(key: int, batch: int, frames: int, tokens: int) -> L.TokenIds:
  split = L.sample_splits(jax.random.key(key), batch, frames, RANDOM)
  return L.token_ids(L.training_layout(frames, tokens), split)


def qkv(key: int, batch: int, length: int, heads: int = 2, dim: int = 16, kv_length: int | None = None):
  keys = jax.random.split(jax.random.key(key), 3)
  kv_length = kv_length or length
  return (
    jax.random.normal(keys[0], (batch, length, heads, dim)),
    jax.random.normal(keys[1], (batch, kv_length, heads, dim)),
    jax.random.normal(keys[2], (batch, kv_length, heads, dim)),
  )


def rel(a, b) -> float:
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.mark.parametrize("frames, tokens, block_q, block_k", [(6, 6, 16, 16), (5, 5, 32, 8), (8, 4, 64, 64)])
def test_chunked_equals_dense_forward_and_gradients(frames, tokens, block_q, block_k):
  """Fresh inputs and random splits (padding included: lengths are not multiples of the blocks)."""
  for seed in range(2):
    ids = random_ids(seed, 3, frames, tokens)
    q, k, v = qkv(seed + 10, 3, ids.frame.shape[1])
    weights = jax.random.normal(jax.random.key(seed + 20), q.shape)

    def loss(fn):
      return lambda q, k, v: jnp.sum(fn(q, k, v, ids, ids) * weights)

    chunked = lambda q, k, v, a, b: chunked_attention(q, k, v, a, b, block_q=block_q, block_k=block_k)  # noqa: E731
    assert rel(chunked(q, k, v, ids, ids), dense_attention(q, k, v, ids, ids)) < 1e-5
    grads = jax.grad(loss(chunked), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss(dense_attention), argnums=(0, 1, 2))(q, k, v)
    for got, ref in zip(grads, want):
      assert rel(got, ref) < 1e-5


def test_chunked_queries_against_cached_keys():
  """Tq != Tk: one noisy clip's queries against the clean context and itself, as the KV-cached sampler runs."""
  lay = L.sampling_layout(5, 6)
  split = jnp.asarray([[0, 0, 0, 1, 1]])
  ids = L.token_ids(lay, split)
  q_tokens = L.segment_tokens(lay, L.NOISY, 3, 5)
  k_tokens = np.concatenate([L.segment_tokens(lay, L.CLEAN, 0, 3), q_tokens])
  q_ids, k_ids = ids[:, q_tokens], ids[:, k_tokens]
  q, k, v = qkv(3, 1, len(q_tokens), kv_length=len(k_tokens))
  out = chunked_attention(q, k, v, q_ids, k_ids, block_q=8, block_k=16)
  assert rel(out, dense_attention(q, k, v, q_ids, k_ids)) < 1e-5


def test_tile_map_never_skips_a_visible_entry_and_skips_most_of_a_long_sequence():
  block = 16
  for seed in range(4):
    ids = random_ids(seed, 2, 12, 14)
    length = -(-ids.frame.shape[1] // block) * block
    padded = pad_ids(ids, length)
    kept = np.asarray(tile_map(padded, padded, block, block))  # [B, nq, nk]
    mask = np.asarray(dense_mask(padded, padded))
    n = length // block
    has_visible = mask.reshape(2, n, block, n, block).any(axis=(2, 4))
    assert not (has_visible & ~kept).any()  # conservative: never hides a visible entry
    assert kept.mean() < 0.6  # and still skips most tiles (clean never sees noisy, noisy sees little)


def test_visible_count_is_exact_and_matches_the_dense_mask():
  ids = random_ids(5, 3, 7, 5)
  want = np.asarray(dense_mask(ids, ids)).sum(axis=(1, 2))
  np.testing.assert_array_equal(accounting.visible_count(ids, block=16), want)
  fractions = accounting.tile_fractions(ids, ids, 16, 16)
  assert 0 < fractions["visible_fraction"] < fractions["tiles_kept_fraction"] <= 1
  assert fractions["visible_fraction"] == pytest.approx(want.mean() / ids.frame.shape[1] ** 2)
  assert accounting.attention_flops(100.0, 8, 2, backward=False) == 2 * 2 * 100 * 8 * 2


def test_a_new_split_does_not_recompile():
  ids_a, ids_b = random_ids(0, 2, 6, 6), random_ids(1, 2, 6, 6)
  assert not np.array_equal(ids_a.clip, ids_b.clip)
  q, k, v = qkv(0, 2, ids_a.frame.shape[1])
  fn = jax.jit(lambda *a: chunked_attention(*a, block_q=32, block_k=32))
  fn(q, k, v, ids_a, ids_a)
  fn(q, k, v, ids_b, ids_b)
  assert fn._cache_size() == 1  # noqa: SLF001


def test_model_with_chunked_attention_equals_dense():
  outs = {}
  for name in ("dense", "chunked", "auto"):
    setup = make_run(small_config(**{"model.attention": name, "model.attention_block": 16}))
    x = jax.random.normal(jax.random.key(2), (2, 5, *setup.latent_shape))
    split = jnp.asarray([[0, 0, 1, 1, 2], [0, 1, 1, 1, 1]])

    @jax.jit
    def forward(x, split, setup=setup):
      params = init_params(setup, jax.random.key(0))
      params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(1), p.shape), params)
      return setup.model.apply({"params": params}, x, x, jnp.full((2, 5), 0.3), split, setup.layout)

    outs[name] = forward(x, split)
  assert rel(outs["chunked"], outs["dense"]) < 1e-5
  np.testing.assert_array_equal(outs["auto"], outs["dense"])  # a short sequence on CPU: auto is dense


def test_unknown_attention_is_refused():
  with pytest.raises(ValueError, match="unknown attention 'flash'"):
    select.attention_path("flash", 8, 8)


@pytest.mark.parametrize("path", ["dense", "chunked"])
def test_model_paths_equal_the_reference_with_padding_queries(path):
  """The model's dense path (mask planned once, flash-style backward) and the chunked path against the autodiff
  reference on fresh inputs; padding tokens (which see nothing) give 0 and pass no gradient."""
  for seed in range(2):
    ids = pad_ids(random_ids(seed, 2, 5, 4), 60)  # 54 real tokens + 6 padding
    q, k, v = qkv(seed + 30, 2, 60)
    weights = jax.random.normal(jax.random.key(seed + 40), q.shape)
    run = select.attention_path(path, 60, 60, block=16)

    def loss(fn):
      return lambda q, k, v: jnp.sum(fn(q, k, v, ids, ids) * weights)

    out = run(q, k, v, ids, ids)
    assert rel(out, dense_attention(q, k, v, ids, ids)) < 1e-5
    np.testing.assert_array_equal(out[:, 54:], 0.0)
    grads = jax.grad(loss(run), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss(dense_attention), argnums=(0, 1, 2))(q, k, v)
    for got, ref in zip(grads, want):
      assert rel(got, ref) < 1e-5
      np.testing.assert_array_equal(got[:, 54:], 0.0)


def test_masked_attention_takes_any_mask_and_matches_autodiff():
  """The flash-style backward against autodiff of the plain softmax, on a random (not hierarchical) mask."""
  q, k, v = qkv(7, 2, 24, kv_length=40)
  mask = jax.random.bernoulli(jax.random.key(8), 0.3, (2, 24, 40)).at[:, :, 0].set(True)

  def plain(q, k, v):
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(jnp.where(mask[:, None], s, -jnp.inf), axis=-1), v)

  weights = jax.random.normal(jax.random.key(9), q.shape)
  assert rel(masked_attention(q, k, v, mask), plain(q, k, v)) < 1e-5
  got = jax.grad(lambda *a: jnp.sum(masked_attention(*a, mask) * weights), argnums=(0, 1, 2))(q, k, v)
  want = jax.grad(lambda *a: jnp.sum(plain(*a) * weights), argnums=(0, 1, 2))(q, k, v)
  for g, w in zip(got, want):
    assert rel(g, w) < 1e-5


def _subjaxprs(eqn):
  for value in eqn.params.values():
    for item in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(item, jax.extend.core.ClosedJaxpr):
        yield item.jaxpr
      elif isinstance(item, jax.extend.core.Jaxpr):
        yield item


def _eqns(jaxpr):
  """Every equation of a jaxpr and of the jaxprs nested in it."""
  for eqn in jaxpr.eqns:
    yield eqn
    for sub in _subjaxprs(eqn):
      yield from _eqns(sub)


@pytest.mark.parametrize("remat", ["none", "full"])
@pytest.mark.parametrize("path", ["dense", "chunked"])
def test_the_mask_is_planned_once_per_step_outside_the_layer_scan(path, remat):
  """No layer, forward or backward, builds the [B, T, T] mask (dense) or the [B, nq, nk] tile map (chunked): the
  plan is made once, before the scan over layers, and handed to every layer."""
  layers, batch = 3, 2
  overrides = {"model.attention": path, "model.num_layers": layers, "model.attention_block": 16, "model.remat": remat}
  setup = make_run(small_config(**overrides))
  params = init_params(setup, jax.random.key(0))
  x = jnp.zeros(setup.input_shape(batch))
  keys = jax.random.split(jax.random.key(1), batch)
  t = setup.layout.length
  jaxpr = jax.make_jaxpr(jax.grad(lambda p: train_step.loss_fn(p, setup, x, keys)))(params).jaxpr

  tiles = -(-t // 16)
  planned_shape = (batch, tiles, tiles) if path == "chunked" else (batch, t, t)  # the tile map, or the mask

  def plans(eqn) -> bool:
    return any(o.aval.dtype == jnp.bool_ and o.aval.shape == planned_shape for o in eqn.outvars)

  layer_scans = [e for e in _eqns(jaxpr) if e.primitive.name == "scan" and e.params["length"] == layers]
  assert len(layer_scans) >= 2  # the forward scan over layers and its transpose
  for scan in layer_scans:
    assert not any(plans(e) for sub in _subjaxprs(scan) for e in _eqns(sub))
  assert sum(plans(e) for e in _eqns(jaxpr)) >= 1  # ... and it is made, once, outside them


@pytest.mark.parametrize("block", [128, 512])
def test_context_parallelism_keeps_tile_skipping(block):
  """Paper stage 2 (48 frames of 220 tokens) over mesh.context=4: sorted query slices and keys gathered back
  into (stream, frame) order compute at most 1.15x the tiles of one device (dealt-out slices alone: 1.4-1.9x)."""
  r = accounting.context_parallel_tiles(48, 220, shards=4, block=block)
  assert 0.2 < r["single_device"] < 0.4 and r["ratio"] <= 1.15, r
