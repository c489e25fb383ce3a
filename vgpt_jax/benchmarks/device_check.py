"""One command that checks an accelerator end to end: attention correctness, attention speed, a train step.

  python -m vgpt_jax.benchmarks.device_check [--output=device_check.json] [--peak_tflops=989] [--toy]

Prints one table and writes the same rows as JSON. Its three parts:

1. correct: every tiled attention path this backend runs (`auto` among them:
   pallas_gpu on GPU, pallas_tpu on TPU, chunked everywhere) against the dense
   reference on fresh random inputs and random clip splits, forward and
   gradients (dq, dk, dv), at head sizes 64, 96 and 128, in bfloat16 and
   float32; the lengths are not multiples of the tiles, so padding is used.
2. attention: forward + backward time of each path and of dense (when its
   compiled memory fits) at the paper's stage-2 and stage-4 lengths (48 and
   80 frames of 220 tokens), heads of 96, TFLOP/s counting visible entries
   only; next to it the backend's dense flash attention with a causal mask at
   the same length (cuDNN on GPU, splash on TPU), TFLOP/s on its visible half.
3. train step: a bfloat16 step of the `1b` preset with its MFU (`--peak_tflops`,
   or the device's bfloat16 peak when it is in PEAK_TFLOPS).

On CPU (and with --toy) every part runs at toy sizes (head size 96 only), so
the default test suite runs this script; the figures worth recording come from an accelerator
(BENCHMARKS.md). Meant to finish within 5 minutes on one GPU or TPU.
"""

from __future__ import annotations

import argparse
import json
import time
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vgpt_jax.attention import accounting
from vgpt_jax.attention.dense import dense_attention
from vgpt_jax.attention.select import attention_path, resolve
from vgpt_jax.benchmarks import attention as attention_bench
from vgpt_jax.benchmarks import markdown_table, median_seconds
from vgpt_jax.benchmarks import train_step as step_bench
from vgpt_jax.layout import sample_splits, token_ids, training_layout

# Dense bfloat16 peak TFLOP/s per chip, by a substring of jax's device_kind (vendor datasheets).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5p": 459.0}
HEAD_DIMS = (64, 96, 128)
TOLERANCE = {"float32": 2e-4, "bfloat16": 3e-2}  # relative L2 error against dense in float32


def tiled_paths(backend: str) -> list[str]:
  """The tiled attention paths that run on `backend` (what `auto` picks there comes first)."""
  kernel = {"gpu": ["pallas_gpu"], "tpu": ["pallas_tpu"]}.get(backend, [])
  return [*kernel, "chunked"]


def _rel(a: jax.Array, b: jax.Array) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def check_path(path: str, head_dim: int, dtype: str, frames: int, tokens: int, heads: int, block: int) -> dict:
  """Relative errors of `path` against dense (float32) on one random input: forward and dq, dk, dv."""
  split_cfg = ml_collections.ConfigDict(dict(split="random", min_clips=2, max_clips=-1))
  seed = zlib.crc32(f"{path} {head_dim} {dtype}".encode()) % 1000  # fresh per case, the same every run
  ids = token_ids(training_layout(frames, tokens), sample_splits(jax.random.key(seed), 2, frames, split_cfg))
  t = ids.frame.shape[1]
  keys = jax.random.split(jax.random.key(seed + 1), 4)
  q, k, v = (jax.random.normal(key, (2, t, heads, head_dim)).astype(dtype) for key in keys[:3])
  weights = jax.random.normal(keys[3], (2, t, heads, head_dim))
  fn = attention_path(path, t, t, block)

  def outputs(attend):
    loss = lambda q, k, v: jnp.sum(attend(q, k, v).astype(jnp.float32) * weights)  # noqa: E731
    return attend(q, k, v), *jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  # Full-precision matmuls: a GPU's default TF32 or a TPU's default bf16 passes would be measured, not the path.
  with jax.default_matmul_precision("highest"):
    got = jax.jit(lambda q, k, v: outputs(lambda *x: fn.attend(*x, fn.plan(ids, ids))))(q, k, v)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    want = jax.jit(lambda q, k, v: outputs(lambda *x: dense_attention(*x, ids, ids)))(*f32)
  errors = {name: _rel(g, w) for name, g, w in zip(("out", "dq", "dk", "dv"), got, want)}
  worst = max(errors.values())
  return {
    "part": "correct",
    "path": resolve(path, t, t),
    "head_dim": head_dim,
    "dtype": dtype,
    "tokens": t,
    "max_rel_error": worst,
    "ok": bool(worst < TOLERANCE[dtype]),
  }


def causal_flash(backend: str, t: int, heads: int, head_dim: int, interpret: bool = False):
  """(name, attend) of `backend`'s own dense flash attention with a causal mask over q, k, v [1, t, heads,
  head_dim] (cuDNN on GPU, splash on TPU), or None where it has none. interpret: splash in Pallas interpret
  mode (tests on CPU)."""
  if backend == "gpu":
    return "cudnn causal", lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
  if backend != "tpu":
    return None
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

  causal = masks.MultiHeadMask([masks.CausalMask((t, t))] * heads)
  # Per sample: q, k, v [heads, t, d], q not scaled by the kernel.
  kernel = splash.make_splash_mha(causal, head_shards=1, q_seq_shards=1, interpret=interpret)

  def attend(q, k, v):
    q = q * jnp.asarray(head_dim**-0.5, q.dtype)
    return jax.vmap(kernel)(*(jnp.swapaxes(x, 1, 2) for x in (q, k, v))).swapaxes(1, 2)

  return "splash causal", attend


