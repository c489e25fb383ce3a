"""The hierarchical block-causal mask of Video-GPT as a predicate on token ids.

`visible(q, k)` answers "may query q attend to key k" for any broadcastable
pair of id arrays, so the same rule serves the dense reference (an L x L
tensor), tiled kernels (one tile at a time) and KV-cached sampling (queries of
one clip against cached keys).

Rules (SPEC section 3), with kinds ordered BOS < TIME < PATCH < EOS:
  * clean q of frame f: clean keys of frames < f, and inside its own frame the
    keys whose kind <= q's kind (<img> sees itself; patches see <img> and every
    patch; </img> sees the whole segment). Never a noisy key.
  * noisy q of clip b: every clean key of clips < b, and inside noisy clip b the
    keys whose kind <= q's kind (<diff> sees the <diff> tokens; TIME sees <diff>
    and TIME tokens; patches see the whole clip). Nothing else.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vgpt_jax.layout import CLEAN, NOISY, TokenIds


def visible(q: TokenIds, k: TokenIds) -> jax.Array:
  """Boolean mask, broadcast over the shapes of q's and k's fields.

  For a dense [B, Tq, Tk] mask call it with q fields [B, Tq, 1] and k fields
  [B, 1, Tk] (see `dense_mask`). Positions are not used.
  """
  within = k.kind <= q.kind
  clean_q = (q.stream == CLEAN) & (k.stream == CLEAN) & ((k.frame < q.frame) | ((k.frame == q.frame) & within))
  noisy_q = (q.stream == NOISY) & (
    ((k.stream == CLEAN) & (k.clip < q.clip)) | ((k.stream == NOISY) & (k.clip == q.clip) & within)
  )
  return clean_q | noisy_q


def dense_mask(q: TokenIds, k: TokenIds) -> jax.Array:
  """bool [B, Tq, Tk] from ids with fields [B, Tq] and [B, Tk]."""
  return visible(
    TokenIds(*(x[:, :, None] for x in (q.frame, q.clip, q.stream, q.kind, q.position))),
    TokenIds(*(x[:, None, :] for x in (k.frame, k.clip, k.stream, k.kind, k.position))),
  )


# The same rule as intervals, for the tiled kernels: each key gets one rank and each query at most two ranges of
# ranks, so a tile's mask costs 3 comparisons per entry (`visible_by_rank`) instead of the ~18 operations of
# `visible`, after O(block) work per tile. Clean keys rank by (clip, frame, kind), noisy keys by (clip, kind)
# above every clean key, padding keys above everything. A clean query sees the clean ranks below its own + 1;
# a noisy query sees the clean ranks of earlier clips and the noisy ranks of its clip up to its kind. Exact
# when clips are contiguous runs of frames, as every split is (layout.py), with fewer than MAX_FRAMES frames.
MAX_FRAMES = 1 << 13  # and clips: clean ranks stay below 2**28, noisy ones below 2**29
_NOISY_BASE = 1 << 28
_NEVER = int(jnp.iinfo(jnp.int32).max)


def key_rank(k: TokenIds) -> jax.Array:
  """int32, k's field shape: each key's rank."""
  clean = (k.clip * MAX_FRAMES + k.frame) * 4 + k.kind
  noisy = _NOISY_BASE + k.clip * 4 + k.kind
  return jnp.where(k.stream == CLEAN, clean, jnp.where(k.stream == NOISY, noisy, _NEVER)).astype(jnp.int32)


def query_bounds(q: TokenIds) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(hi, lo2, hi2), int32, q's field shape: q sees the keys with rank < hi or lo2 <= rank < hi2."""
  clean, noisy = q.stream == CLEAN, q.stream == NOISY
  hi = jnp.where(clean, (q.clip * MAX_FRAMES + q.frame) * 4 + q.kind + 1, jnp.where(noisy, q.clip * MAX_FRAMES * 4, 0))
  lo2 = jnp.where(noisy, _NOISY_BASE + q.clip * 4, 0)
  hi2 = jnp.where(noisy, lo2 + q.kind + 1, 0)
  return hi.astype(jnp.int32), lo2.astype(jnp.int32), hi2.astype(jnp.int32)


def visible_by_rank(rank: jax.Array, bounds: tuple[jax.Array, jax.Array, jax.Array]) -> jax.Array:
  """`visible` from `key_rank` and `query_bounds` (broadcast like `visible`'s fields)."""
  hi, lo2, hi2 = bounds
  return (rank < hi) | ((rank >= lo2) & (rank < hi2))
