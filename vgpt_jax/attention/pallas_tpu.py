"""Pallas/Mosaic TPU flash attention driven by per-token ids ("splash-style"), forward and backward.

Same semantics as `dense_attention`, without any [Tq, Tk] mask in memory:

  * Layout: q, k, v move to [B, H, T, D] (one (b, h) pair per grid row, the tile's rows on sublanes and D on
    lanes). T is padded to the blocks with invisible tokens (`chunked.pad_ids`) and D with zeros up to a multiple
    of 128 (exact: zero columns add nothing to q.k, and the extra output columns are dropped).
  * Mask: the id fields the mask needs (frame, block, stream, kind) are packed into one int32 per token
    (`_pack_ids`), laid out as the q side [B, Tq, 128] (replicated over lanes) and the k side [B, 8, Tk]
    (replicated over sublanes), the layouts Mosaic broadcasts cheaply. A kernel loads the codes of its tile's
    query and key rows, unpacks them and turns them into key ranks and query bounds (`mask.key_rank`,
    `mask.query_bounds`) on the narrow blocks; the tile itself costs 3 int32 comparisons per entry
    (`mask.visible_by_rank`, equal to `mask.visible`).
  * Skipping: once per forward pass (`tpu_plan`, the path's plan, shared by every layer), `chunked.tile_map`
    (per batch element) says which tiles may hold a visible entry, and `chunked.full_tile_map` which tiles surely are
    entirely visible. Per (b, query tile) the kept key tiles are compacted to
    the front of a list ([B * nq * nk] int32, entry = 2 * tile + full) with their count ([B * nq]); both go to
    SMEM by scalar prefetch (`PrefetchScalarGridSpec`). Grid step s of a row handles the s-th kept tile; the
    body runs under `pl.when(s < count)`, so a skipped tile costs one empty grid step and no compute. The K/V
    (and key id) index maps read the list, and steps past the count repeat the last kept tile's index, so the
    pipeline fetches no K/V block for them (splash's "data next" idea). Fully visible tiles skip the mask.
    The grid keeps nk steps per row because the ids (random clip splits) are traced values: the number of kept
    tiles is not known when the kernel is built. The dK/dV kernel uses the transposed lists (kept query tiles
    per key tile). SMEM holds 2 * B * nq * nk + B * (nq + nk) int32 words (B * nq * nk <= ~16k is comfortable).
  * Numerics: scores, online-softmax statistics, accumulators and gradients in float32; p is cast to V's dtype
    before the PV matmul, as the dense reference does. A query that sees no key outputs 0 (and gets no
    gradient). The backward saves logsumexp [B, H, 1, Tq] (float32) and recomputes p (flash attention).

Constraints (checked, ValueError): block_q and block_k positive multiples of 128 (the lane width; blocks are
capped at the padded lengths, so short sequences are fine); q, k, v of one float dtype (float32 or bfloat16) with
matching batch, heads and head dim; ids shaped [B, Tq] / [B, Tk]. Unchecked under jit: frame ids in [0, 8192)
and clip ids in [0, 8192) (the packing; `_check_ranges` checks them when the ids are concrete). On TPU the VMEM
per step is O(block_q * block_k) float32 (a few MiB at 512 x 512, most in the dK/dV kernel); if Mosaic runs out,
use smaller blocks or raise `vmem_limit_bytes`. pallas_call is not auto-partitioned: under a sharded jit, call it
inside shard_map. In TPU interpret mode on CPU, jit the caller and block on the result before dispatching other
work: the interpreter runs jnp ops inside io_callbacks, which can deadlock a small CPU thread pool otherwise.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from vgpt_jax.attention.chunked import full_tile_map, pad_ids, round_up, tile_map
from vgpt_jax.attention.mask import MAX_FRAMES as RANKED_FRAMES
from vgpt_jax.attention.mask import key_rank, query_bounds, visible_by_rank
from vgpt_jax.attention.path import check_ids_match
from vgpt_jax.layout import TokenIds

LANES = 128
SUBLANES = 8
_MASK = -0.7 * float(np.finfo(np.float32).max)  # masked score: finite, so differences never give inf - inf
_EMPTY_LSE = 1e30  # logsumexp of a query with no visible key: exp(s - lse) = 0 in the backward
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_NN = (((1,), (0,)), ((), ()))  # a @ b
_KIND_BITS, _STREAM_BITS, _BLOCK_BITS = 2, 2, 13
MAX_FRAMES = min(1 << (31 - _KIND_BITS - _STREAM_BITS - _BLOCK_BITS), RANKED_FRAMES)  # 8192
MAX_CLIPS = 1 << _BLOCK_BITS  # 8192

Interpret = bool | pltpu.InterpretParams


# ----------------------------------------------------------------------------
# Ids: packing and per-tile maps (plain JAX, outside the kernels).


def _pack_ids(ids: TokenIds) -> jax.Array:
  """int32 [B, T]: frame, block, stream + 1 and kind in one non-negative word (position is not part of the mask)."""
  code = (ids.frame << _BLOCK_BITS) | ids.clip
  code = (code << _STREAM_BITS) | (ids.stream + 1)  # padding stream -1 -> 0
  return (code << _KIND_BITS) | ids.kind


def _unpack_ids(code: jax.Array) -> TokenIds:
  """Inverse of `_pack_ids` (position is filled with the frame: `visible` ignores it)."""
  kind = code & ((1 << _KIND_BITS) - 1)
  code = code >> _KIND_BITS
  stream = (code & ((1 << _STREAM_BITS) - 1)) - 1
  code = code >> _STREAM_BITS
  block = code & ((1 << _BLOCK_BITS) - 1)
  frame = code >> _BLOCK_BITS
  return TokenIds(frame=frame, clip=block, stream=stream, kind=kind, position=frame)


def _check_ranges(ids: TokenIds, name: str) -> None:
  """Ids that do not fit the packing would silently corrupt the mask; check them when they are concrete."""
  fields = (ids.frame, ids.clip, ids.stream, ids.kind)
  if any(isinstance(x, jax.core.Tracer) for x in fields):
    return
  frame, block, stream, kind = (np.asarray(x) for x in fields)
  bad = []
  if frame.size and not (0 <= frame.min() and frame.max() < MAX_FRAMES):
    bad.append(f"frame ids must lie in [0, {MAX_FRAMES})")
  if block.size and not (0 <= block.min() and block.max() < MAX_CLIPS):
    bad.append(f"clip ids must lie in [0, {MAX_CLIPS})")
  if stream.size and not (-1 <= stream.min() and stream.max() <= 1):
    bad.append("stream ids must be CLEAN, NOISY or -1 (padding)")
  if kind.size and not (0 <= kind.min() and kind.max() <= 3):
    bad.append("kind ids must lie in [0, 3]")
  if bad:
    raise ValueError(f"{name}: " + "; ".join(bad) + " (use chunked_attention for other ids)")


def _compact(keep: jax.Array, full: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per row of keep [B, R, C]: the kept columns first (ascending), then the last kept column repeated.

  Returns (entries int32 [B * R * C] with entry = 2 * column + full, counts int32 [B * R]); 1-D for SMEM.
  A row with nothing kept lists column 0 (never run).
  """
  cols = keep.shape[-1]
  order = jnp.argsort(jnp.logical_not(keep).astype(jnp.int32), axis=-1, stable=True).astype(jnp.int32)
  count = jnp.sum(keep, axis=-1, dtype=jnp.int32)
  step = jnp.minimum(jnp.arange(cols, dtype=jnp.int32), jnp.maximum(count - 1, 0)[..., None])
  column = jnp.take_along_axis(order, step, axis=-1)
  is_full = jnp.take_along_axis(full, column, axis=-1).astype(jnp.int32)
  return (2 * column + is_full).reshape(-1), count.reshape(-1)


