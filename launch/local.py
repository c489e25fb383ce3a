"""N train processes on this machine, joined by jax.distributed: the multi-process code path without a cluster.

  python -m launch.local --config=configs/tiny.py --workdir=runs/local2 --num_processes=2 \
      --devices_per_process=2 [--override train.steps=50] [--dry_run]

Each process runs on CPU (JAX_PLATFORMS=cpu) unless --platform says otherwise; with --platform=cpu,
--devices_per_process K fakes K CPU devices per process, with --platform=cuda/gpu it gives each process
its own K GPUs through CUDA_VISIBLE_DEVICES. Output lines carry the process id as [i]. When one
process fails, the others are stopped (SIGTERM, then SIGKILL after --grace seconds) and the launcher
exits non-zero.
"""

from __future__ import annotations

import argparse
import socket
import sys
from collections.abc import Iterable, Sequence

from launch import common


def free_port() -> int:
  """A TCP port nobody listens on now, for the coordinator."""
  try:
    import portpicker

    return portpicker.pick_unused_port()
  except Exception:  # portpicker missing or its port server unreachable: ask the kernel
    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      return s.getsockname()[1]


def process_env(
  process_id: int, platform: str, devices_per_process: int | None, extra: dict[str, str] | None = None
) -> dict[str, str]:
  """Environment of process `process_id`: platform, device count or GPU slice, unbuffered output."""
  env = {"PYTHONUNBUFFERED": "1"}  # lines reach the [i] prefixer as they are printed
  if platform:
    env["JAX_PLATFORMS"] = platform
  if devices_per_process:
    if platform == "cpu":
      env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices_per_process}"
    elif platform in ("cuda", "gpu"):
      first = process_id * devices_per_process
      env["CUDA_VISIBLE_DEVICES"] = ",".join(str(first + d) for d in range(devices_per_process))
    else:
      raise ValueError(f"--devices_per_process works with --platform=cpu, cuda or gpu, not {platform!r}")
  env.update(extra or {})
  return env


def build_commands(
  config: str,
  workdir: str,
  num_processes: int,
  port: int,
  *,
  overrides: Iterable[common.Override] = (),
  platform: str = "cpu",
  devices_per_process: int | None = None,
  env: dict[str, str] | None = None,
  python: str = sys.executable,
  module: str = common.TRAIN_MODULE,
) -> list[list[str]]:
  """One `env ... python -m vgpt_jax.train ... --process_id=i` argv per process, all on 127.0.0.1:port."""
  if num_processes < 1:
    raise ValueError(f"--num_processes must be >= 1, got {num_processes}")
  overrides = list(overrides)
  return [
    common.with_env(
      common.train_command(
        config,
        workdir,
        overrides,
        python=python,
        module=module,
        distributed="on",
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=num_processes,
        process_id=i,
      ),
      process_env(i, platform, devices_per_process, env),
    )
    for i in range(num_processes)
  ]


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m launch.local", description=__doc__.split("\n")[0])
  common.add_job_arguments(parser)
  parser.add_argument("--num_processes", type=int, default=2)
  parser.add_argument("--devices_per_process", type=int, default=None, help="CPU devices (or GPUs) per process")
  parser.add_argument("--platform", default="cpu", help="JAX_PLATFORMS for the children ('' leaves it unset)")
  parser.add_argument("--port", type=int, default=None, help="coordinator port (default: a free one)")
  parser.add_argument("--grace", type=float, default=10.0, help="seconds between SIGTERM and SIGKILL")
  parser.add_argument("--python", default=sys.executable, help="interpreter for the children")
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  try:
    commands = build_commands(
      args.config,
      args.workdir,
      args.num_processes,
      args.port or free_port(),
      overrides=args.override,
      platform=args.platform,
      devices_per_process=args.devices_per_process,
      env=common.parse_env(args.env),
      python=args.python,
      module=args.module,
    )
  except ValueError as e:
    raise SystemExit(str(e)) from None
  if args.dry_run:
    print("\n".join(common.render(commands)))
    return 0
  return common.run_parallel(commands, grace=args.grace)


if __name__ == "__main__":
  sys.exit(main())
