"""Chunked attention: flash attention in pure JAX, tiles of tokens, masks from ids, empty tiles never visited.

Pure JAX, so it runs on every backend (the CPU default for long sequences).
It never materialises an L x L tensor, and it is split in two like every path
(`path.AttentionPath`):
  * `tile_plan`, once per forward pass: the ids padded to the tiles, and per
    sample and query tile the list of key tiles that may hold a visible entry
    (`tile_map`, from per-tile id ranges, O(1) per tile; about a third of a
    long training sequence's tiles, see `attention.accounting`);
  * `tiled_attention`, in every layer: for each sample and query tile, a loop
    over its listed key tiles only, evaluating the exact mask of the tile from
    the ids (the predicate of the dense reference) and an online softmax in
    float32.
The backward pass is written out (`jax.custom_vjp`), as in flash attention:
the forward keeps only its output and the log-sum-exp of each query; the
backward walks the same lists, recomputes each tile's probabilities and
accumulates dq per query tile and dk, dv in place. Memory is O(L * block),
there is no per-tile residual for autodiff to stack, and the work is that of
the kept tiles. Shapes are static: any clip split runs without recompiling
(only the ids and the lists change).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from vgpt_jax.attention.mask import key_rank, query_bounds, visible_by_rank
from vgpt_jax.attention.path import flash_vjp
from vgpt_jax.layout import CLEAN, NOISY, PAD, TokenIds

DEFAULT_BLOCK = 512
_BIG = jnp.iinfo(jnp.int32).max
_NEG = float(jnp.finfo(jnp.float32).min)  # masked score
_FLOOR = -1e30  # running-max floor: a row with nothing visible keeps exp(_NEG - _FLOOR) = 0, never inf - inf


def pad_ids(ids: TokenIds, length: int) -> TokenIds:
  """ids [B, T] padded to [B, length] with invisible padding tokens."""
  pad = length - ids.frame.shape[1]
  if pad == 0:
    return ids
  stream = jnp.pad(ids.stream, ((0, 0), (0, pad)), constant_values=PAD)
  rest = {f: jnp.pad(getattr(ids, f), ((0, 0), (0, pad))) for f in ("frame", "clip", "kind", "position")}
  return TokenIds(stream=stream, **rest)


def _ranges(ids: TokenIds, block: int) -> dict[str, jax.Array]:
  """Per tile of `block` tokens, [B, tiles]: the id ranges `tile_map` needs (sentinels where a stream is absent)."""
  b, t = ids.frame.shape
  tiles = lambda x: x.reshape(b, t // block, block)  # noqa: E731
  clean, noisy = tiles(ids.stream == CLEAN), tiles(ids.stream == NOISY)
  frame, blk = tiles(ids.frame), tiles(ids.clip)
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


def _tile_stats(ids: TokenIds, block: int) -> dict[str, jax.Array]:
  """Per tile of `block` tokens, [B, tiles]: what `full_tile_map` needs (sentinels make absent streams harmless)."""
  b, t = ids.frame.shape
  tiles = lambda x: x.reshape(b, t // block, block)  # noqa: E731
  stream, frame, blk, kind = (tiles(x) for x in (ids.stream, ids.frame, ids.clip, ids.kind))
  return {
    "all_clean": jnp.all(stream == CLEAN, axis=2),
    "all_noisy": jnp.all(stream == NOISY, axis=2),
    "frame_min": jnp.min(frame, axis=2),
    "frame_max": jnp.max(frame, axis=2),
    "block_min": jnp.min(blk, axis=2),
    "block_max": jnp.max(blk, axis=2),
    "kind_min": jnp.min(jnp.where(stream >= 0, kind, _BIG), axis=2),
    "kind_max": jnp.max(jnp.where(stream >= 0, kind, -1), axis=2),
  }


def full_tile_map(q_ids: TokenIds, k_ids: TokenIds, block_q: int, block_k: int) -> jax.Array:
  """bool [B, nq, nk]: True only where every (query, key) pair of the tile is visible, so its mask can be skipped.

  Sufficient conditions from the rules in attention/mask.py (a False is always safe):
    clean q, clean k: every key frame < every query frame, or <= with every key kind <= every query kind;
    noisy q, clean k: every key clip < every query clip;
    noisy q, noisy k: one clip on both sides and every key kind <= every query kind.
  """
  q, k = _tile_stats(q_ids, block_q), _tile_stats(k_ids, block_k)
  qa = {name: x[:, :, None] for name, x in q.items()}
  ka = {name: x[:, None, :] for name, x in k.items()}
  kinds_ok = ka["kind_max"] <= qa["kind_min"]
  clean = (
    qa["all_clean"]
    & ka["all_clean"]
    & ((ka["frame_max"] < qa["frame_min"]) | ((ka["frame_max"] <= qa["frame_min"]) & kinds_ok))
  )
  noisy_clean = qa["all_noisy"] & ka["all_clean"] & (ka["block_max"] < qa["block_min"])
  one_clip = (
    (qa["block_min"] == qa["block_max"]) & (ka["block_min"] == ka["block_max"]) & (qa["block_min"] == ka["block_min"])
  )
  noisy_noisy = qa["all_noisy"] & ka["all_noisy"] & one_clip & kinds_ok
  return clean | noisy_clean | noisy_noisy


def visit_lists(kept: jax.Array) -> tuple[jax.Array, jax.Array]:
  """kept bool [B, n, m] -> int32 [B, n, m] each row's kept indices first (ascending), int32 [B, n] their count."""
  order = jnp.argsort(~kept, axis=-1, stable=True).astype(jnp.int32)
  return order, jnp.sum(kept, axis=-1, dtype=jnp.int32)