# ----------------------------------------------------------------------------
# Kernels. Grid rows are (b, h, tile); the last grid axis walks the row's compacted list.


def _tile_mask(q_code_ref: Any, k_code_ref: Any, block_k: int) -> jax.Array:
  """bool [bq, bk] from the tile's packed ids: q codes (bq, 128) lane-replicated, k codes (8, bk).

  Unpacking and the interval form (`mask.query_bounds`, `mask.key_rank`) happen on the narrow blocks
  ((bq, 128) and (1, bk)); the full tile only sees int32 comparisons of widened fields (3 per entry), no
  broadcast boolean masks.
  """
  widen = lambda x: jnp.tile(x, (1, block_k // LANES))  # noqa: E731  [bq, 128] -> [bq, bk]
  bounds = tuple(widen(x) for x in query_bounds(_unpack_ids(q_code_ref[...])))
  ranks = key_rank(_unpack_ids(k_code_ref[:1, :]))  # [1, bk], broadcast over sublanes
  return visible_by_rank(ranks, bounds)


def _scores(q: jax.Array, k: jax.Array, scale: float) -> jax.Array:
  return lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32, precision=_precision(q)) * scale


def _precision(x: jax.Array) -> lax.Precision:
  """Full float32 matmuls for float32 inputs (TPU's default would round them to bfloat16 passes)."""
  return lax.Precision.HIGHEST if x.dtype == jnp.float32 else lax.Precision.DEFAULT


def _lookup(entries_ref: Any, counts_ref: Any, b: jax.Array, row: jax.Array, step: jax.Array, rows: int, width: int):
  """(full?, run?) of grid step `step` of row (b, row) in the compacted lists; the index maps read the tile."""
  r = b * rows + row
  entry = entries_ref[r * width + step]
  return (entry & 1) == 1, step < counts_ref[r]


def _fwd_kernel(
  entries_ref,
  counts_ref,
  q_code_ref,
  k_code_ref,
  q_ref,
  k_ref,
  v_ref,
  o_ref,
  lse_ref,
  m_sc,
  l_sc,
  acc_sc,
  *,
  nq: int,
  nk: int,
  block_k: int,
  scale: float,
) -> None:
  """One (b, h, query tile) row: online softmax over its kept key tiles; writes out and logsumexp at the end."""
  b, i, s = pl.program_id(0), pl.program_id(2), pl.program_id(3)

  @pl.when(s == 0)
  def _init():
    m_sc[...] = jnp.full_like(m_sc, _MASK)
    l_sc[...] = jnp.zeros_like(l_sc)
    acc_sc[...] = jnp.zeros_like(acc_sc)

  full, run = _lookup(entries_ref, counts_ref, b, i, s, nq, nk)

  def step(masked: bool) -> None:
    q, k, v = q_ref[...], k_ref[...], v_ref[...]
    scores = _scores(q, k, scale)  # [bq, bk]
    if masked:
      mask = _tile_mask(q_code_ref, k_code_ref, block_k)
      scores = jnp.where(mask, scores, _MASK)
    m_prev, l_prev = m_sc[...], l_sc[...]  # [bq, 128], equal lanes
    m_new = jnp.maximum(m_prev, jnp.max(scores, axis=1, keepdims=True))
    p = jnp.exp(scores - jnp.tile(m_new, (1, block_k // LANES)))
    if masked:
      p = jnp.where(mask, p, 0.0)  # a row with nothing visible yet stays empty
    alpha = jnp.exp(m_prev - m_new)
    l_sc[...] = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
    m_sc[...] = m_new
    pv = lax.dot_general(p.astype(v.dtype), v, _NN, preferred_element_type=jnp.float32, precision=_precision(v))
    acc_sc[...] = acc_sc[...] * jnp.tile(alpha, (1, acc_sc.shape[1] // LANES)) + pv

  pl.when(run & full)(lambda: step(False))
  pl.when(run & jnp.logical_not(full))(lambda: step(True))

  @pl.when(s == nk - 1)
  def _finish():
    l, m = l_sc[...], m_sc[...]
    seen = l > 0.0
    inv = jnp.where(seen, 1.0 / jnp.where(seen, l, 1.0), 0.0)  # no visible key: output 0
    o_ref[...] = (acc_sc[...] * jnp.tile(inv, (1, acc_sc.shape[1] // LANES))).astype(o_ref.dtype)
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), _EMPTY_LSE)  # [bq, 128], equal lanes
    lse_ref[...] = jnp.transpose(lse)[:1, :]  # one row [1, bq]: no lane-replicated copy in HBM


def _probs(q, k, lse_ref, q_code_ref, k_code_ref, masked: bool, scale: float, block_k: int) -> jax.Array:
  """p [bq, bk] of the forward pass, recomputed from the saved logsumexp."""
  p = jnp.exp(_scores(q, k, scale) - jnp.expand_dims(lse_ref[0], -1))
  if masked:
    p = jnp.where(_tile_mask(q_code_ref, k_code_ref, block_k), p, 0.0)
  return p


def _dq_kernel(
  entries_ref,
  counts_ref,
  q_code_ref,
  k_code_ref,
  q_ref,
  k_ref,
  v_ref,
  do_ref,
  lse_ref,
  di_ref,
  dq_ref,
  dq_sc,
  *,
  nq: int,
  nk: int,
  block_k: int,
  scale: float,
) -> None:
  """One (b, h, query tile) row: dq accumulated over the same kept key tiles as the forward pass."""
  b, i, s = pl.program_id(0), pl.program_id(2), pl.program_id(3)

  @pl.when(s == 0)
  def _init():
    dq_sc[...] = jnp.zeros_like(dq_sc)

  full, run = _lookup(entries_ref, counts_ref, b, i, s, nq, nk)

  def step(masked: bool) -> None:
    q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    p = _probs(q, k, lse_ref, q_code_ref, k_code_ref, masked, scale, block_k)
    dp = lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32, precision=_precision(v))
    ds = p * (dp - jnp.expand_dims(di_ref[0], -1))
    dq_sc[...] += lax.dot_general(
      ds.astype(k.dtype), k, _NN, preferred_element_type=jnp.float32, precision=_precision(k)
    )

  pl.when(run & full)(lambda: step(False))
  pl.when(run & jnp.logical_not(full))(lambda: step(True))

  @pl.when(s == nk - 1)
  def _finish():
    dq_ref[...] = (dq_sc[...] * scale).astype(dq_ref.dtype)


def _dkv_kernel(
  entries_ref,
  counts_ref,
  q_code_ref,
  k_code_ref,
  q_ref,
  k_ref,
  v_ref,
  do_ref,
  lse_ref,
  di_ref,
  dk_ref,
  dv_ref,
  dk_sc,
  dv_sc,
  *,
  nq: int,
  nk: int,
  block_k: int,
  scale: float,
) -> None:
  """One (b, h, key tile) row: dk and dv accumulated over the query tiles that keep this key tile."""
  b, j, t = pl.program_id(0), pl.program_id(2), pl.program_id(3)

  @pl.when(t == 0)
  def _init():
    dk_sc[...] = jnp.zeros_like(dk_sc)
    dv_sc[...] = jnp.zeros_like(dv_sc)

  full, run = _lookup(entries_ref, counts_ref, b, j, t, nk, nq)

  def step(masked: bool) -> None:
    q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    p = _probs(q, k, lse_ref, q_code_ref, k_code_ref, masked, scale, block_k)  # [bq, bk]
    dv_sc[...] += lax.dot_general(
      p.T.astype(do.dtype), do, _NN, preferred_element_type=jnp.float32, precision=_precision(do)
    )
    dp = lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32, precision=_precision(v))
    ds = p * (dp - jnp.expand_dims(di_ref[0], -1))
    dk_sc[...] += lax.dot_general(
      ds.T.astype(q.dtype), q, _NN, preferred_element_type=jnp.float32, precision=_precision(q)
    )

  pl.when(run & full)(lambda: step(False))
  pl.when(run & jnp.logical_not(full))(lambda: step(True))

  @pl.when(t == nq - 1)
  def _finish():
    dk_ref[...] = (dk_sc[...] * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


# ----------------------------------------------------------------------------
# pallas_call wrappers. Arrays here are padded: q [B, H, Lq, D], k/v [B, H, Lk, D], D % 128 == 0.


@dataclasses.dataclass(frozen=True)
class _Config:
  block_q: int
  block_k: int
  scale: float
  interpret: Interpret


def _semantics() -> pltpu.CompilerParams:
  return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))


def _code_specs(cfg: _Config, q_tile, k_tile) -> list[pl.BlockSpec]:
  """BlockSpecs of the packed ids, q side [B, Lq, 128] and k side [B, 8, Lk], given tile index functions."""
  return [
    pl.BlockSpec((None, cfg.block_q, LANES), lambda b, h, x, y, e, c: (b, q_tile(b, x, y, e), 0)),
    pl.BlockSpec((None, SUBLANES, cfg.block_k), lambda b, h, x, y, e, c: (b, 0, k_tile(b, x, y, e))),
  ]


def _forward(cfg: _Config, q, k, v, q_code, k_code, rows, cols):
  """(out [B, H, Lq, D], logsumexp [B, H, 1, Lq] float32)."""
  b, h, lq, d = q.shape
  lk = k.shape[2]
  nq, nk = lq // cfg.block_q, lk // cfg.block_k
  entries, counts = rows
  kv_tile = lambda bi, i, s, e: e[(bi * nq + i) * nk + s] >> 1  # noqa: E731
  q_tile = lambda bi, i, s, e: i  # noqa: E731
  q_spec = pl.BlockSpec((None, None, cfg.block_q, d), lambda bi, hi, i, s, e, c: (bi, hi, i, 0))
  kv_spec = pl.BlockSpec((None, None, cfg.block_k, d), lambda bi, hi, i, s, e, c: (bi, hi, kv_tile(bi, i, s, e), 0))
  lse_spec = pl.BlockSpec((None, None, 1, cfg.block_q), lambda bi, hi, i, s, e, c: (bi, hi, 0, i))
  grid_spec = pltpu.PrefetchScalarGridSpec(
    num_scalar_prefetch=2,
    grid=(b, h, nq, nk),
    in_specs=[*_code_specs(cfg, q_tile, kv_tile), q_spec, kv_spec, kv_spec],
    out_specs=[q_spec, lse_spec],
    scratch_shapes=[
      pltpu.VMEM((cfg.block_q, LANES), jnp.float32),
      pltpu.VMEM((cfg.block_q, LANES), jnp.float32),
      pltpu.VMEM((cfg.block_q, d), jnp.float32),
    ],
  )
  kernel = functools.partial(_fwd_kernel, nq=nq, nk=nk, block_k=cfg.block_k, scale=cfg.scale)
  return pl.pallas_call(
    kernel,
    grid_spec=grid_spec,
    out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, 1, lq), jnp.float32)],
    compiler_params=_semantics(),
    interpret=cfg.interpret,
    name="vgpt_attention_fwd",
  )(entries, counts, q_code, k_code, q, k, v)


def _backward_dq(cfg: _Config, q, k, v, do, lse, di, q_code, k_code, rows):
  b, h, lq, d = q.shape
  nq, nk = lq // cfg.block_q, k.shape[2] // cfg.block_k
  entries, counts = rows
  kv_tile = lambda bi, i, s, e: e[(bi * nq + i) * nk + s] >> 1  # noqa: E731
  q_tile = lambda bi, i, s, e: i  # noqa: E731
  q_spec = pl.BlockSpec((None, None, cfg.block_q, d), lambda bi, hi, i, s, e, c: (bi, hi, i, 0))
  kv_spec = pl.BlockSpec((None, None, cfg.block_k, d), lambda bi, hi, i, s, e, c: (bi, hi, kv_tile(bi, i, s, e), 0))
  row_spec = pl.BlockSpec((None, None, 1, cfg.block_q), lambda bi, hi, i, s, e, c: (bi, hi, 0, i))
  grid_spec = pltpu.PrefetchScalarGridSpec(
    num_scalar_prefetch=2,
    grid=(b, h, nq, nk),
    in_specs=[*_code_specs(cfg, q_tile, kv_tile), q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec],
    out_specs=q_spec,
    scratch_shapes=[pltpu.VMEM((cfg.block_q, d), jnp.float32)],
  )
  kernel = functools.partial(_dq_kernel, nq=nq, nk=nk, block_k=cfg.block_k, scale=cfg.scale)
  return pl.pallas_call(
    kernel,
    grid_spec=grid_spec,
    out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
    compiler_params=_semantics(),
    interpret=cfg.interpret,
    name="vgpt_attention_dq",
  )(entries, counts, q_code, k_code, q, k, v, do, lse, di)


def _backward_dkv(cfg: _Config, q, k, v, do, lse, di, q_code, k_code, cols):
  b, h, lq, d = q.shape
  lk = k.shape[2]
  nq, nk = lq // cfg.block_q, lk // cfg.block_k
  entries, counts = cols
  q_tile = lambda bi, j, t, e: e[(bi * nk + j) * nq + t] >> 1  # noqa: E731
  kv_tile = lambda bi, j, t, e: j  # noqa: E731
  q_spec = pl.BlockSpec((None, None, cfg.block_q, d), lambda bi, hi, j, t, e, c: (bi, hi, q_tile(bi, j, t, e), 0))
  kv_spec = pl.BlockSpec((None, None, cfg.block_k, d), lambda bi, hi, j, t, e, c: (bi, hi, j, 0))
  row_spec = pl.BlockSpec((None, None, 1, cfg.block_q), lambda bi, hi, j, t, e, c: (bi, hi, 0, q_tile(bi, j, t, e)))
  grid_spec = pltpu.PrefetchScalarGridSpec(
    num_scalar_prefetch=2,
    grid=(b, h, nk, nq),
    in_specs=[*_code_specs(cfg, q_tile, kv_tile), q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec],
    out_specs=[kv_spec, kv_spec],
    scratch_shapes=[pltpu.VMEM((cfg.block_k, d), jnp.float32), pltpu.VMEM((cfg.block_k, d), jnp.float32)],
  )
  kernel = functools.partial(_dkv_kernel, nq=nq, nk=nk, block_k=cfg.block_k, scale=cfg.scale)
  return pl.pallas_call(
    kernel,
    grid_spec=grid_spec,
    out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
    compiler_params=_semantics(),
    interpret=cfg.interpret,
    name="vgpt_attention_dkv",
  )(entries, counts, q_code, k_code, q, k, v, do, lse, di)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(cfg: _Config, q, k, v, q_code, k_code, rows, cols):
  return _forward(cfg, q, k, v, q_code, k_code, rows, cols)[0]


def _attention_fwd(cfg: _Config, q, k, v, q_code, k_code, rows, cols):
  out, lse = _forward(cfg, q, k, v, q_code, k_code, rows, cols)
  return out, (q, k, v, out, lse, q_code, k_code, rows, cols)


def _attention_bwd(cfg: _Config, res, do):
  q, k, v, out, lse, q_code, k_code, rows, cols = res
  di = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)[:, :, None, :]  # [B, H, 1, Lq]
  dq = _backward_dq(cfg, q, k, v, do, lse, di, q_code, k_code, rows)
  dk, dv = _backward_dkv(cfg, q, k, v, do, lse, di, q_code, k_code, cols)
  return dq, dk, dv, None, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


