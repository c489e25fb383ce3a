"""Where a train step's time goes: per-op times of the loss's forward and backward pass, from a profiler trace.

  python -m vgpt_jax.benchmarks.op_profile [--preset=tiny] [--layers=4 --hidden=256 --heads=4 --mlp=768] \
      [--frames=16 --size=64 --batch_size=1 --attention=auto --block=512] [--top=10] [--trace_dir=DIR]

The model is the preset's, with any of --layers/--hidden/--heads/--mlp replacing its value (the line above,
with them, is the dims of issue 11's side-by-side benchmark).

Runs `jax.value_and_grad(train_step.loss_fn)` under `jax.profiler.trace` and
joins the trace's op events with the compiled HLO (each op's shape and the
JAX source op it came from). Backward ops are those JAX's autodiff produced
(`transpose(jvp(...))` in their name) or a custom VJP's backward. Prints the
time per category (attention, matmuls, what the layer scan stacks and slices,
the rest) and the top ops of each pass. Times are summed over the calls of
each op (e.g. one call per layer) and averaged over `--repeats` runs; the
trace adds some overhead, so the total is a little above the plain step time.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import tempfile

import jax

from vgpt_jax import parallel, train_step
from vgpt_jax.benchmarks.train_step import step_config
from vgpt_jax.run import make_run

_OP = re.compile(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+) (\S+?)\(")
_NAME = re.compile(r'op_name="([^"]*)"')


def profile_config(args: argparse.Namespace):
  dims = dict(num_layers=args.layers, hidden=args.hidden, num_heads=args.heads, mlp_dim=args.mlp)
  dims = {key: value for key, value in dims.items() if value}  # unset: the preset's
  return step_config(
    args.preset, args.frames, args.size, args.batch_size, attention=args.attention, attention_block=args.block, **dims
  )


def hlo_ops(compiled: jax.stages.Compiled) -> dict[str, tuple[str, str]]:
  """Op name -> (result shape, JAX source op) for every instruction of the compiled program."""
  ops = {}
  for line in compiled.as_text().splitlines():
    m = _OP.match(line)
    if m:
      source = _NAME.search(line)
      ops[m.group(1)] = (m.group(2), source.group(1) if source else "")
  return ops


def traced_times(compiled: jax.stages.Compiled, args: tuple, repeats: int, trace_dir: str | None) -> dict[str, float]:
  """Op name -> seconds per run, from the trace of `repeats` runs."""
  jax.block_until_ready(compiled(*args))
  trace_dir = trace_dir or tempfile.mkdtemp(prefix="vgpt_op_profile_")
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for _ in range(repeats):
      jax.block_until_ready(compiled(*args))
  path = sorted(glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True))[-1]
  with gzip.open(path) as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  times: dict[str, float] = collections.Counter()
  for e in events:
    if e.get("ph") == "X":
      times[e["name"]] += e.get("dur", 0) / 1e6 / repeats
  return times


def category(source: str) -> str:
  """attention (the attention kernel's own ops), matmul, scan (stacking/slicing per layer), or other."""
  if re.search(r"/attn/.*(while|hqk|bhq|exp|_where|reduce_max|log)", source):  # not the projections, not RoPE
    return "attention"
  if "dot_general" in source:
    return "matmul"
  if re.search(r"dynamic_(update_)?(index|slice)", source) and "/attn/" not in source:
    return "scan"
  return "other"


def is_backward(source: str) -> bool:
  return "transpose(" in source  # autodiff's transpose of the forward, custom VJP backward passes included


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--preset", default="tiny")
  parser.add_argument("--layers", type=int, default=None, help="default: the preset's")
  parser.add_argument("--hidden", type=int, default=None, help="default: the preset's")
  parser.add_argument("--heads", type=int, default=None, help="default: the preset's")
  parser.add_argument("--mlp", type=int, default=None, help="default: the preset's")
  parser.add_argument("--frames", type=int, default=16)
  parser.add_argument("--size", type=int, default=64, help="square frame size in pixels")
  parser.add_argument("--batch_size", type=int, default=1)
  parser.add_argument("--attention", default="auto")
  parser.add_argument("--block", type=int, default=512)
  parser.add_argument("--top", type=int, default=10)
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--trace_dir", default=None, help="keep the trace here (open it in Perfetto or XProf)")
  args = parser.parse_args()

  config = profile_config(args)
  run = make_run(config)
  mesh = parallel.make_mesh(config.mesh)
  state = train_step.create_state(run, mesh)
  inputs = jax.random.uniform(jax.random.key(0), run.input_shape(args.batch_size), minval=-1)
  keys = jax.random.split(jax.random.key(1), args.batch_size)
  grad_fn = jax.jit(lambda p, x, k: jax.value_and_grad(train_step.loss_fn)(p, run, x, k))
  compiled = grad_fn.lower(state.params, inputs, keys).compile()
  ops = hlo_ops(compiled)
  times = {name: t for name, t in traced_times(compiled, (state.params, inputs, keys), args.repeats,
                                                args.trace_dir).items() if name in ops}  # fmt: skip

  m = config.model
  print(
    f"\n{jax.devices()[0].device_kind}, jax {jax.__version__}; {m.num_layers} layers, hidden {m.hidden}, "
    f"{m.num_heads} heads, MLP {m.mlp_dim}; {run.layout.length} tokens x batch {args.batch_size}; "
    f"attention {m.attention} (block {m.attention_block}); {m.dtype}"
  )
  by_category: dict[tuple[str, str], float] = collections.Counter()
  for name, t in times.items():
    source = ops[name][1]
    by_category[("backward" if is_backward(source) else "forward", category(source))] += t
  total = sum(times.values())
  print(f"\nop time {total * 1e3:.0f} ms per forward+backward")
  print("| pass | attention (ms) | matmul (ms) | scan (ms) | other (ms) | total (ms) |")
  print("|---|---|---|---|---|---|")
  for p in ("forward", "backward"):
    cells = [by_category[(p, c)] * 1e3 for c in ("attention", "matmul", "scan", "other")]
    print(f"| {p} | " + " | ".join(f"{x:.1f}" for x in cells) + f" | {sum(cells):.1f} |")
  for p in ("forward", "backward"):
    rows = sorted(((t, n) for n, t in times.items() if is_backward(ops[n][1]) == (p == "backward")), reverse=True)
    print(f"\ntop {args.top} ops, {p}")
    print("| ms | op | shape | category | from |")
    print("|---|---|---|---|---|")
    for t, name in rows[: args.top]:
      shape, source = ops[name]
      short = re.sub(r"^jit\([^)]*\)/", "", source)
      short = re.sub(r"(transpose\()?(jvp\()?VideoGPT\)*/", "", short).replace("decoder/while/body/closed_call/", "")
      print(f"| {t * 1e3:.1f} | {name} | {shape.split('{')[0]} | {category(source)} | {short[-90:]} |")


if __name__ == "__main__":
  main()
