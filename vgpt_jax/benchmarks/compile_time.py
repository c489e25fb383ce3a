"""Compile-time benchmark: CPU seconds to compile a train step, and its step time, under XLA's compile settings.

  python -m vgpt_jax.benchmarks.compile_time [--preset=test] [--frames=5] [--size=16] [--batch_size=4]

Each setting runs in a fresh process (XLA reads its flags once), with the
persistent compilation cache off. The defaults are the test suite's model
(tests/conftest.py `small_config`), so the table says what the suite's
compile settings buy; on CPU the programs of a tiny model cost far more to
compile than to run. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

# The cheapest compiles for programs that run in milliseconds: what the test session sets (tests/conftest.py)
# for itself and every process it starts.
CHEAP_COMPILES = {
  "JAX_DISABLE_MOST_OPTIMIZATIONS": "1",  # XLA's optimisation passes off (a per-compile JAX flag)
  "XLA_FLAGS": "--xla_cpu_use_fusion_emitters=false --xla_cpu_parallel_codegen_split_count=1",
}

# (label, environment) of each setting the table compares.
SETTINGS = (
  ("XLA defaults", {}),
  ("optimisations off (JAX_DISABLE_MOST_OPTIMIZATIONS=1)", {"JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}),
  ("optimisations off + loop emitters, 1 codegen thread (the test session's)", CHEAP_COMPILES),
)


def measure(args: argparse.Namespace) -> dict[str, float]:
  """In this process: trace + lower, compile, and the median step time of the compiled train step."""
  import jax
  import numpy as np

  from vgpt_jax import parallel, train_step
  from vgpt_jax.benchmarks.train_step import step_config, step_times
  from vgpt_jax.run import make_run

  config = step_config(args.preset, args.frames, args.size, args.batch_size)
  run = make_run(config)
  mesh = parallel.make_mesh(config.mesh, jax.devices()[:1])
  start = time.process_time()
  lowered = train_step.lower_train_step(run, mesh)
  traced = time.process_time()
  compiled = lowered.compile()
  done = time.process_time()
  batch = parallel.batch_sharding(mesh)
  video = jax.device_put(jax.random.uniform(jax.random.key(0), run.input_shape(args.batch_size), minval=-1), batch)
  skips = jax.device_put(train_step.no_skips(args.batch_size), batch)
  _, times = step_times(compiled, train_step.create_state(run, mesh), video, skips, args.steps)
  return {"trace_lower_s": traced - start, "compile_cpu_s": done - traced, "step_s": float(np.median(times))}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--preset", default="test")
  parser.add_argument("--frames", type=int, default=5)
  parser.add_argument("--size", type=int, default=16)
  parser.add_argument("--batch_size", type=int, default=4)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    import jax

    jax.config.update("jax_enable_compilation_cache", False)  # a real compile, not a cache read
    print(json.dumps(measure(args)))
    return
  print(f"train step of preset {args.preset}, {args.frames} frames of {args.size}x{args.size}, batch {args.batch_size}")
  print()
  print("| setting | trace + lower (CPU s) | compile (CPU s) | step (ms) |")
  print("|---|---|---|---|")
  for label, extra in SETTINGS:
    env = {k: v for k, v in os.environ.items() if k not in CHEAP_COMPILES}  # each setting says all of its own
    env.update(extra, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
      [sys.executable, "-m", "vgpt_jax.benchmarks.compile_time", "--child", *sys.argv[1:]],
      env=env,
      capture_output=True,
      text=True,
      check=True,
    )
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"| {label} | {r['trace_lower_s']:.2f} | {r['compile_cpu_s']:.2f} | {1000 * r['step_s']:.1f} |")


if __name__ == "__main__":
  main()