# ----------------------------------------------------------------------------
# Public entry point.


def _check_block(name: str, block: int) -> None:
  if not isinstance(block, int) or block <= 0 or block % LANES:
    fix = round_up(block, LANES) if isinstance(block, int) and block > 0 else LANES
    raise ValueError(f"{name}={block!r}: TPU tiles need a positive multiple of {LANES} (the lane width); use {fix}")


def _check_inputs(q: jax.Array, k: jax.Array, v: jax.Array, plan: "TpuPlan") -> None:
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"q, k, v must be [B, T, H, D]; got shapes {q.shape}, {k.shape}, {v.shape}")
  if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
    raise ValueError(f"q {q.shape} and k, v {k.shape}, {v.shape} must share batch, heads and head dim")
  if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (jnp.float32, jnp.bfloat16):
    raise ValueError(f"q, k, v must share one dtype, float32 or bfloat16; got {q.dtype}, {k.dtype}, {v.dtype}")
  planned = (plan.q_code.shape[0], plan.q_length, plan.k_length)
  if (q.shape[0], q.shape[1], k.shape[1]) != planned:
    raise ValueError(f"q {q.shape} and k {k.shape} do not match the plan's (B, Tq, Tk) = {planned}: plan their ids")


@functools.partial(jax.tree_util.register_dataclass, data_fields=["q_code", "k_code", "rows", "cols"],
                   meta_fields=["q_length", "k_length", "block_q", "block_k"])  # fmt: skip
