"""Sharding over a device mesh and multi-process training give the single-device results."""

import subprocess

import ml_collections
import pytest

from tests.conftest import cpu_env, logged_losses, run_python, train_command
from vgpt_jax import parallel


def test_mesh_shape_fills_one_axis_and_refuses_bad_sizes():
  cfg = ml_collections.ConfigDict(dict(data=-1, fsdp=2, tensor=2, context=1))
  assert parallel.mesh_shape(cfg, 8) == (2, 2, 2, 1)
  with pytest.raises(ValueError, match="cannot be split"):
    parallel.mesh_shape(cfg, 6)
  with pytest.raises(ValueError, match="at most one mesh axis"):
    parallel.mesh_shape(ml_collections.ConfigDict(dict(data=-1, fsdp=-1, tensor=1, context=1)), 8)
  with pytest.raises(ValueError, match="needs 4 devices"):
    parallel.mesh_shape(ml_collections.ConfigDict(dict(data=2, fsdp=2, tensor=1, context=1)), 8)


SHARDED_VS_SINGLE = """
import jax, numpy as np
from jax.sharding import PartitionSpec as P
from tests.conftest import mesh_of, small_config, train_steps
from vgpt_jax import trainer

cfg = small_config(**{"train.batch_size": 8, "train.ema_decay": 0.9})
setup = trainer.make_setup(cfg)
videos = [np.asarray(jax.random.uniform(jax.random.key(i), (8, 5, 16, 16, 3), minval=-1, maxval=1)) for i in range(4)]

def run(mesh):
  return train_steps(setup, mesh, trainer.create_state(setup, mesh), videos)

assert len(jax.devices()) == 8
ref, ref_losses = run(mesh_of(1, 1, 1, 1))
state, losses = run(mesh_of(8, 2, 2, 2))
np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
for a, b in zip(jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(jax.device_get(ref.params))):
  np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
for a, b in zip(jax.tree.leaves(jax.device_get(state.ema)), jax.tree.leaves(jax.device_get(ref.ema))):
  np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
# The parameters really are split: a SwiGLU kernel [layers, embed, mlp] over fsdp x tensor.
gate = state.params["decoder"]["layers"]["mlp"]["gate"]["kernel"]
assert gate.sharding.spec == P(None, "fsdp", "tensor"), gate.sharding.spec
assert gate.addressable_shards[0].data.shape == (gate.shape[0], gate.shape[1] // 2, gate.shape[2] // 2)
mu = state.opt_state[1][0].mu["decoder"]["layers"]["mlp"]["gate"]["kernel"]
assert mu.sharding.spec == gate.sharding.spec  # optimizer state sharded like its parameter
print("losses", losses)
"""


def test_sharded_train_step_matches_single_device():
  """(data=2, fsdp=2, tensor=2) on 8 forced CPU devices == 1 device, for several steps, EMA included."""
  out = run_python(SHARDED_VS_SINGLE, devices=8)
  assert "losses" in out


def test_two_processes_train_together_like_one(tmp_path):
  """Two local processes (jax.distributed on 127.0.0.1, gloo) reproduce the one-process losses.

  The parameters are FSDP-sharded across the two processes, so the step and the
  end-of-run sampling both need every host.
  """
  overrides = ["--config.train.steps=6", "--config.train.log_every=1", "--config.train.batch_size=4"]
  sharded = ["--config.mesh.data=1", "--config.mesh.fsdp=2"]
  port = _free_port()
  procs = [
    subprocess.Popen(
      train_command(
        tmp_path / "two",
        *overrides,
        *sharded,
        "--distributed=on",
        f"--coordinator_address=127.0.0.1:{port}",
        "--num_processes=2",
        f"--process_id={i}",
      ),
      env=cpu_env(),
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  outputs = [p.communicate(timeout=300)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), outputs[0][-3000:] + outputs[1][-3000:]
  single = subprocess.run(
    train_command(tmp_path / "one", *overrides), env=cpu_env(), capture_output=True, text=True, timeout=300
  )
  assert single.returncode == 0, single.stderr[-3000:]
  two, one = logged_losses(tmp_path / "two"), logged_losses(tmp_path / "one")
  assert sorted(two) == list(range(1, 7))
  for step in one:
    assert two[step] == pytest.approx(one[step], rel=1e-5)
  # Each process saved its own data-iterator position; only process 0 wrote logs.
  assert (tmp_path / "two" / "sample.png").exists()
  data = {p.name for p in (tmp_path / "two" / "checkpoints" / "6" / "data").iterdir()}
  assert {"process_0-of-2.json", "process_1-of-2.json"} <= data


def _free_port() -> int:
  import portpicker

  return portpicker.pick_unused_port()


CONTEXT_VS_SINGLE = """
import jax, ml_collections, numpy as np
from tests.conftest import mesh_of, small_config, train_steps
from vgpt_jax import parallel, trainer
from vgpt_jax.attention.mask import dense_mask
from vgpt_jax.layout import pad_layout, token_ids

def setup_for(context, attention):
  # 4 tokens per frame: (2*5-1)*6 = 54 tokens, padded to 56 to be dealt in 8 chunks over context=4.
  overrides = {"train.batch_size": 4, "mesh.context": context, "model.attention": attention}
  return trainer.make_setup(small_config(**overrides, **{"model.attention_block": 8}))

videos = [np.asarray(jax.random.uniform(jax.random.key(i), (4, 5, 16, 16, 3), minval=-1, maxval=1)) for i in range(3)]
single = mesh_of(1, 1, 1, 1)
ref_setup = setup_for(1, "dense")
ref, ref_losses = train_steps(ref_setup, single, trainer.create_state(ref_setup, single), videos)
mesh = parallel.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=1, tensor=1, context=4)))
for attention in ("chunked", "dense"):
  setup = setup_for(4, attention)
  assert setup.layout.length == 56
  state, losses = train_steps(setup, mesh, trainer.create_state(setup, mesh), videos)
  np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
  for a, b in zip(jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(jax.device_get(ref.params))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)

# The balanced order gives the 4 devices nearly equal attention work (visible entries of their queries);
# contiguous slices of the training order would not.
split = np.array([[0, 0, 1, 2, 3]])
def work(layout):
  ids = token_ids(layout, split)
  return np.asarray(dense_mask(ids, ids))[0].sum(axis=1).reshape(4, -1).sum(axis=1)
balanced, plain = work(setup.layout), work(pad_layout(ref_setup.layout, 8))
print("work", balanced.tolist(), plain.tolist())
assert balanced.max() / balanced.min() < 1.35 < plain.max() / plain.min()
print("losses", losses)
"""


def test_context_parallel_train_step_matches_single_device():
  """(data=2, context=4) on 8 forced CPU devices == 1 device, chunked and dense attention; balanced work."""
  out = run_python(CONTEXT_VS_SINGLE, devices=8)
  assert "losses" in out
