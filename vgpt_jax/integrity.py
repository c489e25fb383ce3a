"""Checksums of a checkpoint's contents, computed where the arrays live, so a restore can prove it read back
what was saved.

Orbax (0.12, zarr3 over OCDBT) checksums only the shard index, not the array
bytes: a flipped byte in a data file loads silently. So every saved tree gets a
checksum per leaf, recorded in the checkpoint next to it and recomputed after
a restore:

  fingerprint(x) = (sum_i w_i * u_i, sum_i v_i * rotl(u_i ^ w_i, 7))  (mod 2**32)

u = the leaf's bits as uint32 words, i = the element's row-major position,
w_i = 2i + 1 and v_i = i * 0x9E3779B1 | 1 (both odd). Sums modulo 2**32 are
exact and do not depend on order, so the value is the same for any sharding,
mesh or device count (a restore may reshard). They are computed where the
arrays live, in one jitted computation per tree (reductions plus one small
all-reduce), so a save does not copy the state to the host a second time.
Any change to one element changes both sums (odd weights are invertible mod
2**32).
"""

from __future__ import annotations

import functools
import hashlib
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Record = dict[str, dict]  # leaf path -> {"shape": [...], "dtype": str, "sum": [s1, s2]}


def _words(x: jax.Array) -> jax.Array:
  """The leaf's bits as uint32, same shape (16- and 8-bit types widened, 64-bit words folded)."""
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  bits = x.dtype.itemsize * 8
  if bits == 32:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  if bits < 32:
    return jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{bits}")).astype(jnp.uint32)
  pair = jax.lax.bitcast_convert_type(x, jnp.uint32)  # [..., 2]
  return pair[..., 0] ^ (pair[..., 1] * jnp.uint32(0x85EBCA6B))


def _positions(shape: tuple[int, ...]) -> jax.Array:
  """uint32 row-major index (mod 2**32) of every element of `shape`, from iotas: no reshape, so no resharding."""
  index = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(len(shape))):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride % (1 << 32))
    stride *= shape[axis]
  return index


def _leaf_sums(x: jax.Array) -> jax.Array:
  """uint32 [2]: the two position-weighted sums of the module docstring."""
  u = _words(jnp.asarray(x))
  i = _positions(u.shape)
  w = i * jnp.uint32(2) + jnp.uint32(1)
  v = i * jnp.uint32(0x9E3779B1) | jnp.uint32(1)
  mixed = u ^ w
  rotated = (mixed << jnp.uint32(7)) | (mixed >> jnp.uint32(25))
  return jnp.stack([jnp.sum(w * u, dtype=jnp.uint32), jnp.sum(v * rotated, dtype=jnp.uint32)])


@functools.lru_cache(maxsize=None)
def _checksums(out_sharding: Any) -> Any:
  """Jitted [L] leaves -> uint32 [L, 2]; one per output sharding (jit then caches per tree structure and shapes)."""
  return jax.jit(lambda leaves: jnp.stack([_leaf_sums(x) for x in leaves]), out_shardings=out_sharding)


def _path(key_path) -> str:
  return jax.tree_util.keystr(key_path, simple=True, separator="/")


def fingerprint(tree: Any) -> Record:
  """Per-leaf shape, dtype and checksum of a tree of (possibly sharded, multi-host) arrays.

  One jitted computation where the arrays live, compiled once per tree
  structure; every process must call it, and each gets the same record.
  """
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  if not leaves:
    return {}
  paths, arrays = zip(*leaves)
  mesh = getattr(getattr(arrays[0], "sharding", None), "mesh", None)
  replicated = None
  if isinstance(mesh, jax.sharding.Mesh):
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())  # every host can read it
  sums = np.asarray(jax.device_get(_checksums(replicated)(list(arrays))))
  return {
    _path(p): {"shape": list(a.shape), "dtype": str(a.dtype), "sum": [int(x) for x in row]}
    for p, a, row in zip(paths, arrays, sums)
  }


def shape_mismatch(saved: Record, target: Any) -> str | None:
  """What differs between a saved record's leaves and a target tree's (paths, shapes); None if they agree.

  A difference means the checkpoint belongs to another model or code version, not that it is damaged.
  """
  wanted = {_path(p): list(a.shape) for p, a in jax.tree_util.tree_leaves_with_path(target)}
  have = {path: leaf["shape"] for path, leaf in saved.items()}
  missing, extra = sorted(set(wanted) - set(have)), sorted(set(have) - set(wanted))
  if missing or extra:
    return f"leaves missing from the checkpoint: {missing[:5]}; leaves it has that this model lacks: {extra[:5]}"
  for path in sorted(wanted):
    if wanted[path] != have[path]:
      return f"{path} has shape {have[path]} in the checkpoint but {wanted[path]} in this model"
  return None


def mismatches(saved: Record, restored: Record) -> list[str]:
  """Leaves whose restored checksum differs from the saved one (leaves restored to another dtype are not comparable)."""
  bad = []
  for path, leaf in saved.items():
    got = restored.get(path)
    if got is None:
      bad.append(f"{path}: not restored")
    elif got["dtype"] == leaf["dtype"] and got["sum"] != leaf["sum"]:
      bad.append(f"{path}: checksum {got['sum']} != saved {leaf['sum']}")
  return bad


def digest(value: Any) -> str:
  """sha256 of a JSON-able value (canonical: sorted keys), e.g. a data iterator's state or a config."""
  return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()
