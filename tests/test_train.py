"""End to end: the main job trains a small model on the physics world and the loss falls."""

import json

import jax
import numpy as np
from PIL import Image

from tests.conftest import small_config
from vgpt_jax import parallel, train_step
from vgpt_jax.run import make_run
from vgpt_jax.train import train


def test_train_job_loss_decreases_and_writes_outputs(tmp_path):
  cfg = small_config(
    **{"train.steps": 60, "train.log_every": 1, "optim.lr": 3e-3, "optim.warmup_steps": 5, "train.ema_decay": 0.9}
  )
  summary = train(cfg, tmp_path)
  assert summary["sample_weights"] == "ema"  # the end-of-run sample uses the weights sample/evaluate default to
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == list(range(1, 61))
  losses = np.array([r["loss"] for r in records])
  assert np.isfinite(losses).all()
  assert losses[-10:].mean() < 0.6 * losses[:10].mean(), losses
  assert summary["loss_last"] < summary["loss_first"]
  assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 60
  for name, frames in (("sample.png", 1), ("sample.gif", cfg.data.num_frames)):
    with Image.open(tmp_path / name) as img:
      assert img.size[0] > 0 and getattr(img, "n_frames", 1) == frames
  assert json.loads((tmp_path / "config.json").read_text())["model"]["preset"] == "test"
  (events,) = (tmp_path / "tensorboard").glob("events.out.tfevents.*")
  scalars = tensorboard_scalars(events)
  np.testing.assert_allclose([v for s, v in scalars["train/loss"]], losses, rtol=1e-6)
  assert [s for s, v in scalars["train/loss"]] == list(range(1, 61))


def tensorboard_scalars(path) -> dict[str, list[tuple[int, float]]]:
  """tag -> [(step, value)] from a TensorBoard event file (TFRecord framing: length, CRC, Event proto, CRC)."""
  import struct

  from tensorboardX.proto.event_pb2 import Event

  data, at, scalars = path.read_bytes(), 0, {}
  while at < len(data):
    (length,) = struct.unpack("<Q", data[at : at + 8])
    event = Event.FromString(data[at + 12 : at + 12 + length])
    at += 12 + length + 4
    for value in event.summary.value:
      scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
  return scalars


def test_train_step_is_deterministic_and_compiles_once(tmp_path):
  """Same seed and batch -> same loss; many steps reuse one executable (random splits included)."""
  cfg = small_config()
  mesh = parallel.make_mesh(cfg.mesh)
  setup = make_run(cfg)
  video = jax.random.uniform(jax.random.key(0), (4, 5, 16, 16, 3), minval=-1, maxval=1)
  losses = []
  for _ in range(2):
    state = train_step.create_state(setup, mesh)
    step = train_step.compile_train_step(setup, mesh)
    run = []
    for _ in range(3):
      state, metrics = step(state, video, train_step.no_skips(4))
      run.append(float(metrics["loss"]))
    losses.append(run)
  assert losses[0] == losses[1]
  assert int(state.step) == 3


def test_benchmark_flop_count_counts_visible_attention_only():
  from vgpt_jax.benchmarks.train_step import model_flops_per_step

  setup = make_run(small_config())
  m, t, b = setup.config.model, setup.layout.length, 2
  matmul = 6 * b * t * m.num_layers * (4 * m.hidden**2 + 3 * m.hidden * m.mlp_dim)
  dense_attention = 3 * b * m.num_layers * 4 * t * t * m.hidden
  flops = model_flops_per_step(setup, b)
  # Somewhere between no attention and dense attention; about half the pairs are masked.
  assert matmul < flops < matmul + 0.6 * dense_attention


def test_the_job_closes_its_data_workers_on_a_normal_end_and_on_an_error(tmp_path):
  """With Grain worker processes (data.worker_count=1), none is left running after the job, whether it ends
  normally or stops on an error mid-run (here: non-finite steps from an absurd learning rate)."""
  import multiprocessing

  import pytest

  train(small_config(**{"data.worker_count": 1, "train.steps": 2}), tmp_path / "normal")
  assert not multiprocessing.active_children()
  exploding = {"data.worker_count": 1, "train.steps": 8, "optim.lr": 1e30, "train.max_skipped_steps": 0}
  with pytest.raises(FloatingPointError, match="non-finite") as caught:
    train(small_config(**exploding), tmp_path / "error")
  # `caught` keeps the traceback, and with it the job's frames and their iterator, alive: the workers must
  # have been stopped by the job itself, not by garbage collection.
  assert caught.traceback and not multiprocessing.active_children()
