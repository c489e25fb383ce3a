"""The main job: train Video-GPT on the configured data, resuming where it left off.

  python -m vgpt_jax.train --config=configs/tiny.py --workdir=/tmp/vgpt_tiny \
      [--config.train.steps=50 ...] [--distributed=auto|on|off ...]

Writes to WORKDIR (a filesystem path; mount buckets with gcsfuse):
  checkpoints/        Orbax: train state + data iterator + config; the newest
                      readable one is restored on restart (config.checkpoint.directory
                      puts them elsewhere, gs:// included)
  config.json         the resolved config
  metrics.jsonl       one JSON line per logged step (a resumed run appends; the
                      last line for a step wins)
  tensorboard/        the same scalars as TensorBoard event files
  summary.json, loss.png, sample.png, sample.gif   at the end of a finished run
Only process 0 writes logs and media. SIGTERM (preemption) saves a checkpoint
of the current step and exits cleanly (status 0); before the first step, it
exits cleanly with nothing to save.

Before anything compiles, the job checks the config against the machine and
the data (config.preflight: every problem named at once) and restores the
newest checkpoint that verifies (checkpoint.py), so a bad config, unusable
data or unreadable checkpoints stop it in seconds with one clear message.
"""

from __future__ import annotations

if __name__ == "__main__":  # before the heavy imports below: a preemption notice may come while they run
  from vgpt_jax import preemption as _preemption

  _preemption.catch_sigterm()

import contextlib
import dataclasses
import json
import logging as logging_std
import os
import re
import time
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags
from tqdm import tqdm

from vgpt_jax import checkpoint, media, parallel, preemption, train_step
from vgpt_jax import config as config_lib
from vgpt_jax.data.held_out import held_out_clips
from vgpt_jax.data.pipeline import HostSlice, bucket_probabilities, to_uint8, train_dataset
from vgpt_jax.data.sources import SKIP_REASONS, NoUsableVideo
from vgpt_jax.metrics import video as video_metrics
from vgpt_jax.run import Run, bucket_runs, make_run
from vgpt_jax.sampler import Sampler, with_run_defaults


class MetricsLog:
  """JSONL + TensorBoard scalars, written by process 0 only."""

  def __init__(self, workdir: Path, tensorboard: bool):
    main = jax.process_index() == 0
    self._jsonl = open(workdir / "metrics.jsonl", "a") if main else None
    self._tb = None
    if main and tensorboard:
      self._tb = _summary_writer_class()(str(workdir / "tensorboard"))

  def write(self, record: dict) -> None:
    if self._jsonl:
      self._jsonl.write(json.dumps(record) + "\n")
      self._jsonl.flush()
    if self._tb:
      for key, value in record.items():
        if key != "step":
          self._tb.add_scalar(f"train/{key}", value, record["step"])

  def close(self) -> None:
    if self._jsonl:
      self._jsonl.close()
    if self._tb:
      self._tb.close()


def _summary_writer_class():
  """tensorboardX's SummaryWriter, imported with torch hidden: tensorboardX imports torch, when it is installed,
  only to name a type in its hints, which costs 2.4 s of start-up (measured) in every job that logs."""
  import sys

  if "torch" in sys.modules:
    from tensorboardX import SummaryWriter
  else:
    sys.modules["torch"] = None  # `import torch` raises ImportError while this entry is here
    try:
      from tensorboardX import SummaryWriter
    finally:
      del sys.modules["torch"]
  return SummaryWriter


def predict_held_out(run: Run, params, mesh, seed: int, source=None) -> tuple[np.ndarray, np.ndarray]:
  """(truth, prediction) float32 [B, N, H, W, 3]: held-out clips continued from their first frames.

  `source`: the eval source, when already built (the job's preflight built it).
  Every process runs it (the parameters may be sharded across hosts); the
  result is replicated so any host can read it. With pre-encoded latents the
  truth shown is their decoding.
  """
  cfg = run.config
  m, g, sampling = with_run_defaults(cfg, 0, 0, None)  # context frames, frames to generate: the rest
  held_out = held_out_clips(cfg.data, cfg.train.num_samples, source)  # frames, or latents
  sampler = Sampler(run, sampling)

  def generate(p, inputs, key):
    if run.inputs == "latents":
      latents, video = inputs, jnp.clip(run.tokenizer.decode(inputs), -1, 1)
    else:
      latents, video = run.tokenizer.encode(inputs), inputs
    keys = jax.random.split(key, latents.shape[0])
    predicted = run.tokenizer.decode(sampler.rollout(p, latents[:, :m], keys, g))
    return video, jnp.concatenate([video[:, :m], jnp.clip(predicted, -1, 1)], axis=1)

  with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.LOGICAL_RULES):
    generate = jax.jit(generate, out_shardings=parallel.replicated(mesh))
    truth, prediction = generate(params, held_out, jax.random.key(seed))
  return np.asarray(truth), np.asarray(prediction)


