"""The one way every launcher builds the train command, plus quoting and a small process runner.

Only the standard library is imported here so `python -m launch.local --dry_run` starts instantly and
the launchers work on a machine without JAX.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import TextIO

TRAIN_MODULE = "vgpt_jax.train"

Override = tuple[str, object]


def format_value(value: object) -> str:
  """A config value as `--config.KEY=...` expects it (ml_collections parses it by the field's type)."""
  if isinstance(value, str):
    return value
  if isinstance(value, float):
    return repr(value)  # shortest round-trip form: 0.001, 1e-05
  if isinstance(value, list | tuple):
    return str(tuple(value))  # config fields hold tuples; "(1, 2)" parses back to one
  return str(value)


def parse_override(text: str) -> tuple[str, str]:
  """'optim.lr=0.001' -> ('optim.lr', '0.001'); the value stays text, as it will on the command line."""
  key, sep, value = text.partition("=")
  key = key.strip()
  if not sep or not key or key.startswith("config.") or not re.fullmatch(r"[A-Za-z_][\w.]*", key):
    raise argparse.ArgumentTypeError(
      f"--override takes KEY=VALUE with a dotted config key (e.g. optim.lr=1e-3), got {text!r}"
    )
  return key, value


def override_flags(overrides: Iterable[Override]) -> list[str]:
  """[(key, value)] -> ['--config.key=value', ...] in the given order."""
  return [f"--config.{key}={format_value(value)}" for key, value in overrides]


def train_command(
  config: str,
  workdir: str,
  overrides: Iterable[Override] = (),
  *,
  python: str = "python",
  module: str = TRAIN_MODULE,
  distributed: str | None = None,
  coordinator_address: str | None = None,
  num_processes: int | str | None = None,
  process_id: int | str | None = None,
) -> list[str]:
  """argv of one train process; the distributed flags are added only when given."""
  argv = [python, "-m", module, f"--config={config}", f"--workdir={workdir}", *override_flags(overrides)]
  for name, value in (
    ("distributed", distributed),
    ("coordinator_address", coordinator_address),
    ("num_processes", num_processes),
    ("process_id", process_id),
  ):
    if value is not None:
      argv.append(f"--{name}={value}")
  return argv


def with_env(argv: Sequence[str], env: Mapping[str, str] | None) -> list[str]:
  """Prefix argv with `env K=V ...` so the printed command and the executed one are the same argv."""
  if not env:
    return list(argv)
  return ["env", *(f"{k}={v}" for k, v in env.items()), *argv]


def shell_path(path: str) -> str:
  """Quote a path for a remote shell but keep a leading ~/ unquoted so the remote side expands it."""
  if path == "~":
    return path
  if path.startswith("~/"):
    return "~/" + shlex.quote(path[2:]) if path[2:] else "~/"
  return shlex.quote(path)


def remote_shell(argv: Sequence[str], cwd: str | None = None, env: Mapping[str, str] | None = None) -> str:
  """One shell line: `cd DIR && env K=V prog args` with every part quoted."""
  line = shlex.join(with_env(argv, env))
  return f"cd {shell_path(cwd)} && {line}" if cwd else line


def parse_env(items: Iterable[str]) -> dict[str, str]:
  """['K=V', ...] -> {K: V}; refuses names a shell could not assign."""
  env = {}
  for item in items:
    key, sep, value = item.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z_]\w*", key):
      raise SystemExit(f"--env takes NAME=VALUE, got {item!r}")
    env[key] = value
  return env


def render(commands: Sequence[Sequence[str]]) -> list[str]:
  """Shell lines for commands meant to run at the same time: `cmd &` each, then `wait`; one alone is plain."""
  if len(commands) == 1:
    return [shlex.join(commands[0])]
  return [shlex.join(c) + " &" for c in commands] + ["wait"]


def add_job_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
  """The options every launcher shares: what to train, where, overrides, extra env, dry run."""
  parser.add_argument("--config", required=required, help="config file[:arg], as train.py takes it")
  parser.add_argument(
    "--workdir", required=required, help="run directory: a filesystem path (a gcsfuse mount for buckets)"
  )
  parser.add_argument(
    "--override",
    action="append",
    default=[],
    type=parse_override,
    metavar="KEY=VALUE",
    help="config override, repeatable; becomes --config.KEY=VALUE",
  )
  parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="extra environment, repeatable")
  parser.add_argument("--dry_run", action="store_true", help="print the exact commands instead of running them")
  parser.add_argument("--module", default=TRAIN_MODULE, help=argparse.SUPPRESS)  # tests swap in a stand-in job


