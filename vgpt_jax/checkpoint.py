"""Checkpoints of a run: one Orbax CheckpointManager holding the train state, the
Grain iterator state and the config, so a restart continues exactly.

Layout of WORKDIR/checkpoints/STEP/: `params`, `ema` (when kept), `train` (step,
optimizer state, RNG, skip counters), `data` (one JSON per process), `config`,
and `integrity`: a checksum of every saved array and a hash of every process's
data-iterator state and of the config (integrity.py). Params are an item of
their own so sampling, export and stage-to-stage init can read them without
the optimizer state.

Restores are all-or-nothing and verified: every array of the target tree is
read and its checksum recomputed, the data iterator's restored state and the
config are hashed and compared, before the state is used. A checkpoint that
fails (unreadable file, missing manifest, checksum mismatch) is corrupt: it is
moved to checkpoints/corrupt/STEP (never deleted), reported in one line, and
the previous one is tried; training later saves STEP again normally. A
checkpoint of another model (leaf paths or shapes differ) is not corrupt: the
restore stops with an error saying so and moves nothing. Restoring onto another
mesh or device count reshards on read; onto another process count, the data
stream starts a new shuffle (the iterator state is per process).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging as logging_std
import sys
import threading
import traceback
from typing import TYPE_CHECKING, Any, Callable

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from vgpt_jax import integrity
from vgpt_jax.run import abstract_params, make_run

if TYPE_CHECKING:  # only for annotations: sampling reads checkpoints without importing the train step
  from vgpt_jax.train_step import TrainState

CORRUPT_DIR = "corrupt"  # checkpoints found corrupt are moved to checkpoints/corrupt/STEP
WEIGHTS_ONLY = "weights_only"  # integrity-record flag of a checkpoint without train state (`save_weights`)


class CheckpointError(RuntimeError):
  """No usable checkpoint where one was expected; the message says what was tried."""


class CorruptCheckpoint(Exception):
  """This step's files do not read back as saved; the message says what failed."""


class IncompatibleCheckpoint(CheckpointError):
  """The checkpoint holds another model's state (leaf paths or shapes differ); it is not damaged."""


def checkpoint_dir(workdir: str | epath.PathLike) -> epath.Path:
  """A run's checkpoint directory: WORKDIR/checkpoints (or the path itself if it is one).

  Local paths are made absolute (Orbax needs that); gs:// and other URLs pass through.
  """
  path = epath.Path(workdir)
  if "://" not in str(workdir):
    path = path.absolute()
  return path if path.name == "checkpoints" else path / "checkpoints"


def _train_part(state: TrainState) -> dict:
  return {
    "step": state.step,
    "opt_state": state.opt_state,
    "rng": state.rng,
    "skipped": state.skipped,
    "skipped_videos": state.skipped_videos,
  }


def _array_items(state: TrainState) -> dict[str, Any]:
  """The checkpoint items that hold arrays, by item name."""
  items = {"params": state.params, "train": _train_part(state)}
  if state.ema is not None:
    items["ema"] = state.ema
  return items


def _process_digests(value: Any) -> list[str]:
  """Every process's digest of its own `value`, in process order (the same list on every process)."""
  mine = integrity.digest(value)
  if jax.process_count() == 1:
    return [mine]
  gathered = multihost_utils.process_allgather(np.frombuffer(bytes.fromhex(mine), np.uint8))
  return [bytes(row).hex() for row in np.asarray(gathered).reshape(jax.process_count(), -1)]


