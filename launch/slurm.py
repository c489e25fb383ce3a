"""Multi-node GPU training under SLURM: write an sbatch script (and with --submit, submit it).

  python -m launch.slurm --nodes=4 --gpus_per_node=8 --partition=gpu --config=configs/paper.py:stage=1 \
      --workdir=/shared/runs/stage1 [--override train.steps=10] [--submit] [--dry_run]

One task per node: one JAX process drives all GPUs of its node. The coordinator is the first host of
the allocation and its port is 20000 + job id mod 20000 (or --port), so two jobs that share a first
node do not collide. Every task's own shell expands $SLURM_PROCID (`srun bash -c '...'`), so each
process gets its id. The script goes to LOG_DIR/JOB_NAME.sbatch and the job's log to
LOG_DIR/slurm-%j.out; LOG_DIR is --workdir unless that is a gs:// path.

Default XLA_FLAGS (replace them with --xla_flags='...'; '' sets none), each one about overlapping
communication with compute in a scanned, FSDP-sharded transformer like this one:
  --xla_gpu_enable_latency_hiding_scheduler=true     schedule collectives to overlap compute (NVIDIA's
                                                     JAX images set this one by default)
  --xla_gpu_enable_pipelined_all_gather=true         start the next layer's parameter all-gather
  --xla_gpu_enable_pipelined_reduce_scatter=true     and the last layer's gradient reduce-scatter
  --xla_gpu_enable_pipelined_all_reduce=true         inside the layer scan, one iteration early/late
  --xla_gpu_enable_while_loop_double_buffering=true  lets those overlap across loop iterations
NCCL settings are left to the site (its modules or --env NCCL_...=...).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from collections.abc import Iterable, Sequence

from launch import common

DEFAULT_XLA_FLAGS = " ".join(
  [
    "--xla_gpu_enable_latency_hiding_scheduler=true",
    "--xla_gpu_enable_pipelined_all_gather=true",
    "--xla_gpu_enable_pipelined_reduce_scatter=true",
    "--xla_gpu_enable_pipelined_all_reduce=true",
    "--xla_gpu_enable_while_loop_double_buffering=true",
  ]
)
MEM_FRACTION = "0.9"  # XLA preallocates this share of each GPU; the rest stays for cuDNN/NCCL workspaces

# Expanded by each task's own shell, never by the batch script: that is what makes process ids differ.
PER_TASK_FLAGS = '--coordinator_address="$COORD:$PORT" --num_processes="$SLURM_NTASKS" --process_id="$SLURM_PROCID"'


def task_command(
  config: str,
  workdir: str,
  overrides: Iterable[common.Override] = (),
  python: str = "python3",
  module: str = common.TRAIN_MODULE,
) -> str:
  """The shell line one task runs: the train command, quoted, plus the per-task flags left unexpanded."""
  job = common.train_command(config, workdir, list(overrides), python=python, module=module, distributed="on")
  return "exec " + shlex.join(job) + " " + PER_TASK_FLAGS


def build_script(
  config: str,
  workdir: str,
  *,
  nodes: int,
  gpus_per_node: int = 8,
  cpus_per_task: int = 16,
  time: str = "24:00:00",
  job_name: str = "vgpt",
  log_dir: str | None = None,
  partition: str | None = None,
  account: str | None = None,
  overrides: Iterable[common.Override] = (),
  repo_dir: str = ".",
  python: str = "python3",
  port: int | None = None,
  xla_flags: str = DEFAULT_XLA_FLAGS,
  env: dict[str, str] | None = None,
  module: str = common.TRAIN_MODULE,
) -> str:
  """The sbatch script text."""
  if nodes < 1 or gpus_per_node < 1 or cpus_per_task < 1:
    raise ValueError("--nodes, --gpus_per_node and --cpus_per_task must be >= 1")
  log_dir = log_dir or workdir
  if log_dir.startswith("gs://"):
    raise ValueError("SLURM writes its log to a local path: give --log_dir when --workdir is gs://...")
  sbatch = {
    "job-name": job_name,
    "nodes": nodes,
    "ntasks-per-node": 1,
    "gpus-per-node": gpus_per_node,
    "cpus-per-task": cpus_per_task,
    "time": time,
    "partition": partition,
    "account": account,
    "output": f"{log_dir.rstrip('/')}/slurm-%j.out",
  }
  lines = ["#!/bin/bash"]
  lines += [f"#SBATCH --{k}={v}" for k, v in sbatch.items() if v is not None]
  lines += [
    "# Written by launch/slurm.py.",
    "set -eu  # no pipefail: `scontrol ... | head -n1` may end scontrol with SIGPIPE, which is fine",
    "",
    f"export XLA_PYTHON_CLIENT_MEM_FRACTION={MEM_FRACTION}",
  ]
  if xla_flags:
    lines.append(f"export XLA_FLAGS={shlex.quote(xla_flags)}")
  lines += [f"export {k}={shlex.quote(v)}" for k, v in (env or {}).items()]
  port_expr = str(port) if port else "$((20000 + SLURM_JOB_ID % 20000))"
  lines += [
    "",
    "# jax.distributed coordinator: process 0 runs on the first host of the allocation.",
    'COORD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)',
    ': "${COORD:?no first host in SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST}"',
    f"PORT={port_expr}",
    "export COORD PORT",
    f"cd {common.shell_path(repo_dir)}",
    'echo "vgpt: $SLURM_NTASKS processes, coordinator $COORD:$PORT"',
    "",
    "# --cpus-per-task again: srun does not inherit it from sbatch on SLURM 22.05+.",
    f"srun --kill-on-bad-exit=1 --cpus-per-task={cpus_per_task} bash -c "
    + shlex.quote(task_command(config, workdir, overrides, python, module)),
    "",
  ]
  return "\n".join(lines)


def sbatch_command(script_path: str) -> list[str]:
  return ["sbatch", script_path]


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m launch.slurm", description=__doc__.split("\n")[0])
  common.add_job_arguments(parser)
  parser.add_argument("--nodes", type=int, required=True)
  parser.add_argument("--gpus_per_node", type=int, default=8)
  parser.add_argument("--cpus_per_task", type=int, default=16, help="CPU cores per node (data loading)")
  parser.add_argument("--time", default="24:00:00")
  parser.add_argument("--partition", default=None)
  parser.add_argument("--account", default=None)
  parser.add_argument("--job_name", default=None, help="default: vgpt-<basename of workdir>")
  parser.add_argument("--log_dir", default=None, help="slurm log and script directory (default: --workdir)")
  parser.add_argument("--repo_dir", default=None, help="the checkout on the nodes (default: the current directory)")
  parser.add_argument("--python", default="python3", help="interpreter on the nodes")
  parser.add_argument("--port", type=int, default=None, help="coordinator port (default: from the job id)")
  parser.add_argument("--xla_flags", default=DEFAULT_XLA_FLAGS)
  parser.add_argument("--submit", action="store_true", help="run sbatch on the script")
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  job_name = args.job_name or "vgpt-" + os.path.basename(args.workdir.rstrip("/"))
  log_dir = args.log_dir or args.workdir
  if not log_dir.startswith("gs://"):
    log_dir = os.path.abspath(log_dir)  # sbatch resolves relative paths against where it is run
  try:
    script = build_script(
      args.config,
      args.workdir,
      nodes=args.nodes,
      gpus_per_node=args.gpus_per_node,
      cpus_per_task=args.cpus_per_task,
      time=args.time,
      job_name=job_name,
      log_dir=log_dir,
      partition=args.partition,
      account=args.account,
      overrides=args.override,
      repo_dir=args.repo_dir or os.getcwd(),
      python=args.python,
      port=args.port,
      xla_flags=args.xla_flags,
      env=common.parse_env(args.env),
      module=args.module,
    )
  except ValueError as e:
    raise SystemExit(str(e)) from None
  path = os.path.join(log_dir, f"{job_name}.sbatch")
  command = sbatch_command(path)
  if args.dry_run:
    print(script, end="")  # the script ends with a newline
    print(shlex.join(command))
    return 0
  os.makedirs(log_dir, exist_ok=True)  # SLURM does not create the --output directory
  with open(path, "w") as f:
    f.write(script)
  common.log(f"wrote {path}")
  if not args.submit:
    print(shlex.join(command))
    return 0
  return subprocess.call(command)


if __name__ == "__main__":
  sys.exit(main())
