"""Checkpoints that survive preemption: exact resume, SIGTERM, resharding, corruption, export, stage init."""

import json
import signal
import subprocess
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import cpu_env, logged_losses, run_python, small_config, train_command
from vgpt_jax import checkpoint, parallel, trainer
from vgpt_jax.data.pipeline import train_dataset
from vgpt_jax.data.sources import SKIP_REASONS
from vgpt_jax.export import export, load_exported
from vgpt_jax.layout import fixed_split

RESUME = ["--config.train.steps=400", "--config.train.log_every=1", "--config.checkpoint.every_steps=200"]


def _wait_for(predicate, timeout: float, what: str, proc=None) -> None:
  deadline = time.time() + timeout
  while not predicate():
    if proc is not None and proc.poll() is not None:
      raise AssertionError(f"process ended ({proc.returncode}) before {what}: {proc.stdout.read()[-3000:]}")
    assert time.time() < deadline, f"timed out waiting for {what}"
    time.sleep(0.02)


def _committed(workdir: Path, step: int) -> bool:
  return (workdir / "checkpoints" / str(step) / "commit_success.txt").exists()


def test_resume_after_sigkill_continues_the_uninterrupted_run_exactly(tmp_path):
  """Checkpoint at N/2, SIGKILL right after it, restart: the losses after the restart are the uninterrupted ones."""
  full = subprocess.run(
    train_command(tmp_path / "full", *RESUME), env=cpu_env(), capture_output=True, text=True, timeout=300
  )
  assert full.returncode == 0, full.stderr[-3000:]

  run = tmp_path / "killed"
  proc = subprocess.Popen(
    train_command(run, *RESUME), env=cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
  )
  _wait_for(lambda: _committed(run, 200), 300, "the checkpoint at step 200", proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=30)
  assert not _committed(run, 400), "the run finished before it could be killed"
  killed_at = max(logged_losses(run))

  restart = subprocess.run(train_command(run, *RESUME), env=cpu_env(), capture_output=True, text=True, timeout=300)
  assert restart.returncode == 0, restart.stderr[-3000:]
  assert "resuming at step 200" in restart.stderr
  expected, got = logged_losses(tmp_path / "full"), logged_losses(run)
  assert killed_at > 200 and sorted(got) == list(range(1, 401))
  # Bit-identical: same data order, same RNG, same program.
  assert [got[s] for s in range(201, 401)] == [expected[s] for s in range(201, 401)]


def test_sigterm_saves_the_current_step_and_exits_cleanly(tmp_path):
  proc = subprocess.Popen(
    train_command(tmp_path, "--config.train.steps=100000", "--config.train.log_every=1"),
    env=cpu_env(),
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
  metrics = tmp_path / "metrics.jsonl"
  _wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 5, 300, "5 steps", proc)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out[-3000:]
  assert "preempted: saved a checkpoint at step" in out
  last = max(logged_losses(tmp_path))
  steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [last] and _committed(tmp_path, last)
  assert 5 <= last < 100000


RESHARD = """
import jax, numpy as np
from tests.conftest import mesh_of, small_config, train_steps
from vgpt_jax import checkpoint, trainer
from vgpt_jax.data.pipeline import train_dataset

cfg = small_config(**{"train.batch_size": 8})
setup = trainer.make_setup(cfg)
videos = [np.asarray(jax.random.uniform(jax.random.key(i), (8, 5, 16, 16, 3), minval=-1, maxval=1)) for i in range(3)]

def steps(state, mesh, vs):
  return train_steps(setup, mesh, state, vs)

big = mesh_of(8, 2, 2, 2)
state, _ = steps(trainer.create_state(setup, big), big, videos[:2])
data = iter(train_dataset(cfg.data, batch_size=8, seed=0))
with checkpoint.Checkpointer(WORKDIR, cfg.checkpoint) as ckpt:
  ckpt.save(2, state, data, cfg)
_, expected = steps(state, big, videos[2:])

for n, shape in ((1, (1, 1, 1)), (4, (1, 2, 2)), (4, (4, 1, 1))):
  mesh = mesh_of(n, *shape)
  with checkpoint.Checkpointer(WORKDIR, cfg.checkpoint) as ckpt:
    restored, data_ok = ckpt.restore(trainer.sharded_abstract_state(setup, mesh), data)
  assert data_ok and int(restored.step) == 2
  leaf = restored.params["decoder"]["layers"]["mlp"]["gate"]["kernel"]
  assert len(leaf.sharding.device_set) == n
  _, losses = steps(restored, mesh, videos[2:])
  np.testing.assert_allclose(losses, expected, rtol=2e-5)
print("ok")
"""