def _all_hosts_agree(ok: bool) -> bool:
  """True when `ok` holds on every process."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def _is_event_loop_noise(exc: BaseException | None) -> bool:
  return isinstance(exc, RuntimeError) and "Event loop is closed" in str(exc)


def _from_orbax(exc: BaseException | None) -> bool:
  return exc is not None and any("/orbax/" in frame.filename for frame in traceback.extract_tb(exc.__traceback__))


class _DropEventLoopNoise(logging_std.Filter):
  def filter(self, record: logging_std.LogRecord) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    if "Event loop is closed" in record.getMessage() or _is_event_loop_noise(exc):
      return False
    # The other reads of a failed restore end unobserved: asyncio reports each at garbage collection.
    return not ("exception was never retrieved" in record.getMessage() and _from_orbax(exc))


_noise_filter_installed = False


def _drop_event_loop_noise() -> None:
  """A failed OCDBT read leaves TensorStore callbacks that hit Orbax's closed asyncio loop, each printing an
  "Event loop is closed" traceback (dozens per read), and sibling reads whose failures asyncio reports as
  "exception was never retrieved", or Python as "Exception ignored in" a collected coroutine, possibly after
  the read returned. They say nothing the one
  corrupt-checkpoint report does not, so they are dropped for the life of the process; every other
  exception is reported as before."""
  global _noise_filter_installed
  if _noise_filter_installed:
    return
  _noise_filter_installed = True
  previous = sys.unraisablehook

  def unraisable(info) -> None:
    # A sibling read dropped unfinished is reported when its coroutine is collected ("Exception ignored in").
    abandoned_read = inspect.iscoroutine(info.object) and _from_orbax(info.exc_value)
    if not (_is_event_loop_noise(info.exc_value) or abandoned_read):
      previous(info)

  sys.unraisablehook = unraisable
  previous_thread_hook = threading.excepthook

  def thread_hook(args) -> None:
    if not _is_event_loop_noise(args.exc_value):
      previous_thread_hook(args)

  threading.excepthook = thread_hook
  noise = _DropEventLoopNoise()
  for logger in (logging_std.getLogger(), logging_std.getLogger("absl"), logging_std.getLogger("asyncio")):
    logger.addFilter(noise)
    for handler in logger.handlers:
      handler.addFilter(noise)


class Checkpointer:
  """Save and restore one run's checkpoints."""

  def __init__(self, workdir: str | epath.PathLike, ckpt_cfg: ml_collections.ConfigDict):
    self.directory = checkpoint_dir(ckpt_cfg.directory or workdir)
    options = ocp.CheckpointManagerOptions(
      max_to_keep=ckpt_cfg.keep_last,
      keep_period=ckpt_cfg.keep_every or None,
      enable_async_checkpointing=ckpt_cfg.async_save,
      create=True,
    )
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def prepare(self, state: TrainState) -> None:
    """Compile the checksums `save` computes, for trees of `state`'s shapes, now: before the first step, so the
    first save does not stall training (and nothing compiles inside the train loop)."""
    for tree in _array_items(state).values():
      integrity.fingerprint(tree)

  def save(self, step: int, state: TrainState, data_iter: Any, config: ml_collections.ConfigDict) -> None:
    """Start saving `state` (at host-known `step`) with the data iterator's position and their checksums.

    Every process calls it (the checksums are one computation over the global arrays).
    """
    arrays = _array_items(state)
    record = {name: integrity.fingerprint(tree) for name, tree in arrays.items()}
    record["data"] = _process_digests(data_iter.get_state())
    settings = config.to_dict()
    record["config"] = integrity.digest(settings)
    items = {name: ocp.args.StandardSave(tree) for name, tree in arrays.items()}
    items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    items["config"] = ocp.args.JsonSave(settings)
    items["integrity"] = ocp.args.JsonSave(record)
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def restore(self, target: TrainState, data_iter: Any) -> tuple[TrainState, bool] | None:
    """Restore the newest checkpoint that reads back as saved; move corrupt ones aside on the way.

    Args:
      target: the state's abstract tree (jax.ShapeDtypeStruct with the shardings
        wanted now; they may differ from the ones it was saved with).
      data_iter: the Grain iterator; its position is restored in place.
    Returns:
      (state, data_restored) or None if there is no checkpoint. data_restored is
      False when the iterator state cannot apply (saved by another process count).
    Raises:
      IncompatibleCheckpoint if the newest readable checkpoint holds another model;
      CheckpointError if checkpoints exist but none reads back.
    """
    _drop_event_loop_noise()
    steps = sorted(self.all_steps(), reverse=True)
    set_aside = self.directory / CORRUPT_DIR
    if not steps and set_aside.exists():
      logging.warning("no usable checkpoint: starting from scratch (the corrupt ones are in %s)", set_aside)
    errors = []
    for step in steps:
      try:
        restored, problem = self._restore_verified(step, target, data_iter), None
      except IncompatibleCheckpoint:
        raise
      except Exception as e:  # noqa: BLE001 - any failure means "this step is unusable"
        restored, problem = None, f"{type(e).__name__}: {e}".strip()
      if not _all_hosts_agree(problem is None):
        problem = problem or "another process could not read its part"
        errors.append(f"step {step}: {problem.splitlines()[0][:300]}")
        if _has_record(self.directory, step):
          self._set_aside(step, problem)
        else:  # older format: no proof of damage (it may be another version's layout), so it stays
          logging.error("checkpoint %d (older format) could not be read (%s); trying the previous one", step, problem)
        continue
      _assert_same_on_all_hosts(step)
      return restored
    if errors:
      raise CheckpointError(
        f"none of the {len(steps)} checkpoints in {self.directory} could be restored (each was moved to "
        f"{self.directory / CORRUPT_DIR}); a rerun starts from scratch. Errors:\n" + "\n".join(errors)
      )
    return None

  def _restore_verified(self, step: int, target: TrainState, data_iter: Any) -> tuple[TrainState, bool]:
    """Read step `step` into `target` and `data_iter` and check it against its integrity record.

    Raises CorruptCheckpoint (or whatever the read raised) when it does not read back as saved.
    """
    record = _integrity_record(self.manager, self.directory, step)
    if record is not None:
      _check_compatible(record, _array_items(target), self.directory / str(step))
    state = self._restore_state(step, target, legacy=record is None)
    if record is not None:
      _verify(record, _array_items(state))
      _read_config(self.manager, step, record)
    return state, self._restore_data(step, data_iter, record)

  def _restore_state(self, step: int, target: TrainState, legacy: bool = False) -> TrainState:
    """legacy: a checkpoint from before integrity records, which also had no video skip counts (they start at 0)."""
    items = {name: ocp.args.StandardRestore(tree) for name, tree in _array_items(target).items()}
    if legacy:
      items["train"] = ocp.args.StandardRestore({k: v for k, v in _train_part(target).items() if k != "skipped_videos"})
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    train = restored["train"]
    if legacy:
      zeros = np.zeros(target.skipped_videos.shape, target.skipped_videos.dtype)
      train["skipped_videos"] = jax.device_put(zeros, target.skipped_videos.sharding)
    return dataclasses.replace(
      target,
      params=restored["params"],
      ema=restored["ema"] if target.ema is not None else None,
      step=train["step"],
      opt_state=train["opt_state"],
      rng=train["rng"],
      skipped=train["skipped"],
      skipped_videos=train["skipped_videos"],
    )

  def _restore_data(self, step: int, data_iter: Any, record: dict | None) -> bool:
    """Restore the iterator's position; False when it cannot apply here (another process count)."""
    if record is not None and len(record["data"]) != jax.process_count():
      logging.warning(
        "checkpoint %d was saved by %d processes and this run has %d: the data stream restarts from a new shuffle",
        step,
        len(record["data"]),
        jax.process_count(),
      )
      return False
    try:
      self.manager.restore(step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(data_iter)))
    except Exception as e:  # noqa: BLE001
      if record is not None:
        raise CorruptCheckpoint(f"data iterator state unreadable ({type(e).__name__}: {e})") from None
      logging.warning(
        "data iterator state of checkpoint %d not restored (%s); the data stream restarts from a new shuffle", step, e
      )
      return False
    if record is not None and integrity.digest(data_iter.get_state()) != record["data"][jax.process_index()]:
      raise CorruptCheckpoint(f"data iterator state of process {jax.process_index()} does not match its hash")
    return True

  def _set_aside(self, step: int, problem: str) -> None:
    """Move checkpoint `step` to checkpoints/corrupt/ (process 0), so the step can be saved again, and say so."""
    source = self.directory / str(step)
    destination = self.directory / CORRUPT_DIR / str(step)
    if jax.process_index() == 0:
      n = 1
      while destination.exists():
        n += 1
        destination = self.directory / CORRUPT_DIR / f"{step}.{n}"
      try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        source.rename(destination)
      except Exception as e:  # noqa: BLE001 - left in place, saving this step again would fail later
        raise CheckpointError(
          f"checkpoint {source} is corrupt ({problem.splitlines()[0][:300]}) and could not be moved to "
          f"{destination} ({e}); move it away by hand and run again"
        ) from None
      (destination / "WHY_CORRUPT.txt").write_text(problem + "\n")
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"vgpt_jax checkpoint {step} set aside")
    self.manager.reload()
    logging.error(
      "checkpoint %d is corrupt (%s): moved it to %s; trying the previous one",
      step,
      problem.splitlines()[0][:300],
      destination,
    )

  def wait(self) -> None:
    """Block until pending async saves are committed."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def save_weights(workdir: str | epath.PathLike, params: Any, config: ml_collections.ConfigDict, step: int = 0) -> None:
  """A weights-only checkpoint (params, config, integrity record; no optimizer or data state) at `step`.

  What `convert` writes for an imported model: `load_params`, `load_model` (sample, evaluate), `export` and
  `checkpoint.init_from` read it; resuming a run from it is refused with the init_from fix.
  """
  directory = checkpoint_dir(workdir)
  settings = config.to_dict()
  record = {"params": integrity.fingerprint(params), "config": integrity.digest(settings), WEIGHTS_ONLY: True}
  items = {
    "params": ocp.args.StandardSave(params),
    "config": ocp.args.JsonSave(settings),
    "integrity": ocp.args.JsonSave(record),
  }
  with contextlib.closing(ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=True))) as m:
    m.save(step, args=ocp.args.Composite(**items), force=True)
    m.wait_until_finished()


def _has_record(directory: epath.Path, step: int) -> bool:
  return (directory / str(step) / "integrity").exists()


def _integrity_record(manager: ocp.CheckpointManager, directory: epath.Path, step: int) -> dict | None:
  """The step's integrity record; None for a checkpoint written before records existed (read unverified)."""
  if not _has_record(directory, step):
    logging.warning(
      "checkpoint %s/%d has no integrity record (older format): it is read without verification", directory, step
    )
    return None
  try:
    return manager.restore(step, args=ocp.args.Composite(integrity=ocp.args.JsonRestore()))["integrity"]
  except Exception as e:  # noqa: BLE001
    raise CorruptCheckpoint(f"integrity record unreadable ({type(e).__name__}: {e})") from None