def flash_step(attend):
  """Forward + backward of `attend` (jitted), as the attention rows time every path."""
  return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(attend(q, k, v).astype(jnp.float32) ** 2), (0, 1, 2)))


def flash_baseline(t: int, heads: int, head_dim: int, dtype: str) -> dict | None:
  """Time and TFLOP/s (its visible half) of the backend's causal flash attention; None where it has none."""
  found = causal_flash(jax.default_backend(), t, heads, head_dim)
  if found is None:
    return None
  name, attend = found
  q, k, v = (jax.random.normal(jax.random.key(i), (1, t, heads, head_dim), dtype) for i in range(3))
  seconds = median_seconds(flash_step(attend), q, k, v)
  tflops = accounting.attention_flops(t * (t + 1) / 2, head_dim, heads) / seconds / 1e12
  return {"path": name, "time (s)": seconds, "TFLOP/s (visible)": tflops}


def attention_rows(frames_list, tokens: int, heads: int, head_dim: int, block: int, dtype: str, max_gib: float):
  for frames in frames_list:
    for path in ["dense", *tiled_paths(jax.default_backend())]:
      row = attention_bench.measure(frames, tokens, heads, head_dim, path, block, max_gib, dtype)
      yield {"part": "attention", **row}
    t = training_layout(frames, tokens).length
    baseline = flash_baseline(t, heads, head_dim, dtype)
    if baseline is not None:
      yield {"part": "attention", "frames": frames, "tokens": t, "dtype": dtype, **baseline}


def train_row(preset: str, frames: int, size: int, batch_size: int, peak_tflops: float) -> dict:
  args = argparse.Namespace(
    frames=frames, size=size, batch_size=batch_size, dtype="bfloat16", remat="full", steps=3, peak_tflops=peak_tflops
  )
  return {"part": "train step", **step_bench.measure(preset, args)}


def peak_for(device_kind: str) -> float:
  return next((v for k, v in PEAK_TFLOPS.items() if k in device_kind), 0.0)


def run(toy: bool, peak_tflops: float = 0.0) -> list[dict]:
  """Every row of the check; toy sizes run in seconds on CPU."""
  device = jax.devices()[0]
  peak = peak_tflops or peak_for(device.device_kind)
  rows = []
  frames, tokens, heads = (3, 7, 2) if toy else (4, 60, 4)
  block = 16 if toy else 128
  for path in tiled_paths(jax.default_backend()):
    for dtype in ("bfloat16", "float32"):
      for head_dim in (96,) if toy else HEAD_DIMS:
        rows.append(check_path(path, head_dim, dtype, frames, tokens, heads, block))
  if toy:
    rows += attention_rows([3], 20, 1, 96, 16, "float32", 1.0)
    rows.append(train_row("test", frames=3, size=16, batch_size=2, peak_tflops=peak))
  else:
    rows += attention_rows([48, 80], 220, 32, 96, 512, "bfloat16", 40.0)
    rows.append(train_row("1b", frames=16, size=128, batch_size=4, peak_tflops=peak))
  for row in rows:
    row["device"] = device.device_kind
  return rows


COLUMNS = ("part", "path", "preset", "frames", "tokens", "head_dim", "dtype", "max_rel_error", "ok", "time (s)",
           "step (s)", "TFLOP/s (visible)", "model TFLOP/s", "MFU", "compiled GiB")  # fmt: skip


def table(rows: list[dict]) -> str:
  return markdown_table(rows, [c for c in COLUMNS if any(c in r for r in rows)])


def main(argv: list[str] | None = None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--output", default="device_check.json", help="where the rows go as JSON")
  parser.add_argument("--peak_tflops", type=float, default=0.0, help="bf16 peak per device, for MFU")
  parser.add_argument("--toy", action="store_true", help="toy sizes (the default on CPU)")
  args = parser.parse_args(argv)
  toy = args.toy or jax.default_backend() == "cpu"
  start = time.perf_counter()
  rows = run(toy, args.peak_tflops)
  print(f"{jax.devices()[0].device_kind} x{jax.device_count()}, jax {jax.__version__}, toy={toy}, "
        f"{time.perf_counter() - start:.0f} s")  # fmt: skip
  print(table(rows))
  Path(args.output).write_text(json.dumps(rows, indent=2, default=float))
  failed = [r for r in rows if r.get("ok") is False]
  if failed:
    names = [(r["path"], r["head_dim"], r["dtype"]) for r in failed]
    raise SystemExit(f"{len(failed)} correctness checks failed (path, head dim, dtype): {names}")
  return rows


if __name__ == "__main__":
  main()
