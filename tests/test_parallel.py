"""Sharding over a device mesh and multi-process training give the single-device results; a checkpoint saved on
8 devices restores on other meshes; checksums do not depend on the sharding."""

import json

import pytest

from tests.conftest import TRAINED_RUN, logged_losses, run_python, train_processes
from vgpt_jax import parallel


def test_mesh_shape_fills_one_axis_and_refuses_bad_sizes():
  cfg = parallel.mesh_config(fsdp=2, tensor=2)
  assert parallel.mesh_shape(cfg, 8) == (2, 2, 2, 1)
  with pytest.raises(ValueError, match="cannot be split"):
    parallel.mesh_shape(cfg, 6)
  with pytest.raises(ValueError, match="at most one mesh axis"):
    parallel.mesh_shape(parallel.mesh_config(fsdp=-1), 8)
  with pytest.raises(ValueError, match="needs 4 devices"):
    parallel.mesh_shape(parallel.mesh_config(data=2, fsdp=2), 8)


SHARDED_VS_SINGLE = """
import jax, numpy as np
from jax.sharding import PartitionSpec as P
from tests.conftest import mesh_of, small_config, train_steps
from vgpt_jax import train_step
from vgpt_jax.run import make_run

cfg = small_config(**{"train.batch_size": 8, "train.ema_decay": 0.9})
setup = make_run(cfg)
videos = [np.asarray(jax.random.uniform(jax.random.key(i), (8, 5, 16, 16, 3), minval=-1, maxval=1)) for i in range(4)]

def run(mesh):
  return train_steps(setup, mesh, train_step.create_state(setup, mesh), videos)

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

# The mesh is laid out by JAX's topology-aware builder.
from jax.experimental import mesh_utils
from vgpt_jax import parallel
assert (mesh_of(8, 2, 2, 2).devices == mesh_utils.create_device_mesh((2, 2, 2, 1), jax.devices())).all()

# A hybrid mesh over 2 fake slices (TPU devices know their slice_index; these CPU devices are dealt to
# slices 0, 1, 0, 1, ...): the data axis crosses the slices, fsdp stays within one, and a step on it
# equals 1 device.
class SliceDevice:
  def __init__(self, device, slice_index):
    self.device, self.slice_index = device, slice_index
  def __getattr__(self, name):
    return getattr(self.device, name)

fake = [SliceDevice(d, i % 2) for i, d in enumerate(jax.devices())]
grid = parallel.device_grid(parallel.mesh_config(data=2, fsdp=4, dcn={"data": 2}), fake)
assert grid.shape == (2, 4, 1, 1)
assert [{d.slice_index for d in row.reshape(-1)} for row in grid] == [{0}, {1}], grid
hybrid = jax.sharding.Mesh(np.vectorize(lambda d: d.device, otypes=[object])(grid), parallel.MESH_AXES)
state, losses = run(hybrid)
np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
for a, b in zip(jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(jax.device_get(ref.params))):
  np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
# One process cannot be two slices of a hybrid mesh: refused by name.
try:
  parallel.make_mesh(parallel.mesh_config(dcn={"data": 2}))
  raise AssertionError("a 2-slice mesh on 1 process was accepted")
except ValueError as e:
  assert "spans 2 processes, but the devices are in 1" in str(e), e
print("hybrid losses", losses)
"""


def test_sharded_train_step_matches_single_device(on_8_devices):
  """(data=2, fsdp=2, tensor=2) on 8 forced CPU devices == 1 device, for several steps, EMA included; the mesh
  follows mesh_utils' device order, and a hybrid mesh over 2 fake slices also equals 1 device."""
  assert "hybrid losses" in on_8_devices("sharded")


def test_two_processes_train_together_like_one(tmp_path, trained_run):
  """Two local processes (jax.distributed on 127.0.0.1, gloo) reproduce the one-process losses of `trained_run`.

  The parameters are FSDP-sharded across the two processes, so the step and the
  end-of-run sampling both need every host.
  """
  sharded = ["--config.mesh.data=1", "--config.mesh.fsdp=2"]
  done = train_processes(tmp_path / "two", *TRAINED_RUN, *sharded)
  assert all(status == 0 for status, _ in done), done[0][1][-3000:] + done[1][1][-3000:]
  two, one = logged_losses(tmp_path / "two"), logged_losses(trained_run)
  assert sorted(two) == sorted(one) == list(range(1, 7))
  for step in one:
    assert two[step] == pytest.approx(one[step], rel=1e-5)
  # Each process saved its own data-iterator position; only process 0 wrote logs.
  assert (tmp_path / "two" / "sample.png").exists()
  data = {p.name for p in (tmp_path / "two" / "checkpoints" / "6" / "data").iterdir()}
  assert {"process_0-of-2.json", "process_1-of-2.json"} <= data


