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