def log(message: str) -> None:
  """Launcher messages go to stderr so stdout holds only the jobs' output (or the dry-run commands)."""
  print(f"[launch] {message}", file=sys.stderr, flush=True)


def _exit_code(returncode: int) -> int:
  """A child's return code as a shell would report it (killed by signal N -> 128+N)."""
  return 128 - returncode if returncode < 0 else returncode


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
  try:
    os.killpg(proc.pid, sig)  # each child leads its own group: this reaches its children too
  except (ProcessLookupError, PermissionError):
    pass


def run_parallel(
  commands: Sequence[Sequence[str]],
  labels: Sequence[str] | None = None,
  *,
  grace: float = 10.0,
  out: TextIO | None = None,
  stdin: int | None = subprocess.DEVNULL,
) -> int:
  """Run commands together, prefixing each output line with its label; returns 0 only when all exit 0.

  When one exits non-zero the others get SIGTERM and, after `grace` seconds, SIGKILL: a multi-process
  JAX job whose peer died would otherwise hang at its next collective. SIGINT/SIGTERM sent to this
  process are forwarded (a second one escalates to SIGKILL).
  """
  out = out or sys.stdout
  labels = list(labels) if labels is not None else [f"[{i}]" for i in range(len(commands))]
  lock = threading.Lock()
  procs: list[subprocess.Popen] = []
  pumps: list[threading.Thread] = []
  received: list[int] = []

  def pump(label: str, stream: TextIO) -> None:
    for line in stream:
      text = line.rstrip("\n")
      with lock:
        out.write(f"{label} {text}\n")
        out.flush()

  def on_signal(signum: int, frame) -> None:
    del frame
    received.append(signum)

  handlers = {}
  if threading.current_thread() is threading.main_thread():
    handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
  try:
    for argv, label in zip(commands, labels, strict=True):
      try:
        proc = subprocess.Popen(
          list(argv),
          stdin=stdin,
          stdout=subprocess.PIPE,
          stderr=subprocess.STDOUT,
          text=True,
          errors="replace",
          start_new_session=True,
        )
      except OSError as e:
        log(f"{label} could not start {argv[0]!r}: {e}")
        for p in procs:
          _signal_group(p, signal.SIGKILL)
        for p in procs:
          p.wait()
        return 127
      procs.append(proc)
      thread = threading.Thread(target=pump, args=(label, proc.stdout), daemon=True)
      thread.start()
      pumps.append(thread)

    status = 0
    kill_at: float | None = None  # set once we are stopping the children
    killed = False
    handled = 0
    while [p.poll() for p in procs].count(None):  # poll every child: each poll() is what reaps it
      if len(received) > handled:
        handled = len(received)
        if kill_at is None:
          sig = received[-1]
          log(f"got {signal.Signals(sig).name}; passing it to {len(procs)} processes")
          status = 128 + sig
          for p in procs:
            _signal_group(p, sig)
          kill_at = time.monotonic() + grace
        else:
          kill_at = time.monotonic()  # a second signal: stop waiting
      if kill_at is None:
        for label, p in zip(labels, procs):
          if p.returncode not in (None, 0):
            status = _exit_code(p.returncode)
            log(f"{label} exited with code {status}; stopping the others (SIGTERM, SIGKILL after {grace:g}s)")
            for q in procs:
              if q.poll() is None:
                _signal_group(q, signal.SIGTERM)
            kill_at = time.monotonic() + grace
            break
      elif not killed and time.monotonic() >= kill_at:
        for p in procs:
          if p.poll() is None:
            log(f"{labels[procs.index(p)]} still running after {grace:g}s; sending SIGKILL")
            _signal_group(p, signal.SIGKILL)
        killed = True
      time.sleep(0.05)
    for thread in pumps:
      thread.join(timeout=2)  # a grandchild may hold the pipe open; do not wait on it forever
    if status == 0:
      status = next((_exit_code(p.returncode) for p in procs if p.returncode), 0)
    return status
  finally:
    for sig, handler in handlers.items():
      signal.signal(sig, handler)
