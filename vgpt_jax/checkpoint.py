"""Checkpoints of a run: one Orbax CheckpointManager holding the train state, the
Grain iterator state and the config, so a restart continues exactly.

Layout of WORKDIR/checkpoints/STEP/: `params`, `ema` (when kept), `train` (step,
optimizer state, RNG, skip counter), `data` (one JSON per process), `config`.
Params are an item of their own so sampling, export and stage-to-stage init can
read them without the optimizer state.

Restores are all-or-nothing: every array of the target tree is read (Orbax and
TensorStore verify checksums), or that step is reported and the previous one is
tried. Restoring onto another mesh or device count reshards on read.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from vgpt_jax.trainer import TrainState


class CheckpointError(RuntimeError):
  """No usable checkpoint where one was expected; the message says what was tried."""


def checkpoint_dir(workdir: str | epath.PathLike) -> epath.Path:
  """A run's checkpoint directory: WORKDIR/checkpoints (or the path itself if it is one).

  Local paths are made absolute (Orbax needs that); gs:// and other URLs pass through.
  """
  path = epath.Path(workdir)
  if "://" not in str(workdir):
    path = path.absolute()
  return path if path.name == "checkpoints" else path / "checkpoints"


def _train_part(state: TrainState) -> dict:
  return {"step": state.step, "opt_state": state.opt_state, "rng": state.rng, "skipped": state.skipped}


class Checkpointer:
  """Save and restore one run's checkpoints."""

  def __init__(self, workdir: str | epath.PathLike, ckpt_cfg: ml_collections.ConfigDict):
    self.directory = checkpoint_dir(ckpt_cfg.get("directory") or workdir)
    options = ocp.CheckpointManagerOptions(
      max_to_keep=ckpt_cfg.keep_last,
      keep_period=ckpt_cfg.keep_every or None,
      enable_async_checkpointing=ckpt_cfg.async_save,
      create=True,
    )
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def save(self, step: int, state: TrainState, data_iter: Any, config: ml_collections.ConfigDict) -> None:
    """Start saving `state` (at host-known `step`) with the data iterator's position."""
    items = {
      "params": ocp.args.StandardSave(state.params),
      "train": ocp.args.StandardSave(_train_part(state)),
      "data": grain.checkpoint.CheckpointSave(data_iter),
      "config": ocp.args.JsonSave(config.to_dict()),
    }
    if state.ema is not None:
      items["ema"] = ocp.args.StandardSave(state.ema)
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def restore(self, target: TrainState, data_iter: Any) -> tuple[TrainState, bool] | None:
    """Restore the newest checkpoint that reads back completely.

    Args:
      target: the state's abstract tree (jax.ShapeDtypeStruct with the shardings
        wanted now; they may differ from the ones it was saved with).
      data_iter: the Grain iterator; its position is restored in place.
    Returns:
      (state, data_restored) or None if there is no checkpoint. data_restored is
      False when the iterator state cannot be used (another process count).
    Raises:
      CheckpointError if checkpoints exist but none can be read.
    """
    steps = sorted(self.all_steps(), reverse=True)
    errors = []
    for step in steps:
      try:
        state = self._restore_state(step, target)
      except Exception as e:  # noqa: BLE001 - any failure means "this step is unusable"
        message = f"checkpoint {self.directory}/{step} is incomplete or corrupt ({type(e).__name__}: {e})"
        errors.append(message)
        logging.error("%s; trying the previous checkpoint", message[:2000])
        continue
      _assert_same_on_all_hosts(step)
      return state, self._restore_data(step, data_iter)
    if errors:
      raise CheckpointError(
        f"none of the {len(steps)} checkpoints in {self.directory} could be restored; move them away to "
        "start from scratch. Errors:\n" + "\n".join(errors)
      )
    return None

  def _restore_state(self, step: int, target: TrainState) -> TrainState:
    items = {
      "params": ocp.args.StandardRestore(target.params),
      "train": ocp.args.StandardRestore(_train_part(target)),
    }
    if target.ema is not None:
      items["ema"] = ocp.args.StandardRestore(target.ema)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    train = restored["train"]
    return dataclasses.replace(
      target,
      params=restored["params"],
      ema=restored["ema"] if target.ema is not None else None,
      step=train["step"],
      opt_state=train["opt_state"],
      rng=train["rng"],
      skipped=train["skipped"],
    )

  def _restore_data(self, step: int, data_iter: Any) -> bool:
    try:
      self.manager.restore(step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(data_iter)))
      return True
    except Exception as e:  # noqa: BLE001
      logging.warning(
        "data iterator state of checkpoint %d not restored (%s); the data stream restarts from a new shuffle", step, e
      )
      return False

  def wait(self) -> None:
    """Block until pending async saves are committed."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _assert_same_on_all_hosts(step: int) -> None:
  if jax.process_count() > 1:
    multihost_utils.assert_equal(step, f"hosts restored different checkpoint steps (this host: {step})")


def load_params(path: str | epath.PathLike, target: Any, step: int = -1, ema: bool = False) -> tuple[Any, int]:
  """Parameters only (or their EMA) from another run, for stage-to-stage init, export and sampling.

  Args:
    path: a workdir or its checkpoints directory.
    target: abstract params tree (shapes, dtypes and wanted shardings).
    step: which step; -1 for the newest that reads back.
    ema: read the EMA item instead of the raw parameters.
  Returns:
    (params, step).
  """
  directory = checkpoint_dir(path)
  item = "ema" if ema else "params"
  errors = []
  with contextlib.closing(ocp.CheckpointManager(directory)) as manager:
    steps = sorted(manager.all_steps(), reverse=True) if step < 0 else [step]
    if not steps:
      raise CheckpointError(f"no checkpoints in {directory}: check the path (a workdir or its checkpoints directory)")
    for s in steps:
      try:
        restored = manager.restore(s, args=ocp.args.Composite(**{item: ocp.args.StandardRestore(target)}))
        return restored[item], s
      except Exception as e:  # noqa: BLE001
        errors.append(f"step {s}: {type(e).__name__}: {e}")
        logging.error("could not read %s of %s/%d: %s", item, directory, s, e)
  raise CheckpointError(f"could not read {item!r} from {directory}:\n" + "\n".join(errors))


def saved_config(path: str | epath.PathLike, step: int = -1) -> ml_collections.ConfigDict:
  """The config a checkpoint was written with."""
  directory = checkpoint_dir(path)
  with contextlib.closing(ocp.CheckpointManager(directory)) as manager:
    step = manager.latest_step() if step < 0 else step
    if step is None:
      raise CheckpointError(f"no checkpoints in {directory}")
    restored = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
  return ml_collections.ConfigDict(restored["config"])


def load_model(path: str | epath.PathLike, step: int = -1, weights: str = "auto") -> tuple[Any, Any, int]:
  """(Setup, params on the default device, step) of a run's checkpoint, for sampling and evaluation.

  weights: "params", "ema", or "auto" (the EMA when the run kept one).
  """
  from vgpt_jax import trainer

  config = saved_config(path, step)
  if weights == "auto":
    weights = "ema" if config.train.ema_decay > 0 else "params"
  if weights not in ("params", "ema"):
    raise ValueError(f"weights={weights!r}; choose params, ema or auto")
  if weights == "ema" and config.train.ema_decay <= 0:
    raise ValueError(f"{path} was trained without an EMA (train.ema_decay=0); use weights=params")
  setup = trainer.make_setup(config)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  shapes = trainer.abstract_state(setup).params
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), shapes)
  params, step = load_params(path, target, step, ema=weights == "ema")
  return setup, params, step
