"""`AttentionPath`: one attention implementation, split into a per-forward plan and a per-layer call."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax

from vgpt_jax.layout import TokenIds

Plan = Any  # a pytree of arrays (and static fields) that one path's `attend` reads


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
