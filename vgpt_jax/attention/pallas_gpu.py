"""Flash attention for GPUs in Pallas (Triton lowering), masked by per-token ids, empty tiles skipped.

Forward and backward are Pallas kernels tied together with `jax.custom_vjp`:
  * the mask is never stored: each kernel loads the key ranks of its key rows
    and the query bounds of its query rows (`mask.key_rank`, `mask.query_bounds`,
    packed once per forward pass) and evaluates `mask.visible_by_rank` on the
    [block_q, block_k] tile: the dense reference's rule, in 3 comparisons per
    entry;
  * tiles with no visible entry are never visited: `chunked.tile_map` (per
    batch element) becomes, outside the kernels and once per forward pass
    (`gpu_plan`, the path's plan), a list of the visible key tiles
    of every query tile and its length (and, for the dk/dv kernel, the visible
    query tiles of every key tile). The backward kernels have their own,
    smaller tiles (`bwd_block_*`, 64 from `select`) and lists for them. A
    list entry also says whether the tile is entirely visible
    (`chunked.full_tile_map`); such a tile runs without its mask. Each
    kernel's loop runs over its list only,
    so the work is proportional to the kept tiles (about a quarter of a training
    sequence's) and no branch sits inside the loop;
  * softmax statistics (running max, normaliser, log-sum-exp) are float32 and
    kept in base 2 (`exp2`, scale folded with log2(e)); matmuls accumulate in
    float32. The backward recomputes probabilities from the saved log-sum-exp:
    one kernel over key tiles accumulates dk and dv, one over query tiles
    accumulates dq (the split of the public Pallas flash backward), so neither
    needs atomics.
Any lengths work: sequences are padded to the blocks with invisible padding
tokens (`chunked.pad_ids`); a query that sees no key outputs 0.

Constraints (checked by `gpu_plan` and `gpu_attend`, which raise a ValueError
that names the fix):
  * q [B, Tq, H, D], k and v [B, Tk, H, D]: same B, H and D (no grouped heads);
  * any head dim D up to 256. Triton's tensor shapes are powers of two and its
    `dot` needs every dimension >= 16, so q, k, v are zero-padded to the next
    such size (the paper's 96 -> 128; zeros change no dot product) and the
    softmax scale stays D**-0.5;
  * block_q, block_k powers of two >= 16. They are capped at the padded
    lengths (so short sequences use small tiles); 64 or 128 suit an H100, larger
    tiles spill registers (and 256-wide heads want 32 or 64);
  * q, k, v of one dtype among float32, bfloat16 and float16. float32 matmuls
    run at full IEEE precision (not TF32) so results match the dense reference;
    cast to bfloat16 for tensor-core speed.

cuDNN (`jax.nn.dot_product_attention(implementation="cudnn")`) cannot express
this mask except as a dense boolean mask or additive bias of shape
[B, 1, Tq, Tk]: its structured masks are causal, sliding-window and
padding/sequence-length masks. No token order turns the hierarchical mask into
one of those (patches of a clip see each other both ways, `<diff>` tokens see
only `<diff>` tokens of their clip, a noisy clip sees earlier clips' clean
copies but not its own), so the cuDNN path would materialise and read an
O(T^2) tensor per step and could not skip empty tiles. Hence this kernel.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from vgpt_jax.attention.chunked import full_tile_map, pad_ids, round_up, tile_map, visit_lists
from vgpt_jax.attention.mask import key_rank, query_bounds, visible_by_rank
from vgpt_jax.attention.path import check_ids_match
from vgpt_jax.layout import TokenIds

DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
MAX_HEAD_DIM = 256
_FIELDS = 4  # packed per token: its key rank and its query bounds (mask.key_rank, mask.query_bounds)
_NEG = -1e30  # masked score: finite so that a row with nothing visible yet never computes inf - inf
_LOG2E = math.log2(math.e)


# ----------------------------------------------------------------------------
# Checks and planning (outside the kernels).


def _is_pow2(x: int) -> bool:
  return x > 0 and x & (x - 1) == 0


def _check(q: jax.Array, k: jax.Array, v: jax.Array, plan: "GpuPlan"):
  """Every constraint of the Triton kernels on q, k, v (and their match with the plan), each with the fix."""
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"q, k, v must be [B, T, H, D]; got shapes {q.shape}, {k.shape}, {v.shape}")
  if k.shape != v.shape:
    raise ValueError(f"k and v must have one shape; got {k.shape} and {v.shape}")
  b, tq, h, d = q.shape
  if (k.shape[0], k.shape[2], k.shape[3]) != (b, h, d):
    raise ValueError(
      f"q {q.shape} and k/v {k.shape} must share batch, heads and head dim; repeat k/v heads for grouped attention"
    )
  if not (q.dtype == k.dtype == v.dtype) or q.dtype not in DTYPES:
    raise ValueError(
      f"q, k, v must share one dtype among float32, bfloat16, float16; got {q.dtype}, {k.dtype}, {v.dtype}: "
      "cast them (e.g. .astype(jnp.bfloat16))"
    )
  if d > MAX_HEAD_DIM:
    raise ValueError(
      f"head dim D={d} is over the Triton kernel's {MAX_HEAD_DIM} (its tiles would not fit in shared memory): "
      "use more heads or attention='chunked'"
    )
  planned = (plan.q_ids.shape[0], plan.q_length, plan.k_length)
  if (b, tq, k.shape[1]) != planned:
    raise ValueError(f"q {q.shape} and k {k.shape} do not match the plan's (B, Tq, Tk) = {planned}: plan their ids")


def _block(block: int, length: int) -> int:
  """The tile size actually used: capped at the length rounded up to a power of two (never below 16)."""
  return min(block, max(16, pl.next_power_of_2(length)))


def _padded(q_ids: TokenIds, k_ids: TokenIds, tq: int, tk: int, block_q: int, block_k: int):
  bq, bk = _block(block_q, tq), _block(block_k, tk)
  return pad_ids(q_ids, round_up(tq, bq)), pad_ids(k_ids, round_up(tk, bk)), bq, bk


def visible_tiles(q_ids: TokenIds, k_ids: TokenIds, block_q: int = 64, block_k: int = 64) -> jax.Array:
  """bool [B, nq, nk]: the tiles the kernels run for these ids and blocks (after capping and padding)."""
  tq, tk = q_ids.frame.shape[1], k_ids.frame.shape[1]
  pq, pk, bq, bk = _padded(q_ids, k_ids, tq, tk, block_q, block_k)
  return tile_map(pq, pk, bq, bk)


def _tile_maps(q_ids: TokenIds, k_ids: TokenIds, bq: int, bk: int) -> tuple[jax.Array, jax.Array]:
  """(kept, full) bool [B, nq, nk]: tiles that may hold a visible entry, and tiles entirely visible."""
  return tile_map(q_ids, k_ids, bq, bk), full_tile_map(q_ids, k_ids, bq, bk)


def _entries(kept: jax.Array, full: jax.Array, per_key_tile: bool = False):
  """Visit lists per query tile (or per key tile) of the tile maps: int32 [B, n, m] entries 2 * tile + full,
  kept tiles first (full: every entry of the tile is visible, so the kernel skips its mask), and int32 [B, n]
  their count."""
  if per_key_tile:
    kept, full = jnp.swapaxes(kept, 1, 2), jnp.swapaxes(full, 1, 2)
  order, count = visit_lists(kept)
  return 2 * order + jnp.take_along_axis(full & kept, order, axis=-1).astype(jnp.int32), count


def _pack(ids: TokenIds) -> jax.Array:
  """int32 [B, 4, T]: each token's key rank and its three query bounds, one row each, so a kernel loads a tile's
  mask inputs from one ref and builds the mask with 3 comparisons per entry (mask.visible_by_rank)."""
  return jnp.stack([key_rank(ids), *query_bounds(ids)], axis=1)


# ----------------------------------------------------------------------------
# Kernel helpers (traced inside the kernels; plain jnp, so they also run in interpret mode).


def _key_ranks(ref, rows) -> jax.Array:
  """[1, n]: the key ranks of `rows` of a packed [4, T] ref."""
  return ref[0, rows][None, :]


def _query_bounds(ref, rows) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Three [n, 1]: the query bounds of `rows` of a packed [4, T] ref."""
  return tuple(ref[i, rows][:, None] for i in (1, 2, 3))