SAMPLES_SHOWN = 8  # held-out videos drawn in sample.png / sample.gif (the errors use all train.num_samples)


def sample_errors(truth: np.ndarray, prediction: np.ndarray, context_frames: int) -> dict[str, float]:
  """MSE (pixels in [0, 1]) of the predicted frames, and of the first one next to copying the last context frame.

  truth, prediction: float [B, N, H, W, 3] in [-1, 1]; frames >= context_frames are predicted.
  """
  m = context_frames
  per_frame = video_metrics.mse_per_frame(prediction / 2, truth / 2)  # [B, N]; halved: [-1, 1] -> [0, 1] units
  copy_last = video_metrics.mse_per_frame(truth[:, m - 1 : m] / 2, truth[:, m : m + 1] / 2)
  return {
    "sample_mse": float(per_frame[:, m:].mean()),
    "first_frame_mse": float(per_frame[:, m].mean()),
    "copy_last_first_frame_mse": float(copy_last.mean()),
  }


def write_sample(truth: np.ndarray, prediction: np.ndarray, context_frames: int, workdir: Path) -> dict:
  """Save truth (top) vs context + prediction (below) as sample.png and sample.gif; return the errors."""
  shown = slice(0, SAMPLES_SHOWN)
  truth8, prediction8 = to_uint8(truth[shown]), to_uint8(prediction[shown])
  rows = [row for pair in zip(truth8, prediction8) for row in pair]
  scale = max(1, 128 // truth.shape[2])
  media.save_png(workdir / "sample.png", media.grid_image(rows), scale=scale)
  side_by_side = np.concatenate([truth8, prediction8], axis=3)  # [B, N, H, 2W, 3]
  media.save_gif(workdir / "sample.gif", np.concatenate(list(side_by_side), axis=1), scale=scale)
  return {**sample_errors(truth, prediction, context_frames), "sample_context_frames": context_frames}


def _data_iterator(config: ml_collections.ConfigDict, seed: int, source=None):
  """This process's Grain iterator of {"video" or "latents": [B/processes, F, ...], "skipped": [B/processes, R]}."""
  return iter(
    train_dataset(
      config.data,
      seed,
      HostSlice(config.train.batch_size // jax.process_count(), jax.process_index(), jax.process_count()),
      source=source,
    )
  )


def compile_bucket_steps(run: Run, mesh, buckets: list[int]) -> tuple[dict[int, Any], dict[int, dict]]:
  """The train step compiled ahead of time for each bucket's shape, before the first step, and what each
  costs: {bucket: step}, {bucket: {"shape", "compile_seconds", "memory_gib"}}. Without data.buckets, the one
  step of data.height x data.width. A batch can only be given to its bucket's step: compiled steps never
  compile again."""
  runs = bucket_runs(run)
  steps, report = {}, {}
  for b in buckets:
    shape = runs[b].input_shape(run.config.train.batch_size)
    logging.info("compiling the train step for inputs %s", shape)
    start = time.time()
    steps[b] = train_step.compile_train_step(runs[b], mesh)
    seconds = time.time() - start
    memory = train_step.memory_summary(steps[b])
    logging.info(
      "compiled the train step for %s in %.1fs, per device: %s",
      shape,
      seconds,
      {k: f"{v:.3f} GiB" for k, v in memory.items()},
    )
    report[b] = {"shape": list(shape), "compile_seconds": seconds, "memory_gib": memory}
  return steps, report


def _initial_state(run: Run, mesh, target: train_step.TrainState) -> train_step.TrainState:
  """Fresh state, or stage-to-stage init: another run's parameters with a fresh optimizer and step 0."""
  state = train_step.create_state(run, mesh)
  ck = run.config.checkpoint
  if not ck.init_from:
    return state
  params, step = checkpoint.load_params(ck.init_from, target.params, ck.init_from_step, ema=ck.init_from_ema)
  logging.info("initialised parameters from %s step %d (fresh optimizer, schedule and step)", ck.init_from, step)
  ema = jax.tree.map(jnp.copy, params) if state.ema is not None else None
  return dataclasses.replace(state, params=params, ema=ema)


def _preempted_before_training(phase: str) -> bool:
  """True (and says so) if a single-process job got SIGTERM before its first step: there is nothing to save.

  Multi-process jobs learn of a preemption at the first step's sync point instead (preemption.py).
  """
  if jax.process_count() == 1 and preemption.requested():
    logging.warning("SIGTERM during %s, before the first step: nothing new to save; stopping cleanly", phase)
    return True
  return False


def _skip_counts(counts) -> dict[str, int]:
  return {reason: int(n) for reason, n in zip(SKIP_REASONS, np.asarray(counts))}


def train(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
  """Run (or resume) the job; returns the summary (also in workdir/summary.json when finished).

  Raises config.ConfigError for a config that cannot run here (before anything
  compiles) and checkpoint.CheckpointError when checkpoints exist but none
  restores (before compiling, corrupt ones moved aside).
  """
  if "://" in str(workdir):
    raise config_lib.ConfigError(
      f"--workdir={workdir} must be a filesystem path (mount a bucket with gcsfuse); checkpoints alone can go "
      "to a bucket with --config.checkpoint.directory=gs://..."
    )
  sources = config_lib.preflight(config)
  workdir = Path(workdir)
  is_main = jax.process_index() == 0
  if is_main:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
  excluded = {split: dict(source.excluded) for split, source in sources.items()}
  stopped = {"start_step": None, "end_step": None, "preempted": True, "excluded_videos": excluded["train"]}
  if _preempted_before_training("start-up"):
    return stopped

  mesh = parallel.make_mesh(config.mesh)
  run = make_run(config)
  target = train_step.sharded_abstract_state(run, mesh)
  # Everything opened here is closed on every way out (normal end, preemption, an error): the checkpointer
  # finishes its saves, and the data iterators stop their prefetch threads and worker processes.
  with contextlib.ExitStack() as opened:
    ckpt = opened.enter_context(checkpoint.Checkpointer(workdir, config.checkpoint))
    batches = opened.enter_context(contextlib.closing(_data_iterator(config, config.seed, sources["train"])))
    restored = ckpt.restore(target, batches)
    if restored is None:
      state = _initial_state(run, mesh, target)
    else:
      state, data_restored = restored
      if not data_restored:  # e.g. another process count: new shuffle, never the same batches again
        seed = config.seed + int(state.step)
        batches = opened.enter_context(contextlib.closing(_data_iterator(config, seed, sources["train"])))
    start_step = int(state.step)
    if _preempted_before_training("the restore"):
      return {**stopped, "start_step": start_step, "end_step": start_step}
    drawn = np.flatnonzero(bucket_probabilities(sources["train"], config.data) > 0)  # the buckets batches come in
    step_fns, compiled = compile_bucket_steps(run, mesh, [int(b) for b in drawn])
    ckpt.prepare(state)
    if _preempted_before_training("compilation"):
      return {**stopped, "start_step": start_step, "end_step": start_step}
    summary = _train_loop(config, workdir, run, mesh, ckpt, step_fns, state, batches)
  # The step's memory; with buckets, the largest bucket's (the one that must fit).
  memory = max((r["memory_gib"] for r in compiled.values()), key=lambda m: m.get("total_gib", 0.0))
  summary.update(compiled_memory_gib=memory, excluded_videos=excluded["train"], excluded_eval_videos=excluded["eval"])
  if len(config.data.buckets):
    summary["buckets"] = compiled
  state = summary.pop("state")
  if summary["preempted"]:
    logging.warning("preempted: saved a checkpoint at step %d and stopped", summary["end_step"])
    return summary
  # The weights sample and evaluate take by default: the EMA when the run keeps one.
  weights = "ema" if state.ema is not None else "params"
  truth, prediction = predict_held_out(run, getattr(state, weights), mesh, config.seed, sources["eval"])
  if is_main:
    summary.update(write_sample(truth, prediction, config.train.sample_context_frames, workdir))
    summary["sample_weights"] = weights
    if "loss_first" in summary:
      print(
        f"done: loss {summary['loss_first']:.4f} -> {summary['loss_last']:.4f} in {summary['wall_seconds']:.0f}s; "
        f"held-out first predicted frame MSE {summary['first_frame_mse']:.5f} (copying the last frame: "
        f"{summary['copy_last_first_frame_mse']:.5f}); wrote {workdir}/metrics.jsonl, loss.png, sample.png, sample.gif"
      )
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
  return summary


BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # jax.monitoring's event per XLA compilation
_COMPILES = [0]  # XLA compilations in this process so far (counted once _count_compilations is registered)


def _count_compilations() -> None:
  """Counts every XLA compilation from now on in _COMPILES (registered once per process)."""
  if getattr(_count_compilations, "registered", False):
    return

  def listener(event: str, duration: float, **kwargs) -> None:
    if event == BACKEND_COMPILE_EVENT:
      _COMPILES[0] += 1

  jax.monitoring.register_event_duration_secs_listener(listener)
  _count_compilations.registered = True


def _train_loop(config, workdir: Path, run, mesh, ckpt, step_fns, state, batches) -> dict:
  """Steps from state.step to train.steps (or a preemption), saving checkpoints; the summary, with "state".

  step_fns: the compiled step of each bucket the batches can come in (`compile_bucket_steps`). The summary's
  "compiles_in_loop" counts the XLA compilations while it ran (0 unless something recompiles per step)."""
  is_main = jax.process_index() == 0
  start_step = int(state.step)
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  logging.info(
    "model %s: %.2fM parameters, %d tokens per sample, mesh %s, %s at step %d",
    config.model.preset,
    n_params / 1e6,
    run.layout.length,
    dict(mesh.shape),
    "resuming" if start_step else "starting",
    start_step,
  )
  sharding = parallel.batch_sharding(mesh)
  log = MetricsLog(workdir, config.train.tensorboard)
  watch = preemption.PreemptionWatch()
  history: list[dict] = []  # the record of every step of this session
  pending = None  # (step, device metrics): read one step late so the host never waits
  reported_skips = [int(np.sum(jax.device_get(state.skipped_videos)))]
  _count_compilations()
  compiles_before = _COMPILES[0]
  start = time.time()
  progress = tqdm(
    range(start_step, config.train.steps),
    initial=start_step,
    total=config.train.steps,
    desc="train",
    disable=not is_main,
    dynamic_ncols=True,
  )

  def flush(step: int, metrics: dict) -> None:
    record = {"step": step, **{k: float(v) for k, v in metrics.items()}, "time": time.time() - start}
    history.append(record)
    if record["skipped_steps"] > config.train.max_skipped_steps:
      raise FloatingPointError(
        f"{int(record['skipped_steps'])} steps had a non-finite loss or gradient (last at step {step}), more than "
        f"train.max_skipped_steps={config.train.max_skipped_steps}; lower optim.lr or check the data"
      )
    if step % config.train.log_every == 0 or step == config.train.steps:
      log.write(record)
      progress.set_postfix(loss=f"{record['loss']:.4f}")
      skips = {reason: int(record[f"skipped_{reason}"]) for reason in SKIP_REASONS}
      if sum(skips.values()) > reported_skips[0]:
        reported_skips[0] = sum(skips.values())
        reasons = ", ".join(f"{reason}={n}" for reason, n in skips.items())
        logging.info("replaced %d bad videos so far (all processes): %s", reported_skips[0], reasons)

  profile_first = config.train.profile_start_step  # -1: no trace
  profile_last = profile_first + config.train.profile_steps - 1
  profile = is_main and profile_first >= 0
  tracing = False  # a profiler trace is open
  preempted = False
  try:
    for step in progress:
      if profile and step == profile_first:
        jax.profiler.start_trace(str(workdir / "profile"))
        tracing = True
      batch = next(batches)
      bucket = int(batch["bucket"][0])
      inputs = jax.make_array_from_process_local_data(sharding, batch[run.inputs])
      skipped = jax.make_array_from_process_local_data(sharding, batch["skipped"])
      state, metrics = step_fns[bucket](state, inputs, skipped)
      if pending is not None:
        flush(*pending)
      pending = (step + 1, {**metrics, "bucket": bucket})
      if tracing and step == profile_last:
        jax.profiler.stop_trace()
        tracing = False
      done = step + 1
      preempted = watch.reached(done)
      if preempted or done % config.checkpoint.every_steps == 0 or done == config.train.steps:
        ckpt.save(done, state, batches, config)
      if preempted:
        break
    if pending is not None:
      flush(*pending)
  finally:
    wall = time.time() - start
    if tracing:  # left the loop (preemption, an error) inside the traced steps
      jax.profiler.stop_trace()
    ckpt.wait()
    log.close()
    watch.close()
    progress.close()

  summary = {
    "start_step": start_step,
    "end_step": int(state.step),
    "preempted": preempted,
    "wall_seconds": wall,
    "compiles_in_loop": _COMPILES[0] - compiles_before,
    "skipped_videos": _skip_counts(jax.device_get(state.skipped_videos)),  # all processes, whole run
    "state": state,
  }
  if history:
    losses = np.array([r["loss"] for r in history])
    head = max(1, min(20, len(losses) // 4))
    first_step_seconds = history[0]["time"]  # one step (compiled before the loop)
    summary.update(
      steps=config.train.steps,
      first_step_seconds=first_step_seconds,
      steps_per_second=(len(history) - 1) / max(wall - first_step_seconds, 1e-9),
      loss_first=float(np.mean(losses[:head])),
      loss_last=float(np.mean(losses[-head:])),
      skipped_steps=int(history[-1]["skipped_steps"]),
      parameters=int(n_params),
    )
    if is_main and not preempted:
      steps = np.array([r["step"] for r in history])
      media.save_curve(workdir / "loss.png", steps, losses, "step", "loss", f"{config.model.preset}: training loss")
  return summary


class _QuietLibraries(logging_std.Filter):
  """Drop the INFO chatter of Orbax and Grain (every save logs a dozen lines); keep their warnings."""

  def filter(self, record: logging_std.LogRecord) -> bool:
    noisy = "/orbax/" in record.pathname or "/grain/" in record.pathname
    return record.levelno >= logging_std.WARNING or not noisy


def _define_flags() -> None:
  """Command-line flags; defined only when run as a program, so importing this module defines none."""
  env = os.environ
  config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/tiny.py[:arg].", lock_config=True)
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples.")
  flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"], "on: jax.distributed.initialize (TPU/SLURM auto).")
  flags.DEFINE_string("coordinator_address", env.get("VGPT_COORDINATOR_ADDRESS"), "host:port of process 0.")
  flags.DEFINE_integer("num_processes", int(env.get("VGPT_NUM_PROCESSES", 0)) or None, "Number of processes.")
  flags.DEFINE_integer("process_id", int(env["VGPT_PROCESS_ID"]) if "VGPT_PROCESS_ID" in env else None, "This one.")
  flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
  logging.get_absl_handler().addFilter(_QuietLibraries())
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  parallel.initialize_distributed(f.distributed, f.coordinator_address, f.num_processes, f.process_id)
  try:
    train(f.config, f.workdir)
  except (config_lib.ConfigError, checkpoint.CheckpointError, NoUsableVideo) as e:
    raise SystemExit(f"{type(e).__name__}: {e}") from None


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, with a config-key typo (--config.train.stepz=5) reported in one line instead of a traceback."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:
    text = str(e)
    hint = re.search(r'Did you mean "(\w+)" instead of "(\w+)"', text)
    key = re.search(r"(\w+)", text)
    name = hint.group(2) if hint else key.group(1) if key else "?"
    culprit = next((a.split("=")[0] for a in argv if re.search(rf"\.{re.escape(name)}(\.|=|$)", a.split("=")[0])), name)
    suggestion = f"; did you mean {hint.group(1)!r}?" if hint else "; see the config file for the fields there are"
    raise SystemExit(f"{culprit}: the config has no field {name!r}{suggestion}") from None
  except flags.Error as e:
    raise SystemExit(f"{e}\nTry --help.") from None


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=_parse_flags)
