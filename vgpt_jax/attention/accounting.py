"""What attention costs once masked entries are not paid for: exact visible entries, tiles kept, FLOPs.

Benchmarks use these so FLOPs and MFU count useful work only: a masked entry
is not a FLOP the model needed, whatever a kernel spends on it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from vgpt_jax.attention.chunked import pad_ids, round_up, tile_map
from vgpt_jax.attention.mask import dense_mask
from vgpt_jax.layout import TokenIds


@functools.partial(jax.jit, static_argnames="block")
def visible_count(q_ids: TokenIds, k_ids: TokenIds | None = None, block: int = 1024) -> jax.Array:
  """int32 [B]: (query, key) pairs the mask leaves visible, exactly, in O(block * Tk) memory.

  k_ids defaults to q_ids (a sequence's own mask). The same predicate as every
  attention path (mask.visible), evaluated one query block at a time.
  """
  k_ids = q_ids if k_ids is None else k_ids
  length = round_up(q_ids.frame.shape[1], block)
  q_ids = pad_ids(q_ids, length)  # padding queries see nothing

  def count(i: jax.Array) -> jax.Array:
    ids_i = jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, i * block, block, axis=1), q_ids)
    return jnp.sum(dense_mask(ids_i, k_ids), axis=(1, 2), dtype=jnp.int32)

  return jnp.sum(jax.lax.map(count, jnp.arange(length // block)), axis=0)


def tile_fractions(q_ids: TokenIds, k_ids: TokenIds, block_q: int, block_k: int) -> dict[str, float]:
  """Share of tiles the chunked path runs (any sample needs them) next to the share of visible entries.

  The gap between the two is the work a tiled kernel spends on masked entries
  inside the tiles it keeps.
  """
  tq, tk = q_ids.frame.shape[1], k_ids.frame.shape[1]
  lq, lk = round_up(tq, block_q), round_up(tk, block_k)
  kept = jnp.any(tile_map(pad_ids(q_ids, lq), pad_ids(k_ids, lk), block_q, block_k), axis=0)
  visible = visible_count(q_ids, k_ids)
  return {
    "tiles": int(kept.size),
    "tiles_kept_fraction": float(jnp.mean(kept)),
    "visible_fraction": float(jnp.mean(visible)) / (tq * tk),
  }


def attention_flops(visible: float, head_dim: int, num_heads: int, backward: bool = True) -> float:
  """FLOPs of attention over `visible` entries per sequence: QK^T and PV (2 FLOPs per multiply-add),
  times 3 with the backward pass (which does twice the forward's matmuls)."""
  forward = 2 * 2 * visible * head_dim * num_heads
  return 3 * forward if backward else forward
