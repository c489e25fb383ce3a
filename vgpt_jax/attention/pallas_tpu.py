"""Pallas/Mosaic TPU flash attention driven by per-token ids ("splash-style"), forward and backward.

Same semantics as `dense_attention`, without any [Tq, Tk] mask in memory:

  * Layout: q, k, v move to [B, H, T, D] (a tile's rows on sublanes and D on lanes). T is padded to the blocks
    with invisible tokens (`chunked.pad_ids`) and D with zeros up to a multiple of 128 (exact: zero columns add
    nothing to q.k, and the extra output columns are dropped).
  * Mask: the id fields the mask needs (frame, block, stream, kind) are packed into one int32 per token
    (`_pack_ids`) and laid out twice per side: one token per sublane row replicated over lanes ([B, T, 128]) and one
    token per lane replicated over sublanes ([B, 8, T]), the layouts Mosaic broadcasts cheaply. A kernel loads the
    codes of its tile's rows and columns, unpacks them and turns them into key ranks and query bounds
    (`mask.key_rank`, `mask.query_bounds`) on the narrow blocks; the tile itself costs 3 int32 comparisons per
    entry (`mask.visible_by_rank`, equal to `mask.visible`).
  * Skipping: once per forward pass (`tpu_plan`, the path's plan, shared by every layer), `chunked.tile_map`
    (per batch element) says which tiles may hold a visible entry, and `chunked.full_tile_map` which tiles surely
    are entirely visible. `_work_list` turns them into one list of steps: each (b, query tile) row's kept key
    tiles in order, rows one after another, with flags (fully visible, first and last step of the row). The grid
    is (heads, steps) with the number of steps a traced value (a dynamic grid dimension, read from the plan), so
    a skipped tile costs nothing: no grid step, no K/V fetch, no compute. A row with nothing kept gets one step
    that only writes its output. The list and its length go to SMEM by scalar prefetch; the index maps decode
    (b, row tile, column tile) from it. Fully visible tiles skip the mask. SMEM holds the two lists, 2 * B * nq * nk
    int32 words (checked against the chip's SMEM on a TPU).
  * dK/dV: its list runs over (b, key tile) rows and the query tiles that keep them, and the kernel works on the
    transposed tile [bk, bq] (scores k q^T), so p^T and dS^T feed the dV and dK matmuls directly (no in-kernel
    transposes) and the query side's logsumexp, D_i and ids are (1, bq) / (8, bq) rows, not lane-replicated blocks.
  * VMEM: `vmem_bytes` estimates one step of the largest kernel; on a TPU the scoped limit is set to twice that,
    at most 90% of the chip's VMEM (`pltpu.get_tpu_info`), and blocks whose estimate does not fit are refused
    before compiling.
  * Numerics: scores, online-softmax statistics, accumulators and gradients in float32; p is cast to V's dtype
    before the PV matmul, as the dense reference does. A query that sees no key outputs 0 (and gets no
    gradient). The backward saves logsumexp [B, H, 1, Tq] (float32) and recomputes p (flash attention).

Constraints (checked, ValueError): block_q and block_k positive multiples of 128 (the lane width; blocks are
capped at the padded lengths, so short sequences are fine); q, k, v of one float dtype (float32 or bfloat16) with
matching batch, heads and head dim; ids shaped [B, Tq] / [B, Tk]. Unchecked under jit: frame ids in [0, 8192)
and clip ids in [0, 8192) (the packing; `_check_ranges` checks them when the ids are concrete). On TPU the VMEM
per step is O(block_q * block_k) float32 (about 12 MiB at 512 x 512 and head dim 128 in float32, most in the
dK/dV kernel). pallas_call is not auto-partitioned: under a sharded jit, call it
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

from vgpt_jax.attention.chunked import full_tile_map, pad_ids, round_up, tile_map, visit_lists
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
_FULL, _FIRST, _LAST, _RUN = 1, 2, 4, 8  # flags of a work item (`_work_list`)
_FLAG_BITS = 4

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


def _work_list(keep: jax.Array, full: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The grid's steps for keep [B, R, C] (rows = the tiles a kernel accumulates into, columns = the tiles it visits).

  Each row's kept columns in ascending order, rows one after another (b, then row); a row with nothing kept gets
  one step that runs nothing (its output is still written). Returns (items int32 [B * R * C], only the first
  `steps` used, and steps int32 []: the grid length). An item packs ((b * R + row) * C + column) << 4 with the
  flags full (1), first step of its row (2), last step of its row (4) and run (8).
  """
  b, rows, cols = keep.shape
  order, count = visit_lists(keep)  # [B, R, C] kept columns first, [B, R]
  steps = jnp.maximum(count, 1)
  t = jnp.arange(cols, dtype=jnp.int32)
  run = t < count[..., None]
  column = jnp.where(run, order, 0)
  is_full = jnp.take_along_axis(full, column, axis=-1) & run
  index = (jnp.arange(b * rows, dtype=jnp.int32).reshape(b, rows, 1) * cols + column) << _FLAG_BITS
  flags = is_full * _FULL + (t == 0) * _FIRST + (t == steps[..., None] - 1) * _LAST + run * _RUN
  start = (jnp.cumsum(steps.reshape(-1)) - steps.reshape(-1)).reshape(b, rows, 1)
  position = jnp.where(t < steps[..., None], start + t, b * rows * cols)  # past the end: dropped
  items = (
    jnp.zeros(b * rows * cols, jnp.int32)
    .at[position.reshape(-1)]
    .set((index | flags).astype(jnp.int32).reshape(-1), mode="drop")
  )
  return items, jnp.sum(steps, dtype=jnp.int32)