def _mm(a: jax.Array, b: jax.Array, precision, trans_a: bool = False, trans_b: bool = False) -> jax.Array:
  """a @ b (optionally transposed operands) accumulated in float32."""
  return plgpu.dot(a, b, trans_a=trans_a, trans_b=trans_b, precision=precision)


def _probs(q, k, visible, lse, scale2: float, precision):
  """Softmax probabilities [bq, bk] of a tile recomputed from the base-2 log-sum-exp; exact zeros where masked.
  visible: (query bounds, key ranks) of the tile, or None for a fully visible tile (no mask)."""
  p = jnp.exp2(_mm(q, k, precision, trans_b=True) * scale2 - lse[:, None])
  if visible is None:
    return p
  q_bounds, k_ranks = visible
  return jnp.where(visible_by_rank(k_ranks, q_bounds), p, 0.0)


def _visit(entry, block: int, tile, carry):
  """Run `tile(rows, masked, carry)` on the tile a visit-list entry names (entry = 2 * tile + full): a fully
  visible tile takes the branch without the mask."""
  rows = pl.ds(pl.multiple_of((entry >> 1) * block, block), block)
  full = (entry & 1) == 1
  return jax.lax.cond(full, lambda c: tile(rows, False, c), lambda c: tile(rows, True, c), carry)


