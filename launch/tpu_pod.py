"""Run the train job on every worker of a Cloud TPU VM pod (or of several slices: Multislice).

  python -m launch.tpu_pod --tpu_name=my-v4-32 --zone=us-central2-b --config=configs/paper.py:stage=1 \
      --workdir=/mnt/gcs/vgpt/stage1 [--setup] [--override train.steps=10] [--dry_run]
  python -m launch.tpu_pod --tpu_name=my-v4-32 --zone=us-central2-b --stop

Each worker runs `cd REPO_DIR && python3 -m vgpt_jax.train ... --distributed=on` through
`gcloud compute tpus tpu-vm ssh --worker=all`; JAX finds its peers from the TPU metadata. The code must
already be at --repo_dir on every worker (e.g. a git clone); --setup first pip-installs requirements.txt
there. The ssh session stays attached to the job, so run the launcher from tmux/screen or a VM.

Multislice (--num_slices N > 1): --tpu_name is a prefix and slice i is the TPU named PREFIX-i, the names
`gcloud compute tpus queued-resources create --node-count=N --node-prefix=PREFIX` gives. Every slice's
command gets MEGASCALE_COORDINATOR_ADDRESS=COORDINATOR_HOST:PORT (worker 0 of slice 0),
MEGASCALE_NUM_SLICES=N and its own MEGASCALE_SLICE_ID; the N ssh commands run at the same time.

--stop kills only processes whose command line is `python... -m vgpt_jax.train`, never other Python.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import subprocess
import sys
from collections.abc import Iterable, Sequence

from launch import common


@dataclasses.dataclass(frozen=True)
class Pod:
  """Where to run: one TPU VM pod, or N slices named PREFIX-0..PREFIX-(N-1)."""

  tpu_name: str
  zone: str
  project: str | None = None
  num_slices: int = 1
  coordinator_host: str | None = None  # worker 0 of slice 0; needed when num_slices > 1
  megascale_port: int = 8080
  repo_dir: str = "~/vgpt_jax"
  python: str = "python3"  # stock TPU VM images have python3 and no `python`
  internal_ip: bool = False

  def __post_init__(self):
    if self.num_slices < 1:
      raise ValueError(f"--num_slices must be >= 1, got {self.num_slices}")
    if self.num_slices > 1 and not self.coordinator_host:
      raise ValueError("--num_slices > 1 needs --coordinator_host (the address of worker 0 of slice 0)")

  @property
  def slices(self) -> list[str]:
    """The TPU name of each slice."""
    if self.num_slices == 1:
      return [self.tpu_name]
    return [f"{self.tpu_name}-{i}" for i in range(self.num_slices)]


def ssh_command(pod: Pod, tpu: str, remote: str) -> list[str]:
  """gcloud argv that runs the shell line `remote` on all workers of TPU `tpu`."""
  argv = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", tpu, f"--zone={pod.zone}"]
  if pod.project:
    argv.append(f"--project={pod.project}")
  argv.append("--worker=all")
  if pod.internal_ip:
    argv.append("--internal-ip")
  return argv + [f"--command={remote}"]


def megascale_env(pod: Pod, slice_id: int) -> dict[str, str]:
  """The Multislice variables of one slice (empty for a single slice)."""
  if pod.num_slices == 1:
    return {}
  return {
    "MEGASCALE_COORDINATOR_ADDRESS": f"{pod.coordinator_host}:{pod.megascale_port}",
    "MEGASCALE_NUM_SLICES": str(pod.num_slices),
    "MEGASCALE_SLICE_ID": str(slice_id),
  }


def setup_commands(pod: Pod) -> list[list[str]]:
  """pip-install requirements.txt on every worker, one ssh per slice."""
  remote = common.remote_shell([pod.python, "-m", "pip", "install", "-r", "requirements.txt"], cwd=pod.repo_dir)
  return [ssh_command(pod, tpu, remote) for tpu in pod.slices]


def train_commands(
  pod: Pod,
  config: str,
  workdir: str,
  overrides: Iterable[common.Override] = (),
  env: dict[str, str] | None = None,
  module: str = common.TRAIN_MODULE,
) -> list[list[str]]:
  """One ssh per slice starting the train job on all its workers."""
  job = common.train_command(config, workdir, list(overrides), python=pod.python, module=module, distributed="on")
  return [
    ssh_command(pod, tpu, common.remote_shell(job, cwd=pod.repo_dir, env={**megascale_env(pod, i), **(env or {})}))
    for i, tpu in enumerate(pod.slices)
  ]


def stop_pattern(module: str = common.TRAIN_MODULE) -> str:
  """pkill -f regex for the train processes only.

  `[p]ython` matches "python" but not its own text, so the remote shell whose command line holds the
  pattern is not killed with the job; `( |$)` keeps vgpt_jax.train_step and the like out.
  """
  return r"[p]ython[0-9.]* -m " + "[.]".join(module.split(".")) + "( |$)"


def stop_commands(pod: Pod, grace: int = 10, module: str = common.TRAIN_MODULE) -> list[list[str]]:
  """SIGTERM the train processes on every worker, SIGKILL what is left after `grace` seconds."""
  p = shlex.quote(stop_pattern(module))
  remote = f"if pkill -TERM -f {p}; then sleep {int(grace)}; pkill -KILL -f {p} || true; fi"
  return [ssh_command(pod, tpu, remote) for tpu in pod.slices]


def build_phases(args: argparse.Namespace) -> list[list[list[str]]]:
  """The commands of a launch, in phases: each phase's commands run together, phases one after another."""
  pod = Pod(
    tpu_name=args.tpu_name,
    zone=args.zone,
    project=args.project,
    num_slices=args.num_slices,
    coordinator_host=args.coordinator_host,
    megascale_port=args.megascale_port,
    repo_dir=args.repo_dir,
    python=args.python,
    internal_ip=args.internal_ip,
  )
  if args.stop:
    return [stop_commands(pod, args.grace, args.module)]
  if not args.config or not args.workdir:
    raise ValueError("--config and --workdir are required (unless --stop)")
  phases = [setup_commands(pod)] if args.setup else []
  env = common.parse_env(args.env)
  return phases + [train_commands(pod, args.config, args.workdir, args.override, env, args.module)]


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m launch.tpu_pod", description=__doc__.split("\n")[0])
  common.add_job_arguments(parser, required=False)  # --stop needs no job; build_phases checks the rest
  parser.add_argument("--tpu_name", required=True, help="TPU name; with --num_slices > 1 the prefix of PREFIX-i")
  parser.add_argument("--zone", required=True)
  parser.add_argument("--project", default=None)
  parser.add_argument("--repo_dir", default="~/vgpt_jax", help="the checkout on the workers")
  parser.add_argument("--python", default="python3", help="interpreter on the workers")
  parser.add_argument("--setup", action="store_true", help="pip install -r requirements.txt on all workers first")
  parser.add_argument("--num_slices", type=int, default=1)
  parser.add_argument("--coordinator_host", default=None, help="Multislice: address of worker 0 of slice 0")
  parser.add_argument("--megascale_port", type=int, default=8080)
  parser.add_argument("--internal_ip", action="store_true", help="ssh over internal IPs (launching from a GCE VM)")
  parser.add_argument("--stop", action="store_true", help="kill the train processes on all workers")
  parser.add_argument("--grace", type=int, default=10, help="--stop: seconds between SIGTERM and SIGKILL")
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  try:
    phases = build_phases(args)
  except ValueError as e:
    raise SystemExit(str(e)) from None
  if args.dry_run:
    for phase in phases:
      print("\n".join(common.render(phase)))
    return 0
  for phase in phases:
    if len(phase) == 1:
      try:
        status = subprocess.call(phase[0])  # attached to the terminal: gcloud may need to ask for ssh keys
      except KeyboardInterrupt:  # the terminal's SIGINT reached gcloud too
        return 130
    else:
      status = common.run_parallel(phase, labels=[f"[{cmd[5]}]" for cmd in phase], stdin=None)
    if status:
      return status
  return 0


if __name__ == "__main__":
  sys.exit(main())
