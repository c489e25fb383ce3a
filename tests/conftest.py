"""Shared test fixtures: small configs that compile quickly on CPU."""

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

# XLA's persistent compilation cache, for this process and the runs it starts: the suite compiles the same
# small programs in dozens of processes, and a cached executable is the same program (bit-identical results).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "vgpt_jax_test_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# The tests' programs are tiny: compiling them costs more than running them. Every process of the session, and
# every one it starts, compiles the cheap way (`python -m vgpt_jax.benchmarks.compile_time`, BENCHMARKS.md: the
# test model's train step 19 s of CPU -> 1.6 s). The few tests bound by running a real network (I3D) turn XLA's
# optimisation passes back on with `full_optimization`. That module imports no JAX: this runs before JAX loads.
from vgpt_jax.benchmarks.compile_time import CHEAP_COMPILES  # noqa: E402

os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = CHEAP_COMPILES["JAX_DISABLE_MOST_OPTIMIZATIONS"]
os.environ["XLA_FLAGS"] = " ".join(
  dict.fromkeys([*os.environ.get("XLA_FLAGS", "").split(), *CHEAP_COMPILES["XLA_FLAGS"].split()])
)

import ml_collections
import pytest

from configs import tiny


def small_config(**overrides) -> ml_collections.ConfigDict:
  """The tiny config shrunk to the `test` model and 16x16 frames; fast to compile."""
  from vgpt_jax.model import model_config

  c = tiny.get_config()
  c.model = model_config("test")
  c.data.height = c.data.width = 16
  c.data.num_frames = 5
  c.train.batch_size = 4
  c.train.steps = 4
  c.train.num_samples = 2
  c.train.sample_context_frames = 2
  c.train.sample_steps = 3
  c.layout.split = "random"  # the paper's stages 2-4 split, so every test run exercises random clip splits
  c.train.ema_decay = 0.0  # tests that need an EMA ask for one
  for key, value in overrides.items():
    target = c
    *path, leaf = key.split(".")
    for p in path:
      target = target[p]
    target[leaf] = value
  return c


def data_config(**fields) -> ml_collections.ConfigDict:
  """`default_data_config` with `fields` set (the data tests' configs)."""
  from vgpt_jax.data.pipeline import default_data_config

  cfg = default_data_config()
  cfg.update(fields)
  return cfg


@pytest.fixture
def config() -> ml_collections.ConfigDict:
  return small_config()


@contextlib.contextmanager
def full_optimization():
  """XLA's full optimisation inside: for the tests whose time goes to running a real network (I3D), not compiling."""
  import jax

  before = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", False)
  try:
    yield
  finally:
    jax.config.update("jax_disable_most_optimizations", before)


@pytest.fixture
def optimized():
  with full_optimization():
    yield


REPO = Path(__file__).resolve().parent.parent