@dataclasses.dataclass(frozen=True)
class TpuPlan:
  """What the kernels read besides q, k, v; made once per forward pass (`tpu_plan`), used by every layer."""

  q_code: jax.Array  # int32 [B, Lq, 128]: packed ids of the queries, replicated over lanes
  k_code: jax.Array  # int32 [B, 8, Lk]: packed ids of the keys, replicated over sublanes
  rows: tuple[jax.Array, jax.Array]  # per (b, query tile): kept key tiles (2 * tile + full) and their count
  cols: tuple[jax.Array, jax.Array]  # per (b, key tile): the query tiles that see it, for the dK/dV kernel
  q_length: int  # Tq, Tk before padding
  k_length: int
  block_q: int
  block_k: int


def tpu_plan(q_ids: TokenIds, k_ids: TokenIds, *, block_q: int = 512, block_k: int = 512) -> TpuPlan:
  """Packed ids and tile lists for queries and keys with these ids; blocks positive multiples of 128."""
  _check_block("block_q", block_q)
  _check_block("block_k", block_k)
  for name, ids in (("q_ids", q_ids), ("k_ids", k_ids)):
    shapes = {getattr(ids, f).shape for f in ("frame", "clip", "stream", "kind")}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
      raise ValueError(f"{name} fields must share one shape [B, T]; got {sorted(shapes)}")
  if q_ids.frame.shape[0] != k_ids.frame.shape[0]:
    raise ValueError(f"q_ids and k_ids must share the batch; got {q_ids.frame.shape} and {k_ids.frame.shape}")
  _check_ranges(q_ids, "q_ids")
  _check_ranges(k_ids, "k_ids")
  return _tpu_plan(q_ids, k_ids, block_q=block_q, block_k=block_k)