def round_up(x: int, multiple: int) -> int:
  """The smallest multiple of `multiple` that is >= x (padded lengths of the tiled paths)."""
  return -(-x // multiple) * multiple


@functools.partial(jax.tree_util.register_dataclass, data_fields=["q_ids", "k_ids", "visits", "counts"],
                   meta_fields=["block_q", "block_k"])  # fmt: skip
@dataclasses.dataclass(frozen=True)
class TilePlan:
  """What every layer's tiled attention needs from the ids, computed once per forward pass (`tile_plan`)."""

  q_ids: TokenIds  # fields [B, Lq]: padded to a multiple of block_q
  k_ids: TokenIds  # fields [B, Lk]: padded to a multiple of block_k
  visits: jax.Array  # int32 [B, Lq / block_q, Lk / block_k]: per query tile, its kept key tiles first (ascending)
  counts: jax.Array  # int32 [B, Lq / block_q]: how many key tiles each query tile visits
  block_q: int
  block_k: int


def tile_plan(q_ids: TokenIds, k_ids: TokenIds, block_q: int = DEFAULT_BLOCK, block_k: int = DEFAULT_BLOCK) -> TilePlan:
  """The plan of `tiled_attention` for these ids: blocks capped at the (8-aligned) lengths, ids padded, visit lists."""
  tq, tk = q_ids.frame.shape[1], k_ids.frame.shape[1]
  block_q, block_k = min(block_q, round_up(tq, 8)), min(block_k, round_up(tk, 8))
  q_ids, k_ids = pad_ids(q_ids, round_up(tq, block_q)), pad_ids(k_ids, round_up(tk, block_k))
  visits, counts = visit_lists(tile_map(q_ids, k_ids, block_q, block_k))
  return TilePlan(q_ids, k_ids, visits, counts, block_q, block_k)


def _tile(x: jax.Array, index: jax.Array, block: int, axis: int) -> jax.Array:
  return jax.lax.dynamic_slice_in_dim(x, index * block, block, axis=axis)


def _tile_ids(ids: TokenIds, index: jax.Array, block: int) -> TokenIds:
  """The ids of one tile of one sample: fields [block] from fields [L]."""
  return jax.tree.map(lambda x: _tile(x, index, block, 0), ids)


def _scores(q_i: jax.Array, k_j: jax.Array, q_ids: TokenIds, k_ids: TokenIds) -> jax.Array:
  """float32 [H, bq, bk] masked scores of one tile (q_i already scaled)."""
  s = jnp.einsum("hqd,hkd->hqk", q_i, k_j, preferred_element_type=jnp.float32)
  bounds = tuple(x[None, :, None] for x in query_bounds(q_ids))
  mask = visible_by_rank(key_rank(k_ids)[None, None, :], bounds)  # [1, bq, bk]: 3 comparisons per entry
  return jnp.where(mask, s, _NEG)


def _forward(q: jax.Array, k: jax.Array, v: jax.Array, plan: TilePlan) -> tuple[jax.Array, jax.Array]:
  """q (scaled) [B, H, Lq, D], k, v [B, H, Lk, D] -> out [B, H, Lq, D] (q's dtype), lse float32 [B, H, Lq]."""
  bq, bk = plan.block_q, plan.block_k

  def sample(args):
    q, k, v, q_ids, k_ids, visits, counts = args

    def query_tile(i):
      q_i, ids_i = _tile(q, i, bq, 1), _tile_ids(q_ids, i, bq)

      def visit(t, carry):
        m, l, acc = carry  # [H, bq], [H, bq], [H, bq, D]
        j = visits[i, t]
        s = _scores(q_i, _tile(k, j, bk, 1), ids_i, _tile_ids(k_ids, j, bk))
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        p = jnp.exp(s - m_new[..., None])
        correction = jnp.exp(m - m_new)
        pv = jnp.einsum("hqk,hkd->hqd", p.astype(v.dtype), _tile(v, j, bk, 1), preferred_element_type=jnp.float32)
        return m_new, l * correction + jnp.sum(p, axis=-1), acc * correction[..., None] + pv

      h, d = q.shape[0], q.shape[2]
      init = (jnp.full((h, bq), _FLOOR), jnp.zeros((h, bq)), jnp.zeros((h, bq, d)))
      m, l, acc = jax.lax.fori_loop(0, counts[i], visit, init)
      seen = l > 0  # a query with no visible key (padding) outputs 0 and gets no gradient
      out = acc / jnp.where(seen, l, 1.0)[..., None]
      return out.astype(q.dtype), jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), jnp.inf)

    out, lse = jax.lax.map(query_tile, jnp.arange(visits.shape[0]))  # [nq, H, bq, D], [nq, H, bq]
    return _untile(out), _untile(lse)

  return jax.lax.map(sample, (q, k, v, plan.q_ids, plan.k_ids, plan.visits, plan.counts))