def test_checkpoint_from_8_devices_restores_on_1_and_4_and_trains_on(tmp_path):
  assert "ok" in run_python(RESHARD.replace("WORKDIR", repr(str(tmp_path))), devices=8)


def _save_steps(workdir: Path, cfg, steps: tuple[int, ...]):
  mesh = parallel.make_mesh(cfg.mesh)
  setup = trainer.make_setup(cfg)
  state = trainer.create_state(setup, mesh)
  step_fn = trainer.compile_train_step(setup, mesh)
  data = iter(train_dataset(cfg.data, batch_size=cfg.train.batch_size, seed=0))
  ckpt = checkpoint.Checkpointer(workdir, cfg.checkpoint)
  states = {}
  for s in range(1, max(steps) + 1):
    state, _ = step_fn(state, jnp.asarray(next(data)["video"]))
    if s in steps:
      ckpt.save(s, state, data, cfg)
      states[s] = jax.device_get(state.params)
  ckpt.close()  # waits for pending saves
  return trainer.sharded_abstract_state(setup, mesh), data, states


def _flip_bytes(directory: Path) -> None:
  for f in directory.rglob("*"):
    if f.is_file() and f.parent.name == "d":
      b = bytearray(f.read_bytes())
      b[len(b) // 2] ^= 0xFF
      f.write_bytes(bytes(b))


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_corrupt_latest_checkpoint_is_reported_and_the_previous_used(tmp_path, damage, caplog):
  cfg = small_config()
  target, data, states = _save_steps(tmp_path, cfg, (2, 4))
  params_dir = tmp_path / "checkpoints" / "4" / "params"
  if damage == "truncate":
    for f in params_dir.rglob("*"):
      if f.is_file() and f.parent.name == "d":
        f.write_bytes(f.read_bytes()[:10])
  elif damage == "flip":
    _flip_bytes(params_dir)
  else:
    (params_dir / "manifest.ocdbt").unlink()
  # A save that never finished (no commit) is not even a candidate.
  (tmp_path / "checkpoints" / "6.orbax-checkpoint-tmp-1").mkdir()
  with caplog.at_level("ERROR"), checkpoint.Checkpointer(tmp_path, cfg.checkpoint) as fresh:
    state, _ = fresh.restore(target, data)
  assert int(state.step) == 2
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), states[2])
  assert any("checkpoints/4 is incomplete or corrupt" in r.getMessage() for r in caplog.records)


def test_all_checkpoints_broken_is_an_error_not_a_fresh_start(tmp_path):
  cfg = small_config()
  target, data, _ = _save_steps(tmp_path, cfg, (2,))
  _flip_bytes(tmp_path / "checkpoints" / "2" / "params")
  with checkpoint.Checkpointer(tmp_path, cfg.checkpoint) as fresh:
    with pytest.raises(checkpoint.CheckpointError, match="none of the 1 checkpoints"):
      fresh.restore(target, data)


def test_keep_last_and_keep_every(tmp_path):
  cfg = small_config(**{"checkpoint.keep_last": 2, "checkpoint.keep_every": 4, "checkpoint.async_save": False})
  _save_steps(tmp_path, cfg, (1, 2, 3, 4, 5, 6, 7))
  kept = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert kept == [4, 6, 7]


def _outputs(config, params) -> np.ndarray:
  setup = trainer.make_setup(config)
  k = jax.random.split(jax.random.key(3), 2)
  h, w, c = setup.latent_shape
  x = jax.random.normal(k[0], (2, 5, h, w, c))
  t = jax.random.uniform(k[1], (2, 5))
  split = jnp.broadcast_to(jnp.asarray(fixed_split((2, 3))), (2, 5))
  return np.asarray(setup.model.apply({"params": params}, x, x, t, split, setup.layout))