@functools.partial(jax.jit, static_argnames=("block_q", "block_k"))
def _tpu_plan(q_ids: TokenIds, k_ids: TokenIds, *, block_q: int, block_k: int) -> TpuPlan:
  tq, tk = q_ids.frame.shape[1], k_ids.frame.shape[1]
  block_q, block_k = min(block_q, round_up(tq, LANES)), min(block_k, round_up(tk, LANES))
  lq, lk = round_up(tq, block_q), round_up(tk, block_k)
  q_ids, k_ids = pad_ids(q_ids, lq), pad_ids(k_ids, lk)
  keep = tile_map(q_ids, k_ids, block_q, block_k)  # [B, nq, nk]
  full = keep & full_tile_map(q_ids, k_ids, block_q, block_k)
  b = q_ids.frame.shape[0]
  return TpuPlan(
    q_code=jnp.broadcast_to(_pack_ids(q_ids)[:, :, None], (b, lq, LANES)),
    k_code=jnp.broadcast_to(_pack_ids(k_ids)[:, None, :], (b, SUBLANES, lk)),
    rows=_compact(keep, full),
    cols=_compact(jnp.swapaxes(keep, 1, 2), jnp.swapaxes(full, 1, 2)),
    q_length=tq,
    k_length=tk,
    block_q=block_q,
    block_k=block_k,
  )