def _check_compatible(record: dict, items: dict[str, Any], where: epath.Path) -> None:
  if record.get(WEIGHTS_ONLY) and "train" in items:
    raise IncompatibleCheckpoint(
      f"{where} holds weights only (an imported model: no optimizer or data state to resume); start a run from "
      "them with --config.checkpoint.init_from=<that workdir> and a new --workdir"
    )
  for name, tree in items.items():
    if name not in record:
      raise IncompatibleCheckpoint(
        f"{where} has no {name!r} item (e.g. an EMA asked for by train.ema_decay > 0 that the run did not keep)"
        + _INCOMPATIBLE_FIX
      )
    why = integrity.shape_mismatch(record[name], tree)
    if why:
      raise IncompatibleCheckpoint(f"{where} holds another model's {name}: {why}" + _INCOMPATIBLE_FIX)


_INCOMPATIBLE_FIX = (
  "; the config differs from the one it was saved with (see its config.json). Train in a new --workdir, or start "
  "from its weights with --config.checkpoint.init_from=<that workdir>"
)


def _verify(record: dict, items: dict[str, Any]) -> None:
  """Raise CorruptCheckpoint naming the leaves whose restored checksum differs from the saved one."""
  bad = []
  for name, tree in items.items():
    bad += [f"{name}/{m}" for m in integrity.mismatches(record[name], integrity.fingerprint(tree))]
  if bad:
    raise CorruptCheckpoint(f"{len(bad)} arrays differ from what was saved: " + "; ".join(bad[:3]))