# ----------------------------------------------------------------------------
# Kernels. Grid (head, step): step s handles one (row tile, visited tile) pair of the work list.


def _flags(items_ref: Any) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """(full, first, last, run) of this grid step's work item."""
  item = items_ref[pl.program_id(1)]
  return tuple((item & flag) != 0 for flag in (_FULL, _FIRST, _LAST, _RUN))


def _tile_mask(row_code_ref: Any, col_code_ref: Any, width: int, queries_on_rows: bool) -> jax.Array:
  """bool [rows, width] from the tile's packed ids: row codes (rows, 128) lane-replicated, column codes (8, width).

  Queries on rows (forward, dq) or keys on rows (dk/dv, the transposed tile). Unpacking and the interval form
  (`mask.query_bounds`, `mask.key_rank`) happen on the narrow blocks; the tile itself only sees int32
  comparisons of widened fields (3 per entry), no broadcast boolean masks.
  """
  widen = lambda x: jnp.tile(x, (1, width // LANES))  # noqa: E731  [rows, 128] -> [rows, width]
  rows, cols = _unpack_ids(row_code_ref[...]), _unpack_ids(col_code_ref[:1, :])  # cols: [1, width]
  if queries_on_rows:
    return visible_by_rank(key_rank(cols), tuple(widen(x) for x in query_bounds(rows)))
  return visible_by_rank(widen(key_rank(rows)), query_bounds(cols))


def _dot(a: jax.Array, b: jax.Array, dims) -> jax.Array:
  """float32 matmul; full float32 passes for float32 inputs (TPU's default would round them to bfloat16)."""
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else lax.Precision.DEFAULT
  return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32, precision=precision)


def _fwd_kernel(items_ref, q_code_ref, k_code_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc, *,
                block_k: int, scale: float) -> None:  # fmt: skip
  """Online softmax of one query tile over its kept key tiles; out and logsumexp written at the row's last step."""
  full, first, last, run = _flags(items_ref)

  @pl.when(first)
  def _init():
    m_sc[...] = jnp.full_like(m_sc, _MASK)
    l_sc[...] = jnp.zeros_like(l_sc)
    acc_sc[...] = jnp.zeros_like(acc_sc)

  def step(masked: bool) -> None:
    scores = _dot(q_ref[...], k_ref[...], _NT) * scale  # [bq, bk]
    if masked:
      mask = _tile_mask(q_code_ref, k_code_ref, block_k, queries_on_rows=True)
      scores = jnp.where(mask, scores, _MASK)
    m_prev, l_prev = m_sc[...], l_sc[...]  # [bq, 128], equal lanes
    m_new = jnp.maximum(m_prev, jnp.max(scores, axis=1, keepdims=True))
    p = jnp.exp(scores - jnp.tile(m_new, (1, block_k // LANES)))
    if masked:
      p = jnp.where(mask, p, 0.0)  # a row with nothing visible yet stays empty
    alpha = jnp.exp(m_prev - m_new)
    l_sc[...] = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
    m_sc[...] = m_new
    v = v_ref[...]
    acc_sc[...] = acc_sc[...] * jnp.tile(alpha, (1, acc_sc.shape[1] // LANES)) + _dot(p.astype(v.dtype), v, _NN)

  pl.when(run & full)(lambda: step(False))
  pl.when(run & jnp.logical_not(full))(lambda: step(True))

  @pl.when(last)
  def _finish():
    l, m = l_sc[...], m_sc[...]
    seen = l > 0.0
    inv = jnp.where(seen, 1.0 / jnp.where(seen, l, 1.0), 0.0)  # no visible key: output 0
    o_ref[...] = (acc_sc[...] * jnp.tile(inv, (1, acc_sc.shape[1] // LANES))).astype(o_ref.dtype)
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), _EMPTY_LSE)  # [bq, 128], equal lanes
    lse_ref[...] = jnp.transpose(lse)[:1, :]  # one row [1, bq]: no lane-replicated copy in HBM


def _dq_kernel(items_ref, q_code_ref, k_code_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, dq_ref, dq_sc, *,
               block_k: int, scale: float) -> None:  # fmt: skip
  """dq of one query tile, accumulated over the same kept key tiles as the forward pass."""
  full, first, last, run = _flags(items_ref)

  @pl.when(first)
  def _init():
    dq_sc[...] = jnp.zeros_like(dq_sc)

  def step(masked: bool) -> None:
    k = k_ref[...]
    p = jnp.exp(_dot(q_ref[...], k, _NT) * scale - jnp.expand_dims(lse_ref[0], -1))  # [bq, bk]
    if masked:
      p = jnp.where(_tile_mask(q_code_ref, k_code_ref, block_k, queries_on_rows=True), p, 0.0)
    ds = p * (_dot(do_ref[...], v_ref[...], _NT) - jnp.expand_dims(di_ref[0], -1))
    dq_sc[...] += _dot(ds.astype(k.dtype), k, _NN)

  pl.when(run & full)(lambda: step(False))
  pl.when(run & jnp.logical_not(full))(lambda: step(True))

  @pl.when(last)
  def _finish():
    dq_ref[...] = (dq_sc[...] * scale).astype(dq_ref.dtype)


def _dkv_kernel(items_ref, k_code_ref, q_code_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, dk_ref, dv_ref,
                dk_sc, dv_sc, *, block_q: int, scale: float) -> None:  # fmt: skip
  """dk and dv of one key tile over the query tiles that keep it, on the transposed tile [bk, bq]: the scores are
  k q^T, so p^T and ds^T come out as the dV and dK matmuls need them (no in-kernel transposes), and the query
  side's logsumexp, D_i and ids are rows broadcast over sublanes."""
  full, first, last, run = _flags(items_ref)

  @pl.when(first)
  def _init():
    dk_sc[...] = jnp.zeros_like(dk_sc)
    dv_sc[...] = jnp.zeros_like(dv_sc)

  def step(masked: bool) -> None:
    q, do = q_ref[...], do_ref[...]
    p_t = jnp.exp(_dot(k_ref[...], q, _NT) * scale - lse_ref[...])  # [bk, bq]
    if masked:
      p_t = jnp.where(_tile_mask(k_code_ref, q_code_ref, block_q, queries_on_rows=False), p_t, 0.0)
    dv_sc[...] += _dot(p_t.astype(do.dtype), do, _NN)
    ds_t = p_t * (_dot(v_ref[...], do, _NT) - di_ref[...])
    dk_sc[...] += _dot(ds_t.astype(q.dtype), q, _NN)

  pl.when(run & full)(lambda: step(False))
  pl.when(run & jnp.logical_not(full))(lambda: step(True))

  @pl.when(last)
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
  vmem_limit: int | None


def _call(cfg: _Config, kernel, name: str, work, in_specs, out_specs, scratch, out_shape, *args):
  """pallas_call on grid (heads, work steps) over args (ids, ids, q, ...): the heads split across TensorCores,
  the steps run in order. The number of steps is a traced value (dynamic grid): it depends on the clip split."""
  items, steps = work
  heads = args[2].shape[1]
  grid_spec = pltpu.PrefetchScalarGridSpec(
    num_scalar_prefetch=1, grid=(heads, steps), in_specs=in_specs, out_specs=out_specs, scratch_shapes=scratch
  )
  params = pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"), vmem_limit_bytes=cfg.vmem_limit)
  return pl.pallas_call(
    kernel, grid_spec=grid_spec, out_shape=out_shape, compiler_params=params, interpret=cfg.interpret, name=name
  )(items, *args)


def _tiles(items: Any, s: jax.Array, rows: int, cols: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(b, row tile, column tile) of work item s."""
  index = items[s] >> _FLAG_BITS
  return lax.div(index, rows * cols), lax.rem(lax.div(index, cols), rows), lax.rem(index, cols)


def _specs(cfg: _Config, d: int, nq: int, nk: int, queries_are_rows: bool):
  """BlockSpecs (query ids, key ids, query-side [.., bq, d], key-side [.., bk, d], query rows [.., 1, bq]).

  Query-row lists (forward, dq) carry query ids lane-replicated (bq, 128) and key ids as (8, bk); the dK/dV
  list (key tiles as rows) carries key ids (bk, 128) and query ids (8, bq)."""
  rows, cols = (nq, nk) if queries_are_rows else (nk, nq)

  def q_tile(s, e):
    b, r, c = _tiles(e, s, rows, cols)
    return b, (r if queries_are_rows else c)

  def k_tile(s, e):
    b, r, c = _tiles(e, s, rows, cols)
    return b, (c if queries_are_rows else r)

  # Index maps, each decoding its work item once: tile t of batch element b placed by `place` as a block of
  # ids one token per sublane row (b, t, 0) or per lane (b, 0, t), of [B, H, L, D] data (b, h, t, 0), or of a
  # [B, H, 1, L] row (b, h, 0, t).
  def index_map(tile, place):
    def index(h, s, e):
      b, t = tile(s, e)
      return place(b, h, t)

    return index

  def ids_on_rows(tile):
    return index_map(tile, lambda b, h, t: (b, t, 0))

  def ids_on_lanes(tile):
    return index_map(tile, lambda b, h, t: (b, 0, t))

  def data(tile):
    return index_map(tile, lambda b, h, t: (b, h, t, 0))

  def row(tile):
    return index_map(tile, lambda b, h, t: (b, h, 0, t))

  bq, bk = cfg.block_q, cfg.block_k
  if queries_are_rows:
    codes = [
      pl.BlockSpec((None, bq, LANES), ids_on_rows(q_tile)),
      pl.BlockSpec((None, SUBLANES, bk), ids_on_lanes(k_tile)),
    ]
  else:
    codes = [
      pl.BlockSpec((None, bk, LANES), ids_on_rows(k_tile)),
      pl.BlockSpec((None, SUBLANES, bq), ids_on_lanes(q_tile)),
    ]
  q_spec = pl.BlockSpec((None, None, bq, d), data(q_tile))
  k_spec = pl.BlockSpec((None, None, bk, d), data(k_tile))
  row_spec = pl.BlockSpec((None, None, 1, bq), row(q_tile))
  return codes, q_spec, k_spec, row_spec


def _forward(cfg: _Config, q, k, v, plan: "TpuPlan"):
  """(out [B, H, Lq, D], logsumexp [B, H, 1, Lq] float32)."""
  b, h, lq, d = q.shape
  nq, nk = lq // cfg.block_q, k.shape[2] // cfg.block_k
  codes, q_spec, k_spec, row_spec = _specs(cfg, d, nq, nk, queries_are_rows=True)
  scratch = [
    pltpu.VMEM((cfg.block_q, LANES), jnp.float32),
    pltpu.VMEM((cfg.block_q, LANES), jnp.float32),
    pltpu.VMEM((cfg.block_q, d), jnp.float32),
  ]
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, 1, lq), jnp.float32)]
  kernel = functools.partial(_fwd_kernel, block_k=cfg.block_k, scale=cfg.scale)
  return _call(cfg, kernel, "vgpt_attention_fwd", plan.rows, [*codes, q_spec, k_spec, k_spec], [q_spec, row_spec],
               scratch, out_shape, plan.q_rows, plan.k_lanes, q, k, v)  # fmt: skip


def _backward_dq(cfg: _Config, q, k, v, do, lse, di, plan: "TpuPlan"):
  d = q.shape[3]
  nq, nk = q.shape[2] // cfg.block_q, k.shape[2] // cfg.block_k
  codes, q_spec, k_spec, row_spec = _specs(cfg, d, nq, nk, queries_are_rows=True)
  in_specs = [*codes, q_spec, k_spec, k_spec, q_spec, row_spec, row_spec]
  kernel = functools.partial(_dq_kernel, block_k=cfg.block_k, scale=cfg.scale)
  return _call(cfg, kernel, "vgpt_attention_dq", plan.rows, in_specs, q_spec,
               [pltpu.VMEM((cfg.block_q, d), jnp.float32)], jax.ShapeDtypeStruct(q.shape, q.dtype),
               plan.q_rows, plan.k_lanes, q, k, v, do, lse, di)  # fmt: skip


def _backward_dkv(cfg: _Config, q, k, v, do, lse, di, plan: "TpuPlan"):
  d = q.shape[3]
  nq, nk = q.shape[2] // cfg.block_q, k.shape[2] // cfg.block_k
  codes, q_spec, k_spec, row_spec = _specs(cfg, d, nq, nk, queries_are_rows=False)
  in_specs = [*codes, q_spec, k_spec, k_spec, q_spec, row_spec, row_spec]
  scratch = [pltpu.VMEM((cfg.block_k, d), jnp.float32), pltpu.VMEM((cfg.block_k, d), jnp.float32)]
  out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
  kernel = functools.partial(_dkv_kernel, block_q=cfg.block_q, scale=cfg.scale)
  return _call(cfg, kernel, "vgpt_attention_dkv", plan.cols, in_specs, [k_spec, k_spec], scratch, out_shape,
               plan.k_rows, plan.q_lanes, q, k, v, do, lse, di)  # fmt: skip


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(cfg: _Config, q, k, v, plan: "TpuPlan"):
  return _forward(cfg, q, k, v, plan)[0]


def _attention_fwd(cfg: _Config, q, k, v, plan: "TpuPlan"):
  out, lse = _forward(cfg, q, k, v, plan)
  return out, (q, k, v, out, lse, plan)


def _attention_bwd(cfg: _Config, res, do):
  q, k, v, out, lse, plan = res
  di = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)[:, :, None, :]  # [B, H, 1, Lq]
  dq = _backward_dq(cfg, q, k, v, do, lse, di, plan)
  dk, dv = _backward_dkv(cfg, q, k, v, do, lse, di, plan)
  return dq, dk, dv, None


_attention.defvjp(_attention_fwd, _attention_bwd)


# ----------------------------------------------------------------------------
# VMEM: what one grid step holds, checked against the chip before compiling.


def vmem_bytes(block_q: int, block_k: int, head_dim: int, itemsize: int) -> int:
  """Upper estimate of one step's VMEM in the largest kernel (dK/dV): double-buffered blocks, scratch, and
  about eight float32 [bq, bk] intermediates (scores, p, dp, ds, the widened mask fields)."""
  d = round_up(head_dim, LANES)
  blocks = (2 * block_q + 4 * block_k) * d * itemsize  # q, do in; k, v in; dk, dv out
  blocks += block_k * LANES * 4 + SUBLANES * block_q * 4 + 2 * SUBLANES * block_q * 4  # ids, lse, D_i
  return 2 * blocks + 2 * block_k * d * 4 + 8 * block_q * block_k * 4


def vmem_limit(need: int, capacity: int | None, blocks: tuple[int, int]) -> int | None:
  """The scoped VMEM limit for the kernels: twice the estimate, at most 90% of the chip's VMEM (None off TPU:
  Mosaic's default). Refuses blocks whose estimate alone exceeds that, before compiling."""
  if capacity is None:
    return None
  cap = int(0.9 * capacity)
  if need > cap:
    raise ValueError(
      f"block_q, block_k = {blocks}: one step needs about {need / 2**20:.1f} MiB of VMEM, more than this TPU's "
      f"{capacity / 2**20:.0f} MiB allows; use smaller blocks (e.g. 512 or 256)"
    )
  return min(2 * need, cap)


def _tpu_info() -> Any:
  """The TPU in use (`pltpu.get_tpu_info`: per-TensorCore VMEM and SMEM), None without a TPU."""
  return pltpu.get_tpu_info() if jax.default_backend() == "tpu" else None


def _vmem_capacity() -> int | None:
  """VMEM bytes per TensorCore of the TPU in use, None without a TPU."""
  info = _tpu_info()
  return None if info is None else info.vmem_capacity_bytes


def _check_smem(plan: "TpuPlan") -> None:
  """The work lists live in SMEM; refuse, before compiling, lists that would take more than half of it."""
  info = _tpu_info()
  if info is None:
    return
  words, capacity = plan.rows[0].size + plan.cols[0].size, info.smem_capacity_bytes
  if 4 * words > capacity // 2:
    raise ValueError(
      f"the tile lists take {4 * words / 2**10:.0f} KiB of SMEM (B * nq * nk = {plan.rows[0].size}), more than "
      f"half of this TPU's {capacity / 2**10:.0f} KiB: use larger blocks or fewer sequences per device"
    )


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
  planned = (plan.q_rows.shape[0], plan.q_length, plan.k_length)
  if (q.shape[0], q.shape[1], k.shape[1]) != planned:
    raise ValueError(f"q {q.shape} and k {k.shape} do not match the plan's (B, Tq, Tk) = {planned}: plan their ids")


@functools.partial(
  jax.tree_util.register_dataclass,
  data_fields=["q_rows", "k_lanes", "k_rows", "q_lanes", "rows", "cols"],
  meta_fields=["q_length", "k_length", "block_q", "block_k"],
)
@dataclasses.dataclass(frozen=True)
class TpuPlan:
  """What the kernels read besides q, k, v; made once per forward pass (`tpu_plan`), used by every layer.

  Packed ids in the two layouts a tile needs (one token per sublane row, replicated over lanes; or one token per
  lane, replicated over sublanes), for queries on the tile's rows (forward, dq) and keys on them (dK/dV).
  """

  q_rows: jax.Array  # int32 [B, Lq, 128]
  k_lanes: jax.Array  # int32 [B, 8, Lk]
  k_rows: jax.Array  # int32 [B, Lk, 128]
  q_lanes: jax.Array  # int32 [B, 8, Lq]
  rows: tuple[jax.Array, jax.Array]  # work list over (b, query tile) rows and their kept key tiles, and its length
  cols: tuple[jax.Array, jax.Array]  # the same over (b, key tile) rows and the query tiles that see them (dK/dV)
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
  if q_ids.frame.shape[0] * (lq // block_q) * (lk // block_k) >= 1 << (31 - _FLAG_BITS):
    raise ValueError(f"B * nq * nk tiles = {q_ids.frame.shape[0]} * {lq // block_q} * {lk // block_k} is too many "
                     "for the work list's int32 items; use larger blocks")  # fmt: skip
  q_ids, k_ids = pad_ids(q_ids, lq), pad_ids(k_ids, lk)
  keep = tile_map(q_ids, k_ids, block_q, block_k)  # [B, nq, nk]
  full = keep & full_tile_map(q_ids, k_ids, block_q, block_k)
  b = q_ids.frame.shape[0]
  q_code, k_code = _pack_ids(q_ids), _pack_ids(k_ids)
  return TpuPlan(
    q_rows=jnp.broadcast_to(q_code[:, :, None], (b, lq, LANES)),
    k_lanes=jnp.broadcast_to(k_code[:, None, :], (b, SUBLANES, lk)),
    k_rows=jnp.broadcast_to(k_code[:, :, None], (b, lk, LANES)),
    q_lanes=jnp.broadcast_to(q_code[:, None, :], (b, SUBLANES, lq)),
    rows=_work_list(keep, full),
    cols=_work_list(jnp.swapaxes(keep, 1, 2), jnp.swapaxes(full, 1, 2)),
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
  lq, lk, dp = plan.q_rows.shape[1], plan.k_lanes.shape[2], round_up(d, LANES)

  def to_kernel(x: jax.Array, length: int) -> jax.Array:
    x = jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, dp - d)))
    return jnp.transpose(x, (0, 2, 1, 3))  # [B, H, L, Dp]

  _check_smem(plan)
  need = vmem_bytes(plan.block_q, plan.block_k, d, q.dtype.itemsize)
  limit = vmem_limit(need, _vmem_capacity(), (plan.block_q, plan.block_k))
  cfg = _Config(plan.block_q, plan.block_k, float(d) ** -0.5, interpret, limit)
  out = _attention(cfg, to_kernel(q, lq), to_kernel(k, lk), to_kernel(v, lk), plan)
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
