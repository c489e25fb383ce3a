"""What attention costs once masked entries are not paid for: exact visible entries, tiles kept, FLOPs.

Benchmarks use these so FLOPs and MFU count useful work only: a masked entry
is not a FLOP the model needed, whatever a kernel spends on it.

  python -m vgpt_jax.attention.accounting [--frames=48,80 --tokens=220 --blocks=128,512 --shards=4]

prints the share of tiles the tiled paths compute on one device and with
context parallelism (mesh.context = shards), at the paper's stage-2 and
stage-4 lengths.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vgpt_jax.attention.chunked import pad_ids, round_up, tile_map
from vgpt_jax.attention.context_parallel import key_order
from vgpt_jax.attention.mask import dense_mask
from vgpt_jax.layout import Layout, TokenIds, context_parallel_layout, sample_splits, token_ids, training_layout


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


def tiles_computed(layout: Layout, split: jax.Array, shards: int, block_q: int, block_k: int) -> float:
  """Share of (query tile, key tile) pairs a tiled kernel computes, per sample, for the splits int32 [B, N].

  shards = 1: one device, `layout`'s queries against its keys. shards > 1: as
  context parallelism runs (attention/context_parallel.py), device i takes the
  i-th contiguous slice of `layout`'s queries against every key in `key_order`;
  pass the layout the model uses then (`layout.context_parallel_layout`).
  """
  ids = token_ids(layout, split)
  keys = ids
  if shards > 1:
    order = key_order(ids)
    keys = jax.tree.map(lambda x: x[:, order], ids)
  local = layout.length // shards
  lk = round_up(layout.length, block_k)
  kept = total = 0
  for i in range(shards):
    queries = jax.tree.map(lambda x: x[:, i * local : (i + 1) * local], ids)
    tiles = np.asarray(tile_map(pad_ids(queries, round_up(local, block_q)), pad_ids(keys, lk), block_q, block_k))
    kept, total = kept + int(tiles.sum()), total + tiles.size
  return kept / total


def context_parallel_tiles(num_frames: int, tokens: int, shards: int, block: int, samples: int = 4) -> dict:
  """Tiles computed on one device and over `shards` context devices, for `samples` random splits (seed 0)."""
  split_cfg = ml_collections.ConfigDict(dict(split="random", min_clips=2, max_clips=-1))
  split = sample_splits(jax.random.key(0), samples, num_frames, split_cfg)
  layout = training_layout(num_frames, tokens)
  single = tiles_computed(layout, split, 1, block, block)
  context = tiles_computed(context_parallel_layout(layout, shards), split, shards, block, block)
  return {"single_device": single, "context": context, "ratio": context / single}


def main(argv: list[str]) -> None:
  from absl import flags

  del argv
  f = flags.FLAGS
  print(f"| frames | tokens | tile | one device | context={f.shards} | ratio |")
  print("|---|---|---|---|---|---|")
  for frames in map(int, f.frames):
    for block in map(int, f.blocks):
      r = context_parallel_tiles(frames, f.tokens, f.shards, block)
      t = training_layout(frames, f.tokens).length
      print(f"| {frames} | {t} | {block} | {r['single_device']:.1%} | {r['context']:.1%} | {r['ratio']:.2f} |")


if __name__ == "__main__":
  from absl import app, flags

  flags.DEFINE_list("frames", ["48", "80"], "Frames per sample (paper stage 2: 48, stage 4: 80).")
  flags.DEFINE_integer("tokens", 220, "Patch tokens per frame (176x320 frames: 11x20 patches).")
  flags.DEFINE_list("blocks", ["128", "512"], "Tile sizes (query and key).")
  flags.DEFINE_integer("shards", 4, "Devices of mesh.context.")
  app.run(main)
