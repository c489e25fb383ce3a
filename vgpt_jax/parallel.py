"""Device mesh and the one table that maps logical axis names to mesh axes.

Parameters are annotated with logical names in the model (`embed`, `mlp`,
`heads`, ...); activations with `batch`, `length`, `embed`. Shardings of the
whole train state are derived from an abstract (`jax.eval_shape`) state, so no
device ever holds an unsharded copy.
"""

from __future__ import annotations

import math
import os
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor", "context")

# logical name -> mesh axis (or axes, or None = replicated).
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
  ("batch", ("data", "fsdp")),
  ("length", "context"),
  ("embed", "fsdp"),
  ("embed_out", "tensor"),
  ("mlp", "tensor"),
  ("heads", "tensor"),
  ("kv", None),
  ("layers", None),
  ("norm", None),
  ("freq", None),
  ("patch", None),
  ("special", None),
)


def mesh_shape(mesh_cfg: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
  """Sizes of MESH_AXES; at most one -1, which takes what the others leave."""
  sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
  fill = [i for i, s in enumerate(sizes) if s == -1]
  if len(fill) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  fixed = math.prod(s for s in sizes if s != -1)
  if fill:
    if num_devices % fixed:
      raise ValueError(f"{num_devices} devices cannot be split by the fixed mesh axes {dict(zip(MESH_AXES, sizes))}")
    sizes[fill[0]] = num_devices // fixed
  if math.prod(sizes) != num_devices:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, have {num_devices}")
  return tuple(sizes)


def make_mesh(mesh_cfg: ml_collections.ConfigDict, devices: list | None = None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_cfg, len(devices))
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def logical_shardings(abstract_tree: Any, mesh: Mesh) -> Any:
  """NamedShardings for a tree whose leaves may be boxed with logical axis names."""
  specs = nn.get_partition_spec(abstract_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, LOGICAL_RULES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over data and fsdp; the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def initialize_distributed(
  mode: str, coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> None:
  """Join the other processes of a multi-process job (before any other JAX call).

  mode: "off" never; "on" always (TPU pods and SLURM are auto-detected when the
  three values are None); "auto" when the values are given or SLURM/TPU shows
  more than one process. CPU processes talk through gloo collectives.
  """
  if mode not in ("auto", "on", "off"):
    raise ValueError(f"--distributed={mode!r}; choose auto, on or off")
  explicit = coordinator_address is not None
  if mode == "off" or (mode == "auto" and not explicit and not _cluster_has_many_processes()):
    return
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address, num_processes, process_id)


def _cluster_has_many_processes() -> bool:
  env = os.environ
  if int(env.get("SLURM_NTASKS", "1")) > 1:
    return True
  return "," in env.get("TPU_WORKER_HOSTNAMES", "")