# ----------------------------------------------------------------------------
# Kernels. Grid (tile, batch, head); refs hold one batch element and head.


def _forward_kernel(
  qids_ref, kids_ref, order_ref, count_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, block_k, scale2, precision
):
  """One query tile against its visible key tiles: online softmax, output and base-2 log-sum-exp."""
  i = pl.program_id(0)
  q = q_ref[...]  # [bq, D]
  bq, d = q.shape
  q_tok = _query_bounds(qids_ref, slice(None))

  def tile(rows, masked: bool, carry):
    m, l, acc = carry
    s = _mm(q, k_ref[rows, :], precision, trans_b=True) * scale2
    if masked:
      mask = visible_by_rank(_key_ranks(kids_ref, rows), q_tok)
      s = jnp.where(mask, s, _NEG)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    p = jnp.exp2(s - m_new[:, None])
    if masked:
      p = jnp.where(mask, p, 0.0)  # explicit zeros: a fully masked row stays empty
    fix = jnp.exp2(m - m_new)
    v = v_ref[rows, :]
    return m_new, l * fix + jnp.sum(p, axis=1), acc * fix[:, None] + _mm(p.astype(v.dtype), v, precision)

  def step(t, carry):
    return _visit(order_ref[t], block_k, tile, carry)

  init = (jnp.full((bq,), _NEG, jnp.float32), jnp.zeros((bq,), jnp.float32), jnp.zeros((bq, d), jnp.float32))
  m, l, acc = jax.lax.fori_loop(0, count_ref[i], step, init)
  seen = l > 0
  o_ref[...] = (acc / jnp.where(seen, l, 1.0)[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(seen, m + jnp.log2(jnp.where(seen, l, 1.0)), jnp.inf)  # inf: every probability is 0


def _dkdv_kernel(
  qids_ref,
  kids_ref,
  order_ref,
  count_ref,
  q_ref,
  k_ref,
  v_ref,
  do_ref,
  lse_ref,
  delta_ref,
  dk_ref,
  dv_ref,
  *,
  block_q,
  scale,
  scale2,
  precision,
):
  """One key tile against the query tiles that see it: dv = P^T dO, dk = scale * dS^T Q."""
  j = pl.program_id(0)
  k, v = k_ref[...], v_ref[...]  # [bk, D]
  k_tok = _key_ranks(kids_ref, slice(None))

  def tile(rows, masked: bool, carry):
    dk, dv = carry
    q, do = q_ref[rows, :], do_ref[rows, :]
    visible = _query_bounds(qids_ref, rows), k_tok
    p = _probs(q, k, visible if masked else None, lse_ref[rows], scale2, precision)  # [bq, bk]
    dv = dv + _mm(p.astype(do.dtype), do, precision, trans_a=True)
    ds = p * (_mm(do, v, precision, trans_b=True) - delta_ref[rows][:, None])
    return dk + _mm(ds.astype(q.dtype), q, precision, trans_a=True), dv

  def step(t, carry):
    return _visit(order_ref[t], block_q, tile, carry)

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = jax.lax.fori_loop(0, count_ref[j], step, (zeros, zeros))
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(
  qids_ref,
  kids_ref,
  order_ref,
  count_ref,
  q_ref,
  k_ref,
  v_ref,
  do_ref,
  lse_ref,
  delta_ref,
  dq_ref,
  *,
  block_k,
  scale,
  scale2,
  precision,
):
  """One query tile against its visible key tiles: dq = scale * dS K."""
  i = pl.program_id(0)
  q, do = q_ref[...], do_ref[...]  # [bq, D]
  lse, delta = lse_ref[...], delta_ref[...]
  q_tok = _query_bounds(qids_ref, slice(None))

  def tile(rows, masked: bool, dq):
    k, v = k_ref[rows, :], v_ref[rows, :]
    p = _probs(q, k, (q_tok, _key_ranks(kids_ref, rows)) if masked else None, lse, scale2, precision)
    ds = p * (_mm(do, v, precision, trans_b=True) - delta[:, None])
    return dq + _mm(ds.astype(k.dtype), k, precision)

  def step(t, dq):
    return _visit(order_ref[t], block_k, tile, dq)

  dq = jax.lax.fori_loop(0, count_ref[i], step, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


# ----------------------------------------------------------------------------
# pallas_call wrappers on padded arrays: q [B, Lq, H, D], k/v [B, Lk, H, D], packed ids [B, 4, L].


def _params(d: int):
  return plgpu.CompilerParams(num_warps=4 if d <= 64 else 8, num_stages=2)


def _precision(dtype):
  return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else jax.lax.Precision.DEFAULT


def _specs(b_tile: int, other: int, n_other: int, d: int, n_tiles: int):
  """BlockSpecs shared by the kernels, for grid (tile, batch, head): the tiled side's [tile] blocks and the
  other side's whole rows, which the kernel slices at the tiles its list names."""
  tile = lambda: pl.BlockSpec((None, b_tile, None, d), lambda t, b, h: (b, t, h, 0))  # noqa: E731
  whole = lambda: pl.BlockSpec((None, other, None, d), lambda t, b, h: (b, 0, h, 0))  # noqa: E731
  return dict(
    ids_tile=pl.BlockSpec((None, _FIELDS, b_tile), lambda t, b, h: (b, 0, t)),
    ids_whole=pl.BlockSpec((None, _FIELDS, other), lambda t, b, h: (b, 0, 0)),
    order=pl.BlockSpec((None, None, n_other), lambda t, b, h: (b, t, 0)),
    count=pl.BlockSpec((None, n_tiles), lambda t, b, h: (b, 0)),
    tile=tile,
    whole=whole,
    stat_tile=pl.BlockSpec((None, None, b_tile), lambda t, b, h: (b, h, t)),
    stat_whole=pl.BlockSpec((None, None, other), lambda t, b, h: (b, h, 0)),
  )


def _forward(q, k, v, qids, kids, q_order, q_count, block_q, block_k, scale, interpret):
  b, lq, h, d = q.shape
  lk = k.shape[1]
  nq, nk = lq // block_q, lk // block_k
  s = _specs(block_q, lk, nk, d, nq)
  kernel = functools.partial(_forward_kernel, block_k=block_k, scale2=scale * _LOG2E, precision=_precision(q.dtype))
  return pl.pallas_call(
    kernel,
    grid=(nq, b, h),
    in_specs=[s["ids_tile"], s["ids_whole"], s["order"], s["count"], s["tile"](), s["whole"](), s["whole"]()],
    out_specs=[s["tile"](), s["stat_tile"]],
    out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, lq), jnp.float32)],
    compiler_params=_params(d),
    interpret=interpret,
    name="vgpt_flash_forward",
  )(qids, kids, q_order, q_count, q, k, v)