def _untile(x: jax.Array) -> jax.Array:
  """[n, H, b, ...] -> [H, n * b, ...]."""
  x = jnp.moveaxis(x, 0, 1)
  return x.reshape(x.shape[0], x.shape[1] * x.shape[2], *x.shape[3:])


def _backward(q, k, v, out, lse, do, plan: TilePlan):
  """Gradients of `_forward` w.r.t. scaled q, k, v (each float32, their shapes), from the saved out and lse."""
  bq, bk = plan.block_q, plan.block_k
  delta = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [B, H, Lq]

  def sample(args):
    q, k, v, do, lse, delta, q_ids, k_ids, visits, counts = args

    def query_tile(carry, i):
      q_i, do_i, ids_i = _tile(q, i, bq, 1), _tile(do, i, bq, 1), _tile_ids(q_ids, i, bq)
      lse_i, delta_i = _tile(lse, i, bq, 1), _tile(delta, i, bq, 1)

      def visit(t, inner):
        dq_i, dk, dv = inner
        j = visits[i, t]
        k_j, v_j = _tile(k, j, bk, 1), _tile(v, j, bk, 1)
        p = jnp.exp(_scores(q_i, k_j, ids_i, _tile_ids(k_ids, j, bk)) - lse_i[..., None])  # [H, bq, bk]
        dp = jnp.einsum("hqd,hkd->hqk", do_i, v_j, preferred_element_type=jnp.float32)
        ds = p * (dp - delta_i[..., None])
        dq_i = dq_i + jnp.einsum("hqk,hkd->hqd", ds.astype(k.dtype), k_j, preferred_element_type=jnp.float32)
        dv_j = jnp.einsum("hqk,hqd->hkd", p.astype(do.dtype), do_i, preferred_element_type=jnp.float32)
        dk_j = jnp.einsum("hqk,hqd->hkd", ds.astype(q.dtype), q_i, preferred_element_type=jnp.float32)
        add = lambda acc, x: jax.lax.dynamic_update_slice_in_dim(acc, _tile(acc, j, bk, 1) + x, j * bk, 1)  # noqa: E731
        return dq_i, add(dk, dk_j), add(dv, dv_j)

      dq_i, dk, dv = jax.lax.fori_loop(0, counts[i], visit, (jnp.zeros(q_i.shape, jnp.float32), *carry))
      return (dk, dv), dq_i

    zeros = jnp.zeros(k.shape, jnp.float32)
    (dk, dv), dq = jax.lax.scan(query_tile, (zeros, zeros), jnp.arange(visits.shape[0]))
    return _untile(dq), dk, dv

  return jax.lax.map(sample, (q, k, v, do, lse, delta, plan.q_ids, plan.k_ids, plan.visits, plan.counts))


_flash = flash_vjp(_forward, _backward)


def tiled_attention(q: jax.Array, k: jax.Array, v: jax.Array, plan: TilePlan) -> jax.Array:
  """Masked softmax attention over the tiles of `plan`; equal to `dense_attention`.

  Args:
    q: [B, Tq, H, D]; k, v: [B, Tk, H, D] (any lengths: padded to the plan's tiles here).
    plan: `tile_plan` of the ids of these queries and keys.
  Returns:
    [B, Tq, H, D] in q's dtype; softmax statistics in float32. A query that sees no key gives 0.
  """
  tq = q.shape[1]
  lq, lk = plan.q_ids.frame.shape[1], plan.k_ids.frame.shape[1]

  def heads_first(x: jax.Array, length: int) -> jax.Array:  # [B, T, H, D] -> [B, H, L, D], padded
    return jnp.swapaxes(jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0))), 1, 2)

  scale = q.shape[-1] ** -0.5
  out = _flash(heads_first(q * jnp.asarray(scale, q.dtype), lq), heads_first(k, lk), heads_first(v, lk), plan)
  return jnp.swapaxes(out, 1, 2)[:, :tq]


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
  """`tiled_attention` with its plan built here: one call for tests and one-off uses (the model plans once)."""
  return tiled_attention(q, k, v, tile_plan(q_ids, k_ids, block_q, block_k))
