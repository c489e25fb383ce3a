"""Dense attention: the [B, Tq, Tk] mask materialised from ids.

Two functions with one result:
  * `dense_attention` is the reference every other path is tested against:
    a plain masked softmax, differentiated by autodiff;
  * `masked_attention` is what the model's `dense` path runs in every layer,
    on a mask built once per forward pass (`dense_mask`, the path's plan). Its
    backward is written out as in flash attention: the forward keeps the
    log-sum-exp of each query instead of the [B, H, Tq, Tk] probabilities, so
    a scan over layers stacks O(T) residuals per layer, not O(T^2).
O(T^2) memory either way: the default for the short sequences of tiny runs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vgpt_jax.attention.mask import dense_mask
from vgpt_jax.attention.path import flash_vjp
from vgpt_jax.layout import TokenIds

_NEG = float(jnp.finfo(jnp.float32).min)  # masked score
_FLOOR = -1e30  # row-max floor: a row with no visible key gets exp(_NEG - _FLOOR) = 0 everywhere, never inf - inf


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_ids: TokenIds, k_ids: TokenIds) -> jax.Array:
  """The reference masked softmax attention.

  Args:
    q: [B, Tq, H, Dh]; k, v: [B, Tk, H, Dh].
    q_ids, k_ids: token ids with fields [B, Tq] and [B, Tk].
  Returns:
    [B, Tq, H, Dh] in q's dtype. Scores and softmax are computed in float32; a
    query that sees no key (padding) outputs 0.
  """
  scale = q.shape[-1] ** -0.5
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
  mask = dense_mask(q_ids, k_ids)[:, None, :, :]
  probs = jax.nn.softmax(jnp.where(mask, scores, _NEG), axis=-1)
  probs = jnp.where(jnp.any(mask, axis=-1, keepdims=True), probs, 0.0).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, v).astype(q.dtype)


def _forward(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """out [B, Tq, H, D] in q's dtype and lse float32 [B, H, Tq] (+inf for a query that sees nothing)."""
  scale = q.shape[-1] ** -0.5
  s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
  s = jnp.where(mask[:, None], s, _NEG)
  m = jnp.maximum(jnp.max(s, axis=-1), _FLOOR)
  p = jnp.exp(s - m[..., None])
  l = jnp.sum(p, axis=-1)
  seen = l > 0
  out = jnp.einsum("bhqk,bkhd->bqhd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  out = out / jnp.moveaxis(jnp.where(seen, l, 1.0), 1, 2)[..., None]
  lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), jnp.inf)
  return out.astype(q.dtype), lse


def _backward(q, k, v, out, lse, do, mask):
  """float32 gradients of `_forward` w.r.t. q, k, v, recomputing the probabilities from the saved lse."""
  scale = q.shape[-1] ** -0.5
  s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
  p = jnp.exp(jnp.where(mask[:, None], s, _NEG) - lse[..., None])  # [B, H, Tq, Tk]
  dv = jnp.einsum("bhqk,bqhd->bkhd", p.astype(do.dtype), do, preferred_element_type=jnp.float32)
  dp = jnp.einsum("bqhd,bkhd->bhqk", do, v, preferred_element_type=jnp.float32)
  delta = jnp.einsum("bqhd,bqhd->bhq", do.astype(jnp.float32), out.astype(jnp.float32))
  ds = p * (dp - delta[..., None]) * scale
  dq = jnp.einsum("bhqk,bkhd->bqhd", ds.astype(k.dtype), k, preferred_element_type=jnp.float32)
  dk = jnp.einsum("bhqk,bqhd->bkhd", ds.astype(q.dtype), q, preferred_element_type=jnp.float32)
  return dq, dk, dv


_masked = flash_vjp(_forward, _backward)


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """`dense_attention` on a precomputed mask (bool [B, Tq, Tk], `dense_mask`), with a flash-style backward."""
  return _masked(q, k, v, mask)