def _assert_same_on_all_hosts(step: int) -> None:
  if jax.process_count() > 1:
    multihost_utils.assert_equal(step, f"hosts restored different checkpoint steps (this host: {step})")


def _read_newest(path: str | epath.PathLike, step: int, what: str, read: Callable[..., Any]) -> tuple[Any, int]:
  """(read(manager, directory, s), s) for the given step, or for the newest s that reads back when step < 0.

  A step that fails is reported and passed over (and left where it is: this reads
  another run); a checkpoint of another model stops the search.
  """
  _drop_event_loop_noise()
  directory = checkpoint_dir(path)
  errors = []
  with contextlib.closing(ocp.CheckpointManager(directory)) as manager:
    steps = sorted(manager.all_steps(), reverse=True) if step < 0 else [step]
    if not steps:
      raise CheckpointError(f"no checkpoints in {directory}: check the path (a workdir or its checkpoints directory)")
    for s in steps:
      try:
        return read(manager, directory, s), s
      except IncompatibleCheckpoint:
        raise
      except Exception as e:  # noqa: BLE001
        errors.append(f"step {s}: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
        logging.error("could not read %s of %s/%d: %s", what, directory, s, errors[-1])
  raise CheckpointError(f"could not read {what} from {directory}:\n" + "\n".join(errors))


def _read_config(manager: ocp.CheckpointManager, step: int, record: dict | None) -> dict:
  """The step's saved config, checked against its hash in `record` (when the checkpoint has one)."""
  config = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
  if record is not None and integrity.digest(config) != record["config"]:
    raise CorruptCheckpoint("the saved config does not match its hash")
  return config


def saved_steps(path: str | epath.PathLike) -> list[int]:
  """The steps saved under a workdir (or its checkpoints directory), oldest first; [] when there are none."""
  directory = checkpoint_dir(path)
  if not directory.exists():
    return []
  with contextlib.closing(ocp.CheckpointManager(directory)) as manager:
    return sorted(manager.all_steps())


def load_params(path: str | epath.PathLike, target: Any, step: int = -1, ema: bool = False) -> tuple[Any, int]:
  """Parameters only (or their EMA) from another run, for stage-to-stage init, export and sampling.

  Verified against the checkpoint's integrity record; a corrupt step is reported
  (and left where it is: this reads another run) and, when step=-1, the previous
  one is tried.

  Args:
    path: a workdir or its checkpoints directory.
    target: abstract params tree (shapes, dtypes and wanted shardings).
    step: which step; -1 for the newest that reads back.
    ema: read the EMA item instead of the raw parameters.
  Returns:
    (params, step).
  """
  item = "ema" if ema else "params"

  def read(manager: ocp.CheckpointManager, directory: epath.Path, s: int) -> Any:
    record = _integrity_record(manager, directory, s)
    if record is not None:
      _check_compatible(record, {item: target}, directory / str(s))
    restored = manager.restore(s, args=ocp.args.Composite(**{item: ocp.args.StandardRestore(target)}))[item]
    if record is not None:
      _verify(record, {item: restored})
    return restored

  return _read_newest(path, step, repr(item), read)


def saved_config(path: str | epath.PathLike, step: int = -1) -> ml_collections.ConfigDict:
  """The config a checkpoint was written with, verified against its hash when the checkpoint has one.

  step=-1: the newest checkpoint whose config reads back (a corrupt newer one is reported and passed over).
  """
  config, _ = _read_newest(
    path,
    step,
    "the config",
    lambda manager, directory, s: _read_config(manager, s, _integrity_record(manager, directory, s)),
  )
  return with_fields_added_since(ml_collections.ConfigDict(config))


# Config fields added after checkpoints were first written, at the values that compute what those runs computed.
FIELDS_ADDED = {
  ("train", "sample_clip_frames"): 0,  # 0: all the generated frames in one clip, as runs before it sampled
  ("model", "remat_save"): (),
  ("model", "rope_scaling"): None,
  ("train", "sample_window"): 0,
  ("train", "sample_guidance"): 1.0,
  ("train", "sample_context_noise"): False,
  ("mesh", "dcn"): {"data": 1, "fsdp": 1, "tensor": 1, "context": 1},
}


def with_fields_added_since(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A saved config with every field of FIELDS_ADDED it lacks, so a run saved by an earlier version still loads."""
  for (section, name), value in FIELDS_ADDED.items():
    if section in config and name not in config[section]:
      config[section][name] = ml_collections.ConfigDict(value) if isinstance(value, dict) else value
  return config


def load_model(path: str | epath.PathLike, step: int = -1, weights: str = "auto") -> tuple[Any, Any, int]:
  """(Setup, params on the default device, step) of a run's checkpoint, for sampling and evaluation.

  weights: "params", "ema", or "auto" (the EMA when the run kept one).
  """

  config = saved_config(path, step)
  if weights == "auto":
    weights = "ema" if config.train.ema_decay > 0 else "params"
  if weights not in ("params", "ema"):
    raise ValueError(f"weights={weights!r}; choose params, ema or auto")
  if weights == "ema" and config.train.ema_decay <= 0:
    raise ValueError(f"{path} was trained without an EMA (train.ema_decay=0); use weights=params")
  run = make_run(config)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  shapes = abstract_params(run)
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), shapes)
  params, step = load_params(path, target, step, ema=weights == "ema")
  return run, params, step
