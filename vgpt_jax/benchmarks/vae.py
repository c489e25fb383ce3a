"""SDXL VAE encode rate: frames/s of the jit-compiled per-frame VAE tokenizer, random weights (no download).

  python -m vgpt_jax.benchmarks.vae [--sizes=176x320,88x160] [--frames=4] [--frames_per_chunk=0] \
      [--repeats=2] [--decode]

The architecture is the real SDXL VAE's (block_out_channels 128/256/512/512, two
ResNet blocks per level, 83.7M parameters); only the weights are random, which
does not change the cost. Prints a markdown table. GFLOP/frame is XLA's count
for one frame; compiled GiB is the call's temporaries (what frames_per_chunk bounds).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from vgpt_jax.benchmarks import median_seconds
from vgpt_jax.model.tokenizer import VaeTokenizer
from vgpt_jax.model.vae import AutoencoderKL, VaeConfig

SDXL = VaeConfig()  # the defaults are SDXL's architecture and scaling factor


def random_tokenizer(frames_per_chunk: int) -> VaeTokenizer:
  f = SDXL.downsample
  params = jax.jit(AutoencoderKL(SDXL).init)(jax.random.key(0), jnp.zeros((1, f, f, 3)))["params"]
  return VaeTokenizer(params, SDXL, frames_per_chunk)


def run(tokenizer: VaeTokenizer, height: int, width: int, args: argparse.Namespace) -> dict:
  frames = jax.random.uniform(jax.random.key(1), (args.frames, height, width, 3), minval=-1)
  encode = jax.jit(lambda t, x: t.encode(x))
  t0 = time.perf_counter()
  compiled = encode.lower(tokenizer, frames).compile()
  compile_s = time.perf_counter() - t0
  memory = compiled.memory_analysis()
  one = VaeTokenizer(tokenizer.params, tokenizer.config, 0)
  cost = encode.lower(one, frames[:1]).compile().cost_analysis()
  flops = float((cost[0] if isinstance(cost, list) else cost).get("flops", float("nan")))
  encode_s = median_seconds(compiled, tokenizer, frames, repeats=args.repeats)
  h, w, c = tokenizer.latent_shape(height, width)
  row = {
    "frame": f"{height}x{width}",
    "latent": f"{h}x{w}x{c}",
    "frames/call": args.frames,
    "chunk": tokenizer.frames_per_chunk or args.frames,
    "compile (s)": f"{compile_s:.1f}",
    "encode (s/call)": f"{encode_s:.2f}",
    "encode frames/s": f"{args.frames / encode_s:.2f}",
    "GFLOP/frame": f"{flops / 1e9:.0f}",
    "encode TFLOP/s": f"{flops * args.frames / encode_s / 1e12:.3f}",
    "compiled GiB": f"{memory.temp_size_in_bytes / 2**30:.2f}",
  }
  if args.decode:
    z = compiled(tokenizer, frames)
    decode = jax.jit(lambda t, x: t.decode(x))
    decode_s = median_seconds(decode, tokenizer, z, repeats=args.repeats)
    row["decode frames/s"] = f"{args.frames / decode_s:.2f}"
  return row


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--sizes", default="176x320,88x160", help="comma-separated HxW frame sizes")
  parser.add_argument("--frames", type=int, default=4, help="frames encoded per jitted call")
  parser.add_argument("--frames_per_chunk", type=int, default=0, help="0: all frames of a call at once")
  parser.add_argument("--repeats", type=int, default=2, help="timed calls after one warm-up (median)")
  parser.add_argument("--decode", action="store_true", help="also time decoding the latents")
  args = parser.parse_args()
  tokenizer = random_tokenizer(args.frames_per_chunk)
  n = sum(x.size for x in jax.tree.leaves(tokenizer.params))
  print(f"SDXL-shaped VAE, {n / 1e6:.1f}M parameters, float32, {jax.devices()[0].device_kind}")
  rows = []
  for size in args.sizes.split(","):
    height, width = map(int, size.lower().split("x"))
    rows.append(run(tokenizer, height, width, args))
    print(rows[-1], flush=True)
  print("\n| " + " | ".join(rows[0]) + " |\n|" + "---|" * len(rows[0]))
  for row in rows:
    print("| " + " | ".join(str(v) for v in row.values()) + " |")


if __name__ == "__main__":
  main()
