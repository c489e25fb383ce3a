"""Chunked attention: online softmax over key tiles, masks built per tile from ids, empty tiles skipped.

Pure JAX, so it runs on every backend (the CPU default). Never materialises an
L x L tensor:
  * queries are cut into tiles of `block_q`, keys into tiles of `block_k`;
  * `tile_map` decides from per-tile id ranges (O(1) per tile) which tiles may
    hold a visible entry; the others are skipped at run time with `lax.cond`
    (about three quarters of a training sequence's tiles, see
    `attention.accounting`);
  * inside a kept tile the exact mask is evaluated from the ids with the same
    predicate as the dense reference, and an online softmax accumulates the
    output in float32.
The backward pass rematerialises one query tile at a time (`jax.checkpoint`),
so its memory is O(L * block) too. Shapes are static: any clip split runs
without recompiling (only the ids change).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from vgpt_jax.attention.mask import dense_mask
from vgpt_jax.layout import CLEAN, NOISY, PAD, TokenIds

DEFAULT_BLOCK = 512
_BIG = jnp.iinfo(jnp.int32).max


def pad_ids(ids: TokenIds, length: int) -> TokenIds:
  """ids [B, T] padded to [B, length] with invisible padding tokens."""
  pad = length - ids.frame.shape[1]
  if pad == 0:
    return ids
  stream = jnp.pad(ids.stream, ((0, 0), (0, pad)), constant_values=PAD)
  rest = {f: jnp.pad(getattr(ids, f), ((0, 0), (0, pad))) for f in ("frame", "block", "kind", "position")}
  return TokenIds(stream=stream, **rest)


def _ranges(ids: TokenIds, block: int) -> dict[str, jax.Array]:
  """Per tile of `block` tokens, [B, tiles]: the id ranges `tile_map` needs (sentinels where a stream is absent)."""
  b, t = ids.frame.shape
  tiles = lambda x: x.reshape(b, t // block, block)  # noqa: E731
  clean, noisy = tiles(ids.stream == CLEAN), tiles(ids.stream == NOISY)
  frame, blk = tiles(ids.frame), tiles(ids.block)
  return {
    "clean_frame_min": jnp.min(jnp.where(clean, frame, _BIG), axis=2),
    "clean_frame_max": jnp.max(jnp.where(clean, frame, -1), axis=2),
    "clean_block_min": jnp.min(jnp.where(clean, blk, _BIG), axis=2),
    "noisy_block_min": jnp.min(jnp.where(noisy, blk, _BIG), axis=2),
    "noisy_block_max": jnp.max(jnp.where(noisy, blk, -1), axis=2),
  }


def tile_map(q_ids: TokenIds, k_ids: TokenIds, block_q: int, block_k: int) -> jax.Array:
  """bool [B, Tq / block_q, Tk / block_k]: False only where a tile surely has no visible entry.

  From the mask's rules (attention/mask.py): a clean query sees clean keys of
  frames <= its own; a noisy query sees clean keys of earlier clips and noisy
  keys of its own clip. Comparing the tiles' id ranges gives a conservative
  answer: a kept tile may still be empty (its exact mask is computed), a
  skipped one never hides a visible entry. Lengths must be multiples of the blocks.
  """
  q, k = _ranges(q_ids, block_q), _ranges(k_ids, block_k)
  qa = {name: x[:, :, None] for name, x in q.items()}
  ka = {name: x[:, None, :] for name, x in k.items()}
  clean_clean = ka["clean_frame_min"] <= qa["clean_frame_max"]
  noisy_clean = ka["clean_block_min"] < qa["noisy_block_max"]
  noisy_noisy = (ka["noisy_block_min"] <= qa["noisy_block_max"]) & (qa["noisy_block_min"] <= ka["noisy_block_max"])
  return clean_clean | noisy_clean | noisy_noisy


def _slice(x: jax.Array, index: jax.Array, block: int) -> jax.Array:
  """Tokens [index * block, (index + 1) * block) of x [B, T, ...]."""
  return jax.lax.dynamic_slice_in_dim(x, index * block, block, axis=1)


def _query_tile(
  q: jax.Array, k: jax.Array, v: jax.Array, q_ids: TokenIds, k_ids: TokenIds, keep: jax.Array, block_k: int
) -> jax.Array:
  """Attention of one query tile q [B, bq, H, D] over all key tiles; keep: bool [Tk / block_k] tiles to run."""
  b, bq, h, d = q.shape
  scale = d**-0.5
  neg = jnp.finfo(jnp.float32).min

  def visit(carry, j):
    def run(carry):
      m, l, acc = carry  # [B, H, bq], [B, H, bq], [B, H, bq, D]
      k_j, v_j = _slice(k, j, block_k), _slice(v, j, block_k)
      mask = dense_mask(q_ids, jax.tree.map(lambda x: _slice(x, j, block_k), k_ids))[:, None]
      s = jnp.einsum("bqhd,bkhd->bhqk", q, k_j, preferred_element_type=jnp.float32) * scale
      s = jnp.where(mask, s, neg)
      m_new = jnp.maximum(m, jnp.max(s, axis=-1))
      p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)  # explicit zeros: fully masked rows stay empty
      correction = jnp.exp(m - m_new)
      l = l * correction + jnp.sum(p, axis=-1)
      pv = jnp.einsum("bhqk,bkhd->bhqd", p.astype(v.dtype), v_j, preferred_element_type=jnp.float32)
      return m_new, l, acc * correction[..., None] + pv

    return jax.lax.cond(keep[j], run, lambda c: c, carry), None

  init = (jnp.full((b, h, bq), neg), jnp.zeros((b, h, bq)), jnp.zeros((b, h, bq, d)))
  (_, l, acc), _ = jax.lax.scan(visit, init, jnp.arange(keep.shape[0]))
  out = acc / jnp.where(l == 0, 1.0, l)[..., None]  # a query with no visible key (padding) gives 0
  return jnp.einsum("bhqd->bqhd", out).astype(q.dtype)


@functools.partial(jax.jit, static_argnames=("block_q", "block_k"))
def chunked_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  q_ids: TokenIds,
  k_ids: TokenIds,
  block_q: int = DEFAULT_BLOCK,
  block_k: int = DEFAULT_BLOCK,
) -> jax.Array:
  """Masked softmax attention, equal to `dense_attention` without its [B, Tq, Tk] mask.

  Args:
    q: [B, Tq, H, D]; k, v: [B, Tk, H, D] (any lengths: padded to the blocks inside).
    q_ids, k_ids: token ids with fields [B, Tq] and [B, Tk].
    block_q, block_k: tile sizes (capped at the padded lengths).
  Returns:
    [B, Tq, H, D] in q's dtype; softmax statistics in float32.
  """
  tq, tk = q.shape[1], k.shape[1]
  block_q, block_k = min(block_q, round_up(tq, 8)), min(block_k, round_up(tk, 8))
  lq, lk = round_up(tq, block_q), round_up(tk, block_k)
  pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, 0)))  # noqa: E731
  q, k, v = pad(q, lq), pad(k, lk), pad(v, lk)
  q_ids, k_ids = pad_ids(q_ids, lq), pad_ids(k_ids, lk)
  keep = jnp.any(tile_map(q_ids, k_ids, block_q, block_k), axis=0)  # [nq, nk]: a tile runs if any sample needs it

  @jax.checkpoint  # the backward pass recomputes one query tile at a time: O(L * block) memory
  def one_tile(i: jax.Array) -> jax.Array:
    ids_i = jax.tree.map(lambda x: _slice(x, i, block_q), q_ids)
    return _query_tile(_slice(q, i, block_q), k, v, ids_i, k_ids, keep[i], block_k)

  out = jax.lax.map(one_tile, jnp.arange(lq // block_q))  # [nq, B, bq, H, D]
  out = jnp.moveaxis(out, 0, 1).reshape(q.shape[0], lq, *q.shape[2:])
  return out[:, :tq]


def round_up(x: int, multiple: int) -> int:
  """The smallest multiple of `multiple` that is >= x (padded lengths of the tiled paths)."""
  return -(-x // multiple) * multiple