def _backward(
  q, k, v, qids, kids, q_order, q_count, k_order, k_count, out, lse, do, block_q, block_k, scale, interpret
):
  b, lq, h, d = q.shape
  lk = k.shape[1]
  nq, nk = lq // block_q, lk // block_k
  common = dict(scale=scale, scale2=scale * _LOG2E, precision=_precision(q.dtype))
  # delta_i = sum_d dO_id O_id: the softmax-Jacobian term of every query row, float32 [B, H, Lq].
  delta = jnp.einsum("bqhd,bqhd->bhq", out.astype(jnp.float32), do.astype(jnp.float32))

  kv = _specs(block_k, lq, nq, d, nk)  # tiles over keys, whole query rows
  dk, dv = pl.pallas_call(
    functools.partial(_dkdv_kernel, block_q=block_q, **common),
    grid=(nk, b, h),
    in_specs=[
      kv["ids_whole"],
      kv["ids_tile"],
      kv["order"],
      kv["count"],
      kv["whole"](),
      kv["tile"](),
      kv["tile"](),
      kv["whole"](),
      kv["stat_whole"],
      kv["stat_whole"],
    ],
    out_specs=[kv["tile"](), kv["tile"]()],
    out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
    compiler_params=_params(d),
    interpret=interpret,
    name="vgpt_flash_dkdv",
  )(qids, kids, k_order, k_count, q, k, v, do, lse, delta)

  qs = _specs(block_q, lk, nk, d, nq)  # tiles over queries, whole key rows
  dq = pl.pallas_call(
    functools.partial(_dq_kernel, block_k=block_k, **common),
    grid=(nq, b, h),
    in_specs=[
      qs["ids_tile"],
      qs["ids_whole"],
      qs["order"],
      qs["count"],
      qs["tile"](),
      qs["whole"](),
      qs["whole"](),
      qs["tile"](),
      qs["stat_tile"],
      qs["stat_tile"],
    ],
    out_specs=qs["tile"](),
    out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
    compiler_params=_params(d),
    interpret=interpret,
    name="vgpt_flash_dq",
  )(qids, kids, q_order, q_count, q, k, v, do, lse, delta)
  return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _flash(q, k, v, qids, kids, lists, static, interpret):
  """lists: int32 visit lists (q_order, q_count at the forward tiles; dq_order, dq_count, dkv_order, dkv_count at
  the backward tiles); static: (block_q, block_k, bwd_block_q, bwd_block_k, scale)."""
  return _flash_fwd(q, k, v, qids, kids, lists, static, interpret)[0]


