"""Dense reference attention: materialises the [B, Tq, Tk] mask from ids.

O(T^2) memory; it is the ground truth the fast paths are tested against and
the default for the short sequences of tiny runs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vgpt_jax.attention.mask import dense_mask
from vgpt_jax.layout import TokenIds


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_ids: TokenIds, k_ids: TokenIds) -> jax.Array:
  """Masked softmax attention.

  Args:
    q: [B, Tq, H, Dh]; k, v: [B, Tk, H, Dh].
    q_ids, k_ids: token ids with fields [B, Tq] and [B, Tk].
  Returns:
    [B, Tq, H, Dh] in q's dtype. Scores and softmax are computed in float32.
  """
  scale = q.shape[-1] ** -0.5
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
  mask = dense_mask(q_ids, k_ids)[:, None, :, :]
  # Every query sees at least itself, so no row is fully masked.
  scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, v).astype(q.dtype)