def run_python(code: str, devices: int = 1, timeout: int = 300) -> str:
  """Run `code` in a fresh interpreter with `devices` forced CPU devices; return stdout, fail on error."""
  flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags)
  env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
  proc = subprocess.run(
    [sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
  )
  assert proc.returncode == 0, f"subprocess failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
  return proc.stdout


def train_command(workdir, *overrides: str, config: str = "tests/small_config.py") -> list[str]:
  """The main job's command line on a test config."""
  return [sys.executable, "-m", "vgpt_jax.train", f"--config={config}", f"--workdir={workdir}", *overrides]


TRAINED_RUN = ("--config.train.steps=6", "--config.train.log_every=1", "--config.train.ema_decay=0.5")


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
  """A 6-step run of the main job on the test config (with an EMA), every loss logged, made once for the whole
  session (every xdist worker reads the same one, built by whichever asks first). Tests read it, write elsewhere."""
  import fcntl

  base = tmp_path_factory.getbasetemp()
  shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # this session's folder, all workers'
  workdir = shared / "trained_run"
  with open(shared / "trained_run.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not (workdir / "DONE").exists():
      command = train_command(workdir, *TRAINED_RUN)
      proc = subprocess.run(command, env=cpu_env(), capture_output=True, text=True)
      assert proc.returncode == 0, proc.stderr[-3000:]
      (workdir / "DONE").touch()
  return workdir


def train_processes(workdir, *overrides: str, count: int = 2, timeout: float = 300) -> list[tuple[int, str]]:
  """(exit status, output) of `count` local processes of the main job training together (jax.distributed on
  127.0.0.1), each given `overrides`."""
  import portpicker

  address = f"--coordinator_address=127.0.0.1:{portpicker.pick_unused_port()}"
  procs = [
    subprocess.Popen(
      train_command(workdir, *overrides, "--distributed=on", address, f"--num_processes={count}", f"--process_id={i}"),
      env=cpu_env(),
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(count)
  ]
  outputs = [p.communicate(timeout=timeout)[0] for p in procs]
  return [(p.returncode, out) for p, out in zip(procs, outputs)]


def cpu_env(**extra: str) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", **extra)
  env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
  return env


def logged_losses(workdir) -> dict[int, float]:
  """step -> loss from metrics.jsonl; for a step logged twice (a resumed run) the last line wins."""
  lines = (Path(workdir) / "metrics.jsonl").read_text().splitlines()
  return {r["step"]: r["loss"] for r in map(json.loads, lines)}


def mesh_of(num_devices: int, data: int, fsdp: int, tensor: int):
  """A mesh over the first `num_devices` devices."""
  import jax

  from vgpt_jax import parallel

  return parallel.make_mesh(parallel.mesh_config(data=data, fsdp=fsdp, tensor=tensor), jax.devices()[:num_devices])


_COMPILED_STEPS: dict = {}


def train_steps(setup, mesh, state, videos) -> tuple:
  """Run the compiled train step on each video batch; return (state, losses). The step is compiled once per
  (config, mesh) in this process: checks that train the same config on the same mesh share it."""
  import jax

  from vgpt_jax import parallel, train_step

  key = (setup.config.to_json_best_effort(sort_keys=True), mesh)
  if key not in _COMPILED_STEPS:
    _COMPILED_STEPS[key] = train_step.compile_train_step(setup, mesh)
  step = _COMPILED_STEPS[key]
  losses = []
  for video in videos:
    skips = jax.device_put(train_step.no_skips(len(video)), parallel.batch_sharding(mesh))
    state, metrics = step(state, jax.device_put(video, parallel.batch_sharding(mesh)), skips)
    losses.append(float(metrics["loss"]))
  return state, losses


# The modules that take longest (BENCHMARKS.md, "Test suite"), heaviest first. pytest-xdist hands whole modules to
# its workers in collection order (--dist loadscope), so starting with these lets the workers finish together.
LONGEST_FIRST = (
  "test_parallel",
  "test_faults",
  "test_checkpoint",
  "test_bucketed_training",
  "test_attention",
  "test_pallas_tpu",
  "test_video_files",
  "test_fvd",
  "test_convert",
  "test_physics_iq",
  "test_pallas_gpu",
  "test_vae",
  "test_model",
  "test_sampling",
  "test_benchmarks",
  "test_evaluate",
  "test_latents",
  "test_train",
  "test_config",
)


def pytest_collection_modifyitems(items: list) -> None:
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.module.__name__.rsplit(".", 1)[-1], len(rank)))


def pytest_sessionfinish(session, exitstatus) -> None:
  """Free JAX's compiled executables before the session ends. An xdist worker that is still tearing them down
  5 s after shutdown gets a SIGINT from execnet, printed as a stray KeyboardInterrupt in `_xla_gc_callback`."""
  del session, exitstatus
  if "jax" in sys.modules:
    import gc

    sys.modules["jax"].clear_caches()
    gc.collect()