def test_export_and_load_round_trip_gives_identical_outputs(tmp_path):
  from vgpt_jax.train import train

  cfg = small_config(**{"train.steps": 3, "train.ema_decay": 0.5})
  train(cfg, tmp_path / "run")
  for ema in (False, True):
    out = export(tmp_path / "run", tmp_path / f"export_{ema}", ema=ema)
    config, params = load_exported(out)
    assert config.model.preset == "test"
    target = trainer.abstract_state(trainer.make_setup(cfg))
    original, step = checkpoint.load_params(tmp_path / "run", target.params, ema=ema)
    assert step == 3
    np.testing.assert_array_equal(_outputs(config, params), _outputs(cfg, original))
  assert json.loads((out / "config.json").read_text())["train"]["ema_decay"] == 0.5
  # A weights file that does not fit its config is refused whole.
  bad = json.loads((out / "config.json").read_text())
  bad["model"]["mlp_dim"] = 48
  (out / "config.json").write_text(json.dumps(bad))
  with pytest.raises(ValueError, match="mlp/gate/kernel: shape"):
    load_exported(out)


def test_stage_init_loads_params_only_with_fresh_optimizer_and_step(tmp_path):
  from vgpt_jax.train import _initial_state, train

  first = small_config(**{"train.steps": 3})
  train(first, tmp_path / "stage1")
  second = small_config(**{"checkpoint.init_from": str(tmp_path / "stage1")})
  setup = trainer.make_setup(second)
  mesh = parallel.make_mesh(second.mesh)
  target = trainer.sharded_abstract_state(setup, mesh)
  state = _initial_state(setup, mesh, target)
  stage1, _ = checkpoint.load_params(tmp_path / "stage1", target.params)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), jax.device_get(stage1))
  assert int(state.step) == 0
  mu = state.opt_state[1][0].mu
  assert all(not np.any(np.asarray(m)) for m in jax.tree.leaves(mu))  # fresh Adam moments
  assert int(state.opt_state[1][0].count) == 0  # fresh schedule


def test_grad_accumulation_ema_and_nonfinite_skip():
  cfg = small_config(**{"train.batch_size": 4})
  video = jax.random.uniform(jax.random.key(0), (4, 5, 16, 16, 3), minval=-1, maxval=1)
  results = {}
  for accum in (1, 2, 4):
    c = small_config(**{"train.batch_size": 4, "train.grad_accum_steps": accum, "train.ema_decay": 0.75})
    setup = trainer.make_setup(c)
    mesh = parallel.make_mesh(c.mesh)
    state0 = trainer.create_state(setup, mesh)
    p0 = jax.device_get(state0.params)
    state, metrics = trainer.compile_train_step(setup, mesh)(state0, video)
    results[accum] = (float(metrics["loss"]), jax.device_get(state.params), jax.device_get(state.ema), p0)
  for accum in (2, 4):  # micro-batches change memory, not the result
    assert results[accum][0] == pytest.approx(results[1][0], rel=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), results[accum][1], results[1][1])
  _, params, ema, p0 = results[1]
  jax.tree.map(lambda e, a, b: np.testing.assert_allclose(e, 0.75 * b + 0.25 * a, rtol=1e-6), ema, params, p0)

  # A non-finite batch: the update is skipped and counted, then training goes on.
  setup = trainer.make_setup(cfg)
  mesh = parallel.make_mesh(cfg.mesh)
  step = trainer.compile_train_step(setup, mesh)
  state = trainer.create_state(setup, mesh)
  before = jax.device_get(state.params)
  state, metrics = step(state, video.at[0, 0, 0, 0, 0].set(jnp.nan))
  assert int(metrics["skipped_steps"]) == 1 and int(state.step) == 1
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), before)
  state, metrics = step(state, video)
  assert int(metrics["skipped_steps"]) == 1 and np.isfinite(float(metrics["loss"]))


def test_train_stops_after_too_many_nonfinite_steps(tmp_path, monkeypatch):
  from vgpt_jax import train as train_module

  def nan_batches(config, seed):
    while True:
      video = np.full((config.train.batch_size, 5, 16, 16, 3), np.nan, np.float32)
      yield {"video": video, "skipped": np.zeros(len(SKIP_REASONS), np.int32)}

  monkeypatch.setattr(train_module, "_data_iterator", nan_batches)
  cfg = small_config(**{"train.steps": 50, "train.max_skipped_steps": 3})
  with pytest.raises(FloatingPointError, match="more than train.max_skipped_steps=3"):
    train_module.train(cfg, tmp_path)