@functools.partial(jax.jit, static_argnames=("interpret",))
def tpu_attend(q: jax.Array, k: jax.Array, v: jax.Array, plan: TpuPlan, interpret: Interpret = False) -> jax.Array:
  """Masked softmax attention of q [B, Tq, H, D] over k, v [B, Tk, H, D] as `plan` says; differentiable."""
  _check_inputs(q, k, v, plan)
  d = q.shape[3]
  lq, lk, dp = plan.q_code.shape[1], plan.k_code.shape[2], round_up(d, LANES)

  def to_kernel(x: jax.Array, length: int) -> jax.Array:
    x = jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, dp - d)))
    return jnp.transpose(x, (0, 2, 1, 3))  # [B, H, L, Dp]

  cfg = _Config(plan.block_q, plan.block_k, float(d) ** -0.5, interpret)
  out = _attention(
    cfg, to_kernel(q, lq), to_kernel(k, lk), to_kernel(v, lk), plan.q_code, plan.k_code, plan.rows, plan.cols
  )
  return jnp.transpose(out, (0, 2, 1, 3))[:, : plan.q_length, :, :d]


def pallas_tpu_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  q_ids: TokenIds,
  k_ids: TokenIds,
  *,
  block_q: int = 512,
  block_k: int = 512,
  interpret: Interpret = False,
) -> jax.Array:
  """Masked softmax attention as a Pallas TPU kernel; equal to `dense_attention`, differentiable (custom VJP).

  `tpu_plan` then `tpu_attend` in one call (the model plans once per forward pass instead).

  Args:
    q: [B, Tq, H, D]; k, v: [B, Tk, H, D]; one dtype, float32 or bfloat16. Any Tq, Tk and D (padded inside).
    q_ids, k_ids: token ids with fields int32 [B, Tq] and [B, Tk] (frames < 8192, clips < 8192).
    block_q, block_k: tile sizes, positive multiples of 128 (capped at the padded lengths).
    interpret: run the kernels in Pallas interpret mode (True), or in TPU interpret mode with
      `pltpu.InterpretParams(...)` (simulates TPU memory; stricter, slower; jit the caller and block on the result,
      see the module docstring). False compiles with Mosaic (TPU only).
  Returns:
    [B, Tq, H, D] in q's dtype. A query that sees no key outputs 0.
  """
  check_ids_match(q, k, q_ids, k_ids)
  return tpu_attend(q, k, v, tpu_plan(q_ids, k_ids, block_q=block_q, block_k=block_k), interpret=interpret)