CONTEXT_VS_SINGLE = """
import jax, ml_collections, numpy as np
from tests.conftest import mesh_of, small_config, train_steps
from vgpt_jax import parallel, train_step
from vgpt_jax.attention.mask import dense_mask
from vgpt_jax.layout import pad_layout, token_ids
from vgpt_jax.run import make_run

def setup_for(context, attention):
  # 4 tokens per frame: (2*5-1)*6 = 54 tokens, padded to 56 to be dealt in 8 chunks over context=4.
  overrides = {"train.batch_size": 4, "mesh.context": context, "model.attention": attention}
  return make_run(small_config(**overrides, **{"model.attention_block": 8}))

videos = [np.asarray(jax.random.uniform(jax.random.key(i), (4, 5, 16, 16, 3), minval=-1, maxval=1)) for i in range(3)]
single = mesh_of(1, 1, 1, 1)
ref_setup = setup_for(1, "dense")
ref, ref_losses = train_steps(ref_setup, single, train_step.create_state(ref_setup, single), videos)
mesh = parallel.make_mesh(parallel.mesh_config(data=2, context=4))
for attention in ("chunked", "dense"):
  setup = setup_for(4, attention)
  assert setup.layout.length == 56
  state, losses = train_steps(setup, mesh, train_step.create_state(setup, mesh), videos)
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


def test_context_parallel_train_step_matches_single_device(on_8_devices):
  """(data=2, context=4) on 8 forced CPU devices == 1 device, chunked and dense attention; balanced work."""
  assert "losses" in on_8_devices("context")


RESHARD = """
import jax, numpy as np
from tests.conftest import mesh_of, small_config, train_steps
from vgpt_jax import checkpoint, train_step
from vgpt_jax.run import make_run
from vgpt_jax.data.pipeline import HostSlice, train_dataset

# The config and videos of test_parallel's SHARDED_VS_SINGLE (an EMA too), so its compiled steps are reused.
cfg = small_config(**{"train.batch_size": 8, "train.ema_decay": 0.9})
setup = make_run(cfg)
videos = [np.asarray(jax.random.uniform(jax.random.key(i), (8, 5, 16, 16, 3), minval=-1, maxval=1)) for i in range(3)]

def steps(state, mesh, vs):
  return train_steps(setup, mesh, state, vs)

big = mesh_of(8, 2, 2, 2)
state, _ = steps(train_step.create_state(setup, big), big, videos[:2])
data = iter(train_dataset(cfg.data, 0, HostSlice(8)))
with checkpoint.Checkpointer(workdir, cfg.checkpoint) as ckpt:
  ckpt.save(2, state, data, cfg)
saved = jax.tree.leaves(jax.device_get(state))  # before the next step donates the state's buffers
_, expected = steps(state, big, videos[2:])

for n, shape in ((1, (1, 1, 1)), (4, (1, 2, 2)), (4, (4, 1, 1))):
  mesh = mesh_of(n, *shape)
  with checkpoint.Checkpointer(workdir, cfg.checkpoint) as ckpt:
    restored, data_ok = ckpt.restore(train_step.sharded_abstract_state(setup, mesh), data)
  assert data_ok and int(restored.step) == 2
  leaf = restored.params["decoder"]["layers"]["mlp"]["gate"]["kernel"]
  assert len(leaf.sharding.device_set) == n
  for a, b in zip(jax.tree.leaves(jax.device_get(restored)), saved, strict=True):
    np.testing.assert_array_equal(a, b)  # every array of the state, EMA and optimizer included, bit for bit
  _, losses = steps(restored, mesh, videos[2:])
  np.testing.assert_allclose(losses, expected, rtol=2e-5)
print("ok")
"""


def test_checkpoint_from_8_devices_restores_on_1_and_4_and_trains_on(on_8_devices):
  assert "ok" in on_8_devices("reshard")


CHECKSUMS = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from vgpt_jax import integrity
from vgpt_jax.run import make_run
mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("a", "b"))
x = jax.random.normal(jax.random.key(0), (8, 12, 6))
tree = {"x": x, "bf16": x.astype(jnp.bfloat16), "i": jnp.arange(5), "scalar": jnp.float32(3)}
record = integrity.fingerprint(tree)
for spec in (P("a", "b"), P(None, "a"), P("b")):
  place = lambda a: jax.device_put(a, NamedSharding(mesh, spec))
  sharded = dict(tree, x=place(x), bf16=place(tree["bf16"]))
  assert integrity.fingerprint(sharded) == record, spec
for leaf in ("x", "bf16"):
  for seed in range(20):
    bits = np.array(tree[leaf]).view(np.uint8).reshape(-1).copy()
    where = np.random.default_rng(seed).integers(bits.size)
    bits[where] ^= np.uint8(1 << (seed % 8))
    changed = dict(tree, **{leaf: jnp.asarray(bits.view(tree[leaf].dtype).reshape(tree[leaf].shape))})
    assert [m.split(":")[0] for m in integrity.mismatches(record, integrity.fingerprint(changed))] == [leaf]
print("ok")
"""


