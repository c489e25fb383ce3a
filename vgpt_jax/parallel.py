"""Device mesh, laid out on the hardware's topology, and the one table that maps logical axis names to mesh axes.

The mesh comes from JAX's topology-aware builders (`mesh_utils`): on a TPU
slice the axes follow the physical torus; with `mesh.dcn` axes > 1 the mesh is
hybrid, the DCN axes spanning slices (TPU multi-slice) or processes (multi-node
GPU, CPU), so only those axes' collectives cross the slower network.

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
from jax.experimental import mesh_utils
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


def mesh_config(**sizes: int) -> ml_collections.ConfigDict:
  """`config.mesh`: the size of each of MESH_AXES (one may be -1: what the others leave), and `dcn`, how many
  slices or processes each spans (1: the axis stays within a slice). `sizes` overrides, e.g. fsdp=2."""
  cfg = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, context=1))
  cfg.dcn = ml_collections.ConfigDict({a: 1 for a in MESH_AXES})
  cfg.update(sizes)
  return cfg


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


def dcn_shape(mesh_cfg: ml_collections.ConfigDict, shape: tuple[int, ...]) -> tuple[int, ...]:
  """How many slices (or processes) each of MESH_AXES spans; each divides that axis's size in `shape`."""
  dcn = tuple(int(mesh_cfg.dcn[a]) for a in MESH_AXES)
  bad = [f"mesh.dcn.{a}={d}" for a, d, s in zip(MESH_AXES, dcn, shape) if d < 1 or s % d]
  if bad:
    raise ValueError(f"{', '.join(bad)} must be >= 1 and divide the axis size {dict(zip(MESH_AXES, shape))}")
  return dcn


def device_grid(mesh_cfg: ml_collections.ConfigDict, devices: list) -> np.ndarray:
  """The devices arranged as the mesh [data, fsdp, tensor, context], following the hardware topology.

  Without DCN axes: `mesh_utils.create_device_mesh` (the torus order on TPU).
  With them: `mesh_utils.create_hybrid_device_mesh`, one block per slice
  (devices' `slice_index`) or, where devices have none (GPU, CPU), per process.
  """
  shape = mesh_shape(mesh_cfg, len(devices))
  dcn = dcn_shape(mesh_cfg, shape)
  if math.prod(dcn) == 1:
    return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  per_slice = tuple(s // d for s, d in zip(shape, dcn))
  by_process = not hasattr(devices[0], "slice_index")  # only TPU devices know their slice
  granules = {d.process_index if by_process else d.slice_index for d in devices}
  if len(granules) != math.prod(dcn):
    unit = "processes" if by_process else "slices"
    raise ValueError(
      f"mesh.dcn {dict(zip(MESH_AXES, dcn))} spans {math.prod(dcn)} {unit}, but the devices are in {len(granules)}: "
      f"set the mesh.dcn sizes to multiply to {len(granules)}"
    )
  return mesh_utils.create_hybrid_device_mesh(
    per_slice, dcn, devices, process_is_granule=by_process, allow_split_physical_axes=True
  )


def make_mesh(mesh_cfg: ml_collections.ConfigDict, devices: list | None = None) -> Mesh:
  """The mesh of `mesh_cfg` over `devices` (default: all), axes MESH_AXES."""
  return Mesh(device_grid(mesh_cfg, jax.devices() if devices is None else devices), MESH_AXES)


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
