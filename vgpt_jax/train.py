"""The main job: train Video-GPT on the configured data.

  python -m vgpt_jax.train --config=configs/tiny.py --workdir=/tmp/vgpt_tiny \
      [--config.train.steps=50 ...]

Writes to WORKDIR: config.json, metrics.jsonl (one line per logged step),
summary.json, loss.png, and at the end sample.png / sample.gif (the truth
above the context followed by predicted frames).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags
from tqdm import tqdm

from vgpt_jax import config as config_lib
from vgpt_jax import media, parallel, trainer
from vgpt_jax.data.pipeline import eval_videos, to_uint8, train_dataset
from vgpt_jax.sample import predict_clip

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/tiny.py[:arg].", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for metrics, samples (and later checkpoints).")


class MetricsWriter:
  """Appends one JSON object per line; only process 0 writes."""

  def __init__(self, path: Path):
    self._file = open(path, "a") if jax.process_index() == 0 else None

  def write(self, record: dict) -> None:
    if self._file:
      self._file.write(json.dumps(record) + "\n")
      self._file.flush()

  def close(self) -> None:
    if self._file:
      self._file.close()


def write_sample(setup: trainer.Setup, params, workdir: Path, seed: int) -> dict:
  """Predict held-out clips from their first frames; save truth vs prediction as PNG and GIF."""
  cfg = setup.config
  m = cfg.train.sample_context_frames
  truth = jnp.asarray(eval_videos(cfg.data, cfg.train.num_samples))  # [B, N, H, W, 3]
  latents = setup.tokenizer.encode(truth)
  generate = jax.jit(lambda p, ctx, key: predict_clip(setup, p, ctx, key, cfg.train.sample_steps))
  predicted = setup.tokenizer.decode(generate(params, latents[:, :m], jax.random.key(seed)))
  prediction = jnp.concatenate([truth[:, :m], jnp.clip(predicted, -1, 1)], axis=1)
  mse = float(jnp.mean(jnp.square(prediction[:, m:] - truth[:, m:])))
  rows = []
  for i in range(truth.shape[0]):
    rows += [to_uint8(np.asarray(truth[i])), to_uint8(np.asarray(prediction[i]))]
  scale = max(1, 128 // truth.shape[2])
  media.save_png(workdir / "sample.png", media.grid_image(rows), scale=scale)
  side_by_side = np.concatenate([to_uint8(np.asarray(truth)), to_uint8(np.asarray(prediction))], axis=3)
  media.save_gif(workdir / "sample.gif", np.concatenate(list(side_by_side), axis=1), scale=scale)
  return {"sample_mse": mse, "sample_context_frames": m}


def train(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
  """Run the job; returns the summary it also writes to workdir/summary.json."""
  config_lib.validate(config)
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  is_main = jax.process_index() == 0
  if is_main:
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))

  mesh = parallel.make_mesh(config.mesh)
  setup = trainer.make_setup(config)
  state = trainer.create_state(setup, mesh)
  step_fn = trainer.compile_train_step(setup, mesh)
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  logging.info(
    "model %s: %.2fM parameters, %d tokens per sample, mesh %s",
    config.model.preset,
    n_params / 1e6,
    setup.layout.length,
    dict(mesh.shape),
  )

  batches = iter(
    train_dataset(
      config.data,
      batch_size=config.train.batch_size // jax.process_count(),
      seed=config.seed,
      shard_index=jax.process_index(),
      shard_count=jax.process_count(),
    )
  )
  sharding = parallel.batch_sharding(mesh)
  writer = MetricsWriter(workdir / "metrics.jsonl")
  history: list[dict] = []  # the record of every step
  pending = None  # (step, device metrics): read one step late so the host never waits
  start = time.time()
  progress = tqdm(range(config.train.steps), desc="train", disable=not is_main, dynamic_ncols=True)

  def flush(step: int, metrics: dict) -> None:
    record = {"step": step, **{k: float(v) for k, v in metrics.items()}, "time": time.time() - start}
    history.append(record)
    if not np.isfinite(record["loss"]):
      raise FloatingPointError(f"loss became {record['loss']} at step {step}; lower optim.lr or check the data")
    if step % config.train.log_every == 0 or step == config.train.steps:
      writer.write(record)
      progress.set_postfix(loss=f"{record['loss']:.4f}")

  for step in progress:
    video = jax.make_array_from_process_local_data(sharding, next(batches)["video"])
    state, metrics = step_fn(state, video)
    if pending is not None:
      flush(*pending)
    pending = (step + 1, metrics)
  flush(*pending)
  wall = time.time() - start
  writer.close()

  steps = np.array([r["step"] for r in history])
  losses = np.array([r["loss"] for r in history])
  first_step_seconds = history[0]["time"]  # compilation + one step
  head = min(20, len(losses))
  summary = {
    "steps": config.train.steps,
    "wall_seconds": wall,
    "first_step_seconds": first_step_seconds,
    "steps_per_second": (config.train.steps - 1) / max(wall - first_step_seconds, 1e-9),
    "loss_first": float(np.mean(losses[:head])),
    "loss_last": float(np.mean(losses[-head:])),
    "parameters": int(n_params),
  }
  if is_main:
    summary.update(write_sample(setup, state.params, workdir, config.seed))
    media.save_curve(workdir / "loss.png", steps, losses, "step", "loss", f"{config.model.preset}: training loss")
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(
      f"done: loss {summary['loss_first']:.4f} -> {summary['loss_last']:.4f} (mean of first/last {head} steps) "
      f"in {wall:.0f}s; wrote {workdir}/metrics.jsonl, loss.png, sample.png, sample.gif"
    )
  return summary


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _WORKDIR.value is None:
    raise app.UsageError("--workdir is required")
  try:
    train(_CONFIG.value, _WORKDIR.value)
  except config_lib.ConfigError as e:
    raise SystemExit(str(e)) from None


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main)
