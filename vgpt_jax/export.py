"""Export a checkpoint's parameters as safetensors + JSON config, loadable without Orbax.

  python -m vgpt_jax.export --workdir=RUN_DIR --out=EXPORT_DIR [--step=N] [--ema]

EXPORT_DIR/model.safetensors holds one float32 tensor per parameter, named by
its path in the Flax tree ("decoder/layers/mlp/gate/kernel"); EXPORT_DIR/config.json
is the run's full config. `load_exported` turns them back into the params tree
that `VideoGPT.apply` takes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from vgpt_jax import checkpoint
from vgpt_jax import run as run_lib

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def host_params_target(run: run_lib.Run) -> Any:
  """Shapes of the run's model parameters, placed on the host CPU (never on an accelerator)."""
  cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
  shapes = run_lib.abstract_params(run)
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=cpu), shapes)


def export(workdir: str | Path, out: str | Path, step: int = -1, ema: bool = False) -> Path:
  """Write `out`/model.safetensors and `out`/config.json from a run's checkpoint."""
  config = checkpoint.saved_config(workdir, step)
  params, step = checkpoint.load_params(workdir, host_params_target(run_lib.make_run(config)), step, ema=ema)
  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)
  flat = traverse_util.flatten_dict(jax.device_get(params), sep="/")
  meta = {"format": "vgpt_jax", "step": str(step), "weights": "ema" if ema else "params"}
  save_file({k: np.ascontiguousarray(v) for k, v in flat.items()}, str(out / WEIGHTS), metadata=meta)
  (out / CONFIG).write_text(config.to_json_best_effort(indent=2))
  return out


def load_exported(path: str | Path) -> tuple[ml_collections.ConfigDict, Any]:
  """(config, params) from an export directory; params are numpy arrays in the model's tree.

  Every parameter the model expects must be present with its shape, and nothing
  else, or a ValueError lists the differences (no partial loads).
  """
  path = Path(path)
  config = ml_collections.ConfigDict(json.loads((path / CONFIG).read_text()))
  params = traverse_util.unflatten_dict(load_file(str(path / WEIGHTS)), sep="/")
  expected = traverse_util.flatten_dict(host_params_target(run_lib.make_run(config)), sep="/")
  found = traverse_util.flatten_dict(params, sep="/")
  problems = [f"missing {k}" for k in expected.keys() - found.keys()]
  problems += [f"unexpected {k}" for k in found.keys() - expected.keys()]
  problems += [
    f"{k}: shape {found[k].shape} != {expected[k].shape}"
    for k in expected.keys() & found.keys()
    if found[k].shape != expected[k].shape
  ]
  if problems:
    raise ValueError(f"{path / WEIGHTS} does not match its config: " + "; ".join(sorted(problems)))
  return config, params


def main(argv: list[str]) -> None:
  del argv
  f = flags.FLAGS
  out = export(f.workdir, f.out, f.step, f.ema)
  print(f"wrote {out / WEIGHTS} and {out / CONFIG}")


if __name__ == "__main__":
  # Defined only when run as a program, so importing this module defines no flags.
  flags.DEFINE_string("workdir", None, "Run directory (or its checkpoints directory).")
  flags.DEFINE_string("out", None, "Export directory to write.")
  flags.DEFINE_integer("step", -1, "Checkpoint step; -1 = newest readable.")
  flags.DEFINE_bool("ema", False, "Export the EMA parameters instead of the raw ones.")
  flags.mark_flags_as_required(["workdir", "out"])
  app.run(main)