def test_checksums_do_not_depend_on_the_sharding_and_catch_one_changed_bit(on_8_devices):
  assert "ok" in on_8_devices("checksums")


KERNELS_CONTEXT_PARALLEL = """
import functools, jax, jax.numpy as jnp, numpy as np, ml_collections
from vgpt_jax import parallel
from vgpt_jax.attention import pallas_gpu, pallas_tpu
from vgpt_jax.attention.context_parallel import shard_path
from vgpt_jax.attention.dense import dense_attention
from vgpt_jax.attention.path import AttentionPath
from vgpt_jax.layout import context_parallel_layout, sample_splits, token_ids, training_layout

# Both kernels (interpret mode) run context-parallel over (data=2, context=4) and equal dense on one device:
# queries split by device, keys gathered and put back in (stream, frame) order.
layout = context_parallel_layout(training_layout(5, 37), 4)  # 333 tokens -> 336
random = ml_collections.ConfigDict(dict(split="random", min_clips=2, max_clips=-1))
split = sample_splits(jax.random.key(0), 2, 5, random)
ids = token_ids(layout, split)
t = layout.length
q, k, v = (jax.random.normal(key, (2, t, 2, 96)) for key in jax.random.split(jax.random.key(1), 3))
w = jax.random.normal(jax.random.key(2), q.shape)
mesh = parallel.make_mesh(parallel.mesh_config(data=2, context=4))
gpu_blocks = dict(block_q=16, block_k=16, bwd_block_q=32, bwd_block_k=16)
paths = {
  "pallas_gpu": AttentionPath(
    "pallas_gpu", functools.partial(pallas_gpu.gpu_plan, **gpu_blocks),
    functools.partial(pallas_gpu.gpu_attend, interpret=True),
  ),
  "pallas_tpu": AttentionPath(
    "pallas_tpu", functools.partial(pallas_tpu.tpu_plan, block_q=128, block_k=128),
    functools.partial(pallas_tpu.tpu_attend, interpret=True),
  ),
}
def out_and_grads(path, q, k, v):
  f = lambda q, k, v: path(q, k, v, ids, ids)
  return f(q, k, v), jax.grad(lambda *a: jnp.sum(f(*a) * w), argnums=(0, 1, 2))(q, k, v)
want = out_and_grads(dense_attention, q, k, v)
for name, path in paths.items():
  with jax.set_mesh(mesh):
    got = jax.block_until_ready(jax.jit(functools.partial(out_and_grads, shard_path(path)))(q, k, v))
  for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    err = float(jnp.linalg.norm(g - r) / jnp.linalg.norm(r))
    assert err < 1e-5, (name, err)
  print(name, "ok")
"""


def test_both_kernels_run_context_parallel_on_8_devices(on_8_devices):
  """The Pallas GPU and TPU kernels (interpret mode), heads of 96, under (data=2, context=4) == dense on one
  device, forward and gradients."""
  assert "pallas_tpu ok" in on_8_devices("kernels")


# The checks above need several devices. They run in one interpreter started with 8 forced CPU devices: one
# start-up for all of them, and each (config, mesh) train step compiled once (conftest.train_steps).
RUNNER = """
import contextlib, io, json, sys, traceback
report = {}
for name, code in json.loads(CHECKS).items():
  out = io.StringIO()
  try:
    with contextlib.redirect_stdout(out):
      exec(compile(code, f"<check {name}>", "exec"), {"__name__": f"check_{name}", "workdir": WORKDIR})
    report[name] = {"ok": True, "log": out.getvalue()}
  except BaseException:
    report[name] = {"ok": False, "log": out.getvalue() + traceback.format_exc()}
print("REPORT " + json.dumps(report))
"""


@pytest.fixture(scope="module")
def on_8_devices(tmp_path_factory):
  """name -> the check's printed output, asserting that it passed (its traceback otherwise)."""
  checks = {"sharded": SHARDED_VS_SINGLE, "reshard": RESHARD, "context": CONTEXT_VS_SINGLE, "checksums": CHECKSUMS}
  checks["kernels"] = KERNELS_CONTEXT_PARALLEL
  workdir = str(tmp_path_factory.mktemp("resharded_checkpoint"))
  code = RUNNER.replace("WORKDIR", repr(workdir)).replace("CHECKS", repr(json.dumps(checks)))
  out = run_python(code, devices=8, timeout=600)
  report = json.loads(out[out.index("REPORT ") + len("REPORT ") :])
  assert sorted(report) == sorted(checks)

  def result(name: str) -> str:
    assert report[name]["ok"], report[name]["log"][-6000:]
    return report[name]["log"]

  return result