def _flash_fwd(q, k, v, qids, kids, lists, static, interpret):
  block_q, block_k, _, _, scale = static
  out, lse = _forward(q, k, v, qids, kids, lists[0], lists[1], block_q, block_k, scale, interpret)
  return out, (q, k, v, qids, kids, lists, out, lse)


def _flash_bwd(static, interpret, res, do):
  q, k, v, qids, kids, lists, out, lse = res
  _, _, bwd_block_q, bwd_block_k, scale = static
  _, _, dq_order, dq_count, dkv_order, dkv_count = lists
  dq, dk, dv = _backward(
    q, k, v, qids, kids, dq_order, dq_count, dkv_order, dkv_count, out, lse, do, bwd_block_q, bwd_block_k, scale,
    interpret,
  )  # fmt: skip
  return dq, dk, dv, None, None, (None,) * len(lists)  # integer inputs: no cotangent


_flash.defvjp(_flash_fwd, _flash_bwd)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["q_ids", "k_ids", "q_order", "q_count",
                   "dq_order", "dq_count", "dkv_order", "dkv_count"], meta_fields=["q_length", "k_length", "block_q",
                   "block_k", "bwd_block_q", "bwd_block_k"])  # fmt: skip
@dataclasses.dataclass(frozen=True)
class GpuPlan:
  """What the kernels read besides q, k, v; made once per forward pass (`gpu_plan`), used by every layer.

  The backward kernels have their own, smaller tiles: the dk/dv kernel holds two float32 [bk, D] accumulators
  and three float32 [bq, bk] intermediates, which at the forward's 128 x 128 spill registers or run out of
  shared memory."""

  q_ids: jax.Array  # int32 [B, 4, Lq]: packed id fields of the queries, padded to all blocks
  k_ids: jax.Array  # int32 [B, 4, Lk]
  q_order: jax.Array  # int32 [B, nq, nk]: forward tiles: per query tile, its kept key tiles first (2 * tile + full)
  q_count: jax.Array  # int32 [B, nq]
  dq_order: jax.Array  # the same at the backward tiles (the dq kernel)
  dq_count: jax.Array
  dkv_order: jax.Array  # int32 [B, nk', nq']: backward tiles: per key tile, the query tiles that see it (2 * t + full)
  dkv_count: jax.Array  # int32 [B, nk']
  q_length: int  # Tq, Tk before padding
  k_length: int
  block_q: int
  block_k: int
  bwd_block_q: int
  bwd_block_k: int


