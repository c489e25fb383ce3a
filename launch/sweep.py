"""Expand a sweep file into runs and start each with one of the launchers.

  python -m launch.sweep --sweep=configs/sweeps/tiny_lr.py --launcher=inline --dry_run
  python -m launch.sweep --sweep=configs/sweeps/tiny_lr.py --launcher=local --num_processes=2 --dry_run
  python -m launch.sweep --sweep=FILE --launcher=slurm --nodes=2 --partition=gpu --submit

A sweep file is a Python file whose get_config(arg=None) returns a ConfigDict (built with
allow_dotted_keys=True, or a plain dict) with:
  base_config   the config every run trains, "configs/tiny.py" or "configs/paper.py:stage=2"
  workdir_root  runs go to WORKDIR_ROOT/<run name> (a filesystem path)
  fixed         {dotted key: value} applied to every run
  sweep         a list of axes, each {dotted key: [values]}. Runs are the cartesian product of the
                axes (first axis slowest); the keys of one axis move together (zipped), so all its
                lists must have the same length.
A run's name lists its swept values, e.g. `optim.lr=0.001,seed=0` (characters outside
[A-Za-z0-9._=,+-] become _). Every key must exist in the base config and every value must fit its
field; a bad sweep is refused, naming the key and the file, before anything starts.

Options the sweep does not know go to the launcher (use --opt=value); --config, --workdir and
--override come from the sweep file. `inline` runs each run as one plain `python -m vgpt_jax.train`,
one after another. Runs stop at the first failure unless --keep_going.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import hashlib
import importlib.util
import itertools
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence

from launch import common, local, slurm, tpu_pod

LAUNCHERS = {"local": local, "tpu_pod": tpu_pod, "slurm": slurm}


class SweepError(ValueError):
  """A sweep that cannot run; the message names the file and the key."""


@dataclasses.dataclass(frozen=True)
class Sweep:
  path: str
  base_config: str
  workdir_root: str
  fixed: dict[str, object]
  axes: list[dict[str, list]]


@dataclasses.dataclass(frozen=True)
class Run:
  name: str
  workdir: str
  overrides: tuple[tuple[str, object], ...]  # fixed first, then the swept values


def load_config_file(spec: str, name: str = "config"):
  """Import 'path.py[:arg]' and return get_config(arg), as train.py's --config does."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise SweepError(f"{name} file {path!r} not found")
  digest = hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:8]
  module_spec = importlib.util.spec_from_file_location(f"_launch_{name}_{digest}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def _plain(value):
  """ConfigDict/list nests -> dicts and lists, so the structure checks below see one kind of thing."""
  if hasattr(value, "to_dict"):
    return value.to_dict()
  return value


def load_sweep(spec: str) -> Sweep:
  """Read and check the structure of a sweep file (keys are checked against the base config later)."""
  raw = _plain(load_config_file(spec, "sweep"))
  path = spec.partition(":")[0]
  if not isinstance(raw, Mapping):
    raise SweepError(f"{path}: get_config() must return a ConfigDict or dict, got {type(raw).__name__}")
  missing = [k for k in ("base_config", "workdir_root") if not raw.get(k)]
  if missing:
    raise SweepError(f"{path}: missing {', '.join(missing)}")
  unknown = set(raw) - {"base_config", "workdir_root", "fixed", "sweep"}
  if unknown:
    raise SweepError(f"{path}: unknown sweep field(s) {sorted(unknown)}; use base_config, workdir_root, fixed, sweep")
  fixed = dict(_plain(raw.get("fixed")) or {})
  axes = []
  for i, axis in enumerate(_plain(raw.get("sweep")) or []):
    axis = _plain(axis)
    if not isinstance(axis, Mapping) or not axis:
      raise SweepError(f"{path}: sweep[{i}] must be a non-empty dict of key -> list of values")
    lengths = {}
    for key, values in axis.items():
      if isinstance(values, str) or not isinstance(values, Sequence):
        raise SweepError(f"{path}: sweep[{i}][{key!r}] must be a list of values, got {values!r}")
      lengths[key] = len(values)
    if len(set(lengths.values())) != 1 or 0 in lengths.values():
      raise SweepError(
        f"{path}: the keys of sweep[{i}] are zipped, so their lists need one common non-zero length; got {lengths}"
      )
    axes.append({k: list(v) for k, v in axis.items()})
  seen = dict.fromkeys(fixed, "fixed")
  for i, axis in enumerate(axes):
    for key in axis:
      if key in seen:
        raise SweepError(f"{path}: key {key!r} is set twice (in {seen[key]} and sweep[{i}])")
      seen[key] = f"sweep[{i}]"
  return Sweep(path, str(raw["base_config"]), str(raw["workdir_root"]), fixed, axes)


def run_name(values: Sequence[tuple[str, object]]) -> str:
  """'optim.lr=0.001,seed=0': readable, deterministic, and safe as a directory name."""
  text = ",".join(f"{k}={common.format_value(v)}" for k, v in values) or "base"
  return re.sub(r"[^A-Za-z0-9._=,+-]", "_", text)


def expand(sweep: Sweep) -> list[Run]:
  """All runs: the product over axes of each axis's zipped rows."""
  rows_per_axis = [[list(zip(axis, row)) for row in zip(*axis.values())] for axis in sweep.axes]
  runs = []
  for combo in itertools.product(*rows_per_axis):
    values = [kv for row in combo for kv in row]
    name = run_name(values)
    workdir = f"{sweep.workdir_root.rstrip('/')}/{name}"
    runs.append(Run(name, workdir, tuple(sweep.fixed.items()) + tuple(values)))
  names = [r.name for r in runs]
  duplicates = sorted({n for n in names if names.count(n) > 1})
  if duplicates:
    raise SweepError(f"{sweep.path}: runs share a name (values that print alike?): {duplicates}")
  return runs


def _set(config, key: str, value, sweep: Sweep) -> None:
  """Set a dotted key on a locked ConfigDict, refusing unknown keys and values of the wrong type."""
  parts = key.split(".")
  node = config
  for i, part in enumerate(parts):
    if not hasattr(node, "keys") or part not in node:
      known = list(node.keys()) if hasattr(node, "keys") else []
      hint = difflib.get_close_matches(part, known, n=1)
      where = ".".join(parts[:i]) or "the top level"
      raise SweepError(
        f"{sweep.path}: unknown config key {key!r}: {sweep.base_config} has no {part!r} in {where}"
        + (f" (did you mean {'.'.join(parts[:i] + hint)!r}?)" if hint else "")
      )
    if i < len(parts) - 1:
      node = node[part]
  if hasattr(node[parts[-1]], "keys"):
    raise SweepError(f"{sweep.path}: config key {key!r} is a group of fields; sweep its fields instead")
  try:
    node[parts[-1]] = value
  except (TypeError, ValueError) as e:
    raise SweepError(f"{sweep.path}: {key}={value!r} does not fit the field in {sweep.base_config}: {e}") from None


def check_runs(sweep: Sweep, runs: Sequence[Run], project_checks: bool = True) -> None:
  """Apply every run's overrides to the base config; refuse unknown keys, wrong types and bad configs."""
  base = load_config_file(sweep.base_config, "base_config")
  validate = None
  if project_checks:
    from vgpt_jax import config as config_lib  # the checks train.py runs first, so a bad run fails here

    validate = config_lib.validate
  for run in runs:
    config = base.copy_and_resolve_references()
    config.lock()
    for key, value in run.overrides:
      _set(config, key, value, sweep)
    if validate:
      try:
        validate(config)
      except ValueError as e:
        raise SweepError(f"{sweep.path}: run {run.name} is not a valid config: {e}") from None


def inline_command(
  run: Run, sweep: Sweep, python: str = sys.executable, module: str = common.TRAIN_MODULE
) -> list[str]:
  """The plain single-process train command of one run."""
  return common.train_command(sweep.base_config, run.workdir, run.overrides, python=python, module=module)


def launcher_argv(run: Run, sweep: Sweep, options: Sequence[str], dry_run: bool = False) -> list[str]:
  """argv for a launcher's main(): the user's launcher options plus this run's config, workdir and overrides."""
  argv = [*options, f"--config={sweep.base_config}", f"--workdir={run.workdir}"]
  argv += [f"--override={k}={common.format_value(v)}" for k, v in run.overrides]
  return argv + (["--dry_run"] if dry_run else [])


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog="python -m launch.sweep", description=__doc__.split("\n")[0], allow_abbrev=False
  )
  parser.add_argument("--sweep", required=True, help="sweep file[:arg]")
  parser.add_argument("--launcher", required=True, choices=["inline", *LAUNCHERS])
  parser.add_argument("--dry_run", action="store_true", help="print every run's commands instead of running them")
  parser.add_argument("--keep_going", action="store_true", help="start the next run after a failed one")
  parser.add_argument("--python", default=None, help="the interpreter (inline default: this one)")
  parser.add_argument("--module", default=common.TRAIN_MODULE, help=argparse.SUPPRESS)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  args, options = build_parser().parse_known_args(argv)
  reserved = [o for o in options if re.match(r"--(config|workdir|override)\b", o)]
  if reserved:
    raise SystemExit(
      f"{reserved[0]}: the sweep file sets --config, --workdir and overrides (put fixed ones in `fixed`)"
    )
  if args.launcher == "inline" and options:
    raise SystemExit(f"--launcher=inline takes no launcher options, got {options}")
  if args.launcher != "inline":  # options this parser took that belong to the launcher too
    options += [f"--python={args.python}"] if args.python else []
    options += [f"--module={args.module}"] if args.module != common.TRAIN_MODULE else []
  try:
    sweep = load_sweep(args.sweep)
    runs = expand(sweep)
    check_runs(sweep, runs)
  except SweepError as e:
    raise SystemExit(f"sweep refused: {e}") from None
  launcher = LAUNCHERS.get(args.launcher)
  if launcher:
    for run in runs:  # bad launcher options stop the sweep here, before the first run starts
      launcher.build_parser().parse_args(launcher_argv(run, sweep, options, args.dry_run))
  common.log(f"{len(runs)} runs from {sweep.path} ({sweep.base_config}) with --launcher={args.launcher}")

  failed = []
  for i, run in enumerate(runs):
    if args.dry_run:
      print(f"# run {i + 1}/{len(runs)}: {run.name}")
    else:
      common.log(f"run {i + 1}/{len(runs)}: {run.name} -> {run.workdir}")
    if launcher is None:
      command = inline_command(run, sweep, args.python or sys.executable, args.module)
      if args.dry_run:
        print(shlex.join(command), flush=True)
        continue
      status = subprocess.call(command)
    else:
      sys.stdout.flush()
      status = launcher.main(launcher_argv(run, sweep, options, args.dry_run))
    if status:
      failed.append(run.name)
      common.log(f"run {run.name} failed with code {status}")
      if not args.keep_going:
        return status
  if failed:
    common.log(f"{len(failed)} of {len(runs)} runs failed: {failed}")
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
