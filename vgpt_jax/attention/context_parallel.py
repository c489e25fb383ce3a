"""Context parallelism: a long sequence split over the `context` mesh axis.

Each device keeps its slice of the queries and gathers every key and value
(all-gather over `context`; the backward pass reduce-scatters their
gradients), then runs any attention path on (local queries, all keys), with
a plan made once per forward pass for its own queries. The
activations between layers stay split along the sequence (logical axis
`length` -> `context` in parallel.LOGICAL_RULES), so a device holds 1/c of
every activation but one layer's K/V.

The token order that balances the devices' work is the layout's
(`layout.context_parallel_layout`): each device's queries are a sorted slice.
The gathered keys are put back in (stream, frame) order (`key_order`, once per
forward pass), so key tiles, too, span few frames and tile skipping works as on
one device (attention/accounting.py: `context_parallel_tiles`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from vgpt_jax.attention.path import AttentionPath
from vgpt_jax.layout import TokenIds

AXIS = "context"


def _split(mesh, batch: int, q_length: int, k_length: int) -> tuple[tuple[str, ...], bool]:
  """How a call is split over `mesh`: the batch axes used (none when they do not divide the batch, e.g. the
  one-sample init) and whether the sequence is split over `context` (not when it does not divide the lengths,
  e.g. short sampling calls)."""
  axes = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names)
  if batch % int(np.prod([mesh.shape[a] for a in axes])):
    axes = ()
  c = mesh.shape[AXIS] if AXIS in mesh.axis_names else 1
  return axes, c > 1 and q_length % c == 0 and k_length % c == 0


def _gather(x: jax.Array) -> jax.Array:
  return jax.lax.all_gather(x, AXIS, axis=1, tiled=True)


def key_order(k_ids: TokenIds) -> jax.Array:
  """int32 [Tk]: gathered keys -> (stream, frame) order. Each device's slice is sorted, but their concatenation
  runs through the frames once per device, which would widen every key tile's frame range. Stream and frame
  are the layout's, the same for every sample, so one order serves the batch."""
  return jnp.lexsort((k_ids.frame[0], k_ids.stream[0])).astype(jnp.int32)


def gather_keys(k_ids: TokenIds) -> tuple[TokenIds, jax.Array]:
  """Inside shard_map: every device's key ids, in `key_order`, and that order."""
  k_ids = jax.tree.map(_gather, k_ids)
  order = key_order(k_ids)
  return jax.tree.map(lambda x: x[:, order], k_ids), order


def shard_path(path: AttentionPath) -> AttentionPath:
  """An AttentionPath -> the same path run per device under the mesh in scope (shard_map).

  Batch over data/fsdp and heads over tensor, as the activations are laid
  out; with `context` > 1 the queries stay split along the sequence and the
  keys' ids, K and V are all-gathered. Each device plans for its own queries:
  the plan's arrays get a leading axis of one entry per device, so it stays
  where it was made and `attend` reads it there. Custom kernels (Pallas)
  cannot be partitioned by XLA, so every path runs this way whenever the
  mesh has more than one device.
  """

  def single(mesh) -> bool:
    return mesh.empty or mesh.size == 1

  def plan(q_ids: TokenIds, k_ids: TokenIds):
    mesh = jax.sharding.get_abstract_mesh()
    if single(mesh):
      return path.plan(q_ids, k_ids)
    axes, context = _split(mesh, q_ids.frame.shape[0], q_ids.frame.shape[1], k_ids.frame.shape[1])
    id_spec = P(axes or None, AXIS if context else None)

    def local(q_ids, k_ids):
      if context:
        k_ids, order = gather_keys(k_ids)
        made = (order, path.plan(q_ids, k_ids))
      else:
        made = path.plan(q_ids, k_ids)
      return jax.tree.map(lambda x: x[None], made)

    return jax.shard_map(
      local,
      in_specs=(jax.tree.map(lambda _: id_spec, q_ids), jax.tree.map(lambda _: id_spec, k_ids)),
      out_specs=P(mesh.axis_names),
      check_vma=False,
    )(q_ids, k_ids)

  def attend(q: jax.Array, k: jax.Array, v: jax.Array, made) -> jax.Array:
    mesh = jax.sharding.get_abstract_mesh()
    if single(mesh):
      return path.attend(q, k, v, made)
    axes, context = _split(mesh, q.shape[0], q.shape[1], k.shape[1])
    heads = "tensor" if "tensor" in mesh.axis_names and q.shape[2] % mesh.shape["tensor"] == 0 else None
    x_spec = P(axes or None, AXIS if context else None, heads, None)

    def local(q, k, v, made):
      made = jax.tree.map(lambda x: x[0], made)
      if context:
        order, made = made
        k, v = jnp.take(_gather(k), order, axis=1), jnp.take(_gather(v), order, axis=1)
      return path.attend(q, k, v, made)

    return jax.shard_map(
      local,
      in_specs=(x_spec, x_spec, x_spec, jax.tree.map(lambda _: P(mesh.axis_names), made)),
      out_specs=x_spec,
      check_vma=False,
    )(q, k, v, made)

  return AttentionPath(path.name, plan, attend)