def gpu_plan(
  q_ids: TokenIds,
  k_ids: TokenIds,
  *,
  block_q: int = 64,
  block_k: int = 64,
  bwd_block_q: int | None = None,
  bwd_block_k: int | None = None,
) -> GpuPlan:
  """The tiles to visit and the packed ids for queries and keys with these ids (blocks: powers of two >= 16;
  bwd_*: the backward kernels' tiles, by default the forward's)."""
  bwd_block_q = block_q if bwd_block_q is None else bwd_block_q
  bwd_block_k = block_k if bwd_block_k is None else bwd_block_k
  blocks = dict(block_q=block_q, block_k=block_k, bwd_block_q=bwd_block_q, bwd_block_k=bwd_block_k)
  for name, block in blocks.items():
    if not isinstance(block, int) or block < 16 or not _is_pow2(block):
      raise ValueError(f"{name}={block!r} must be a power of two >= 16 for Triton tiles, e.g. {name}=64")
  if q_ids.frame.shape[0] != k_ids.frame.shape[0]:
    raise ValueError(f"q_ids and k_ids must share the batch; got {q_ids.frame.shape} and {k_ids.frame.shape}")
  tq, tk = q_ids.frame.shape[1], k_ids.frame.shape[1]
  bq, bk = _block(block_q, tq), _block(block_k, tk)
  bwd_q, bwd_k = _block(bwd_block_q, tq), _block(bwd_block_k, tk)
  # Padded to the larger of each side's forward and backward tiles (powers of two: a multiple of the smaller).
  pq_ids, pk_ids = pad_ids(q_ids, round_up(tq, max(bq, bwd_q))), pad_ids(k_ids, round_up(tk, max(bk, bwd_k)))
  q_order, q_count = _entries(*_tile_maps(pq_ids, pk_ids, bq, bk))  # [B, nq, nk], per batch element
  backward = _tile_maps(pq_ids, pk_ids, bwd_q, bwd_k)  # once for both backward kernels' lists
  dq_order, dq_count = _entries(*backward)
  dkv_order, dkv_count = _entries(*backward, per_key_tile=True)
  return GpuPlan(
    _pack(pq_ids), _pack(pk_ids), q_order, q_count, dq_order, dq_count, dkv_order, dkv_count, tq, tk, bq, bk,
    bwd_q, bwd_k,
  )  # fmt: skip


@functools.partial(jax.jit, static_argnames=("interpret",))
def gpu_attend(q: jax.Array, k: jax.Array, v: jax.Array, plan: GpuPlan, interpret: bool = False) -> jax.Array:
  """Masked softmax attention of q [B, Tq, H, D] over k, v [B, Tk, H, D] as `plan` says; differentiable."""
  _check(q, k, v, plan)
  lq, lk = plan.q_ids.shape[2], plan.k_ids.shape[2]
  d = q.shape[-1]
  dp = max(16, pl.next_power_of_2(d))  # Triton's dot: power-of-two sizes >= 16
  pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, dp - d)))  # noqa: E731
  lists = (plan.q_order, plan.q_count, plan.dq_order, plan.dq_count, plan.dkv_order, plan.dkv_count)
  static = (plan.block_q, plan.block_k, plan.bwd_block_q, plan.bwd_block_k, d**-0.5)
  out = _flash(pad(q, lq), pad(k, lk), pad(v, lk), plan.q_ids, plan.k_ids, lists, static, interpret)
  return out[:, : plan.q_length, :, :d]


def pallas_gpu_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  q_ids: TokenIds,
  k_ids: TokenIds,
  *,
  block_q: int = 64,
  block_k: int = 64,
  bwd_block_q: int | None = None,
  bwd_block_k: int | None = None,
  interpret: bool = False,
) -> jax.Array:
  """Masked softmax attention equal to `dense_attention`, as Pallas GPU kernels; differentiable (custom VJP).

  `gpu_plan` then `gpu_attend` in one call (the model plans once per forward pass instead).

  Args:
    q: [B, Tq, H, D]; k, v: [B, Tk, H, D] (any lengths: padded to the blocks inside).
    q_ids, k_ids: token ids with fields [B, Tq] and [B, Tk]; a new split needs no recompile.
    block_q, block_k: tile sizes, powers of two >= 16 (capped at the padded lengths).
    bwd_block_q, bwd_block_k: the backward kernels' tile sizes (default: the forward's).
    interpret: run the kernels in Pallas interpret mode (any backend: how the CPU tests run them).
  Returns:
    [B, Tq, H, D] in q's dtype; a query that sees no key gives 0.
  Raises:
    ValueError: shapes, dtypes or blocks the Triton kernels cannot take (see the module docstring).
  """
  check_ids_match(q, k, q_ids, k_ids)
  blocks = dict(block_q=block_q, block_k=block_k, bwd_block_q=bwd_block_q, bwd_block_k=bwd_block_k)
  return gpu_attend(q, k, v, gpu_plan(q_ids, k_ids, **blocks), interpret=interpret)
