"""`AttentionPath`: one attention implementation, split into a per-forward plan and a per-layer call."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax

from vgpt_jax.layout import TokenIds

Plan = Any  # a pytree of arrays (and static fields) that one path's `attend` reads


def check_ids_match(q: jax.Array, k: jax.Array, q_ids: TokenIds, k_ids: TokenIds) -> None:
  """The ids' fields the mask reads must be [B, T] of the queries and keys they describe (else a ValueError)."""
  for name, ids, x in (("q_ids", q_ids, q), ("k_ids", k_ids, k)):
    for field in ("frame", "clip", "stream", "kind"):
      shape = getattr(ids, field).shape
      if shape != x.shape[:2]:
        raise ValueError(f"{name}.{field} has shape {shape}, expected (B, T) = {x.shape[:2]} to match the tokens")


def flash_vjp(forward: Callable, backward: Callable) -> Callable[[jax.Array, jax.Array, jax.Array, Plan], jax.Array]:
  """attend(q, k, v, plan) from a flash-style pair: the forward keeps only its output and a log-sum-exp per query.

  forward(q, k, v, plan) -> (out, lse); backward(q, k, v, out, lse, d_out, plan) -> (dq, dk, dv), cast here to
  the inputs' dtypes. The plan is integers and gets no cotangent.
  """

  @jax.custom_vjp
  def attend(q: jax.Array, k: jax.Array, v: jax.Array, plan: Plan) -> jax.Array:
    return forward(q, k, v, plan)[0]

  def attend_fwd(q, k, v, plan):
    out, lse = forward(q, k, v, plan)
    return out, (q, k, v, plan, out, lse)

  def attend_bwd(residuals, d_out):
    q, k, v, plan, out, lse = residuals
    dq, dk, dv = backward(q, k, v, out, lse, d_out, plan)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None

  attend.defvjp(attend_fwd, attend_bwd)
  return attend


@dataclasses.dataclass(frozen=True)
class AttentionPath:
  """`plan(q_ids, k_ids)` once per forward pass (the mask, or the tiles to visit), `attend(q, k, v, plan)` per layer.

  q: [B, Tq, H, D]; k, v: [B, Tk, H, D]; ids with fields [B, Tq] and [B, Tk].
  Calling the path does both (tests, one-off uses).
  """

  name: str
  plan: Callable[[TokenIds, TokenIds], Plan]
  attend: Callable[[jax.Array, jax.Array, jax.Array, Plan], jax.Array]

  def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array, q_ids: TokenIds, k_ids: TokenIds) -> jax.Array:
    return self.attend(q, k, v, self.plan(q_ids, k_ids))
