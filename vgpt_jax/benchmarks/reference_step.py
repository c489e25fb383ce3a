"""The project's train step next to a reference-style PyTorch step, same dims, same mask, same machine.

  python -m vgpt_jax.benchmarks.reference_step [--frames=16 --size=64 --clips=4,4,4,4] \
      [--layers=4 --hidden=256 --heads=4 --mlp=768] [--attention=auto] [--repeats=7]

The PyTorch step is built as the reference trains (SPEC sections 2-5): two
patch embedders (Conv2d), a time token, learned special tokens and a fixed
sin-cos table in; transformers' `Phi3Model` over the reference's interleaved
order N(B1) C(B1) ... N(BK), masked by a dense boolean 4D mask through SDPA;
the noisy patches out through the adaLN final layer; x-prediction MSE,
backward, grad-norm clipping and AdamW. Both steps see the same clip split
(`--clips`, which the project's config also fixes), the same latent shape and
fp32. They are run alternately, so a machine that slows down slows both; the
table gives each median and the ratio, and the project's loss forward pass
alone next to what its backward pass adds (backward = forward+backward minus
forward), timed in the same rotation.

torch and transformers come from requirements-test.txt and are imported here
only: the package itself never needs them.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import jax
import ml_collections
import numpy as np

from vgpt_jax import parallel, train_step
from vgpt_jax.attention.mask import dense_mask
from vgpt_jax.benchmarks.train_step import step_config
from vgpt_jax.layout import NOISY, PATCH, fixed_split, interleaved_layout, token_ids
from vgpt_jax.model.embeddings import sincos_2d_table
from vgpt_jax.run import make_run


def project_config(args: argparse.Namespace) -> ml_collections.ConfigDict:
  """The project's config at the benchmark's dims, with the benchmark's fixed clip split."""
  c = step_config(
    "tiny", args.frames, args.size, args.batch_size, num_layers=args.layers, hidden=args.hidden,
    num_heads=args.heads, mlp_dim=args.mlp, attention=args.attention,
  )  # fmt: skip
  c.layout.split = "fixed"
  c.layout.fixed_clip_sizes = tuple(args.clip_sizes)
  c.train.ema_decay = 0.0  # the reference step keeps no EMA
  return c


def _import_torch():
  try:
    import torch
    import transformers
  except ImportError as e:  # pragma: no cover - depends on the environment
    raise SystemExit(
      f"this benchmark needs torch and transformers ({e}); install them with `pip install -r requirements-test.txt`"
    ) from e
  return torch, transformers


def torch_step_fn(args: argparse.Namespace, latent_shape: tuple[int, int, int]):
  """A reference-style PyTorch train step; returns (step(), sequence length)."""
  torch, transformers = _import_torch()
  nn = torch.nn
  h, w, c = latent_shape
  p, d, n = 2, args.hidden, args.frames
  s = (h // p) * (w // p)
  layout = interleaved_layout(args.clip_sizes, s)
  ids = token_ids(layout, fixed_split(args.clip_sizes)[None])
  mask = torch.from_numpy(np.array(dense_mask(ids, ids)))[:, None]  # bool [1, 1, T, T], True = attend
  position = torch.from_numpy(layout.position.astype(np.int64))[None]
  noisy_patches = torch.from_numpy(np.nonzero((layout.stream == NOISY) & (layout.kind == PATCH))[0])
  source = torch.from_numpy(layout.source.astype(np.int64))

  def timestep_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(256, d), nn.SiLU(), nn.Linear(d, d))

  def timestep_features(t):
    freqs = torch.exp(-math.log(10000.0) * torch.arange(128, dtype=torch.float32) / 128)
    args_ = t[..., None].float() * freqs
    return torch.cat([torch.cos(args_), torch.sin(args_)], dim=-1)

  class ReferenceStyle(nn.Module):
    def __init__(self):
      super().__init__()
      self.x_embedder = nn.Conv2d(c, d, p, p)  # noisy frames
      self.input_x_embedder = nn.Conv2d(c, d, p, p)  # clean frames
      self.time_token = timestep_mlp()
      self.t_embedder = timestep_mlp()
      self.special = nn.Parameter(torch.randn(3, d) * 0.02)  # <img>, </img>, <diff>
      self.register_buffer("pos_embed", torch.from_numpy(sincos_2d_table(d, h // p, w // p)))
      config = transformers.Phi3Config(
        vocab_size=8,
        hidden_size=d,
        intermediate_size=args.mlp,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=max(4096, int(layout.position.max()) + 1),
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        attention_dropout=0.0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
      )
      config._attn_implementation = "sdpa"
      self.llm = transformers.Phi3Model(config)
      self.ada = nn.Linear(d, 2 * d)
      self.norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
      self.linear = nn.Linear(d, p * p * c)

    def embed(self, conv, frames):  # [B, N, C, h, w] -> [B, N*S, D]
      b = frames.shape[0]
      x = conv(frames.flatten(0, 1)).flatten(2).transpose(1, 2)  # [B*N, S, D]
      return (x + self.pos_embed).reshape(b, n * s, d)

    def forward(self, clean, noisy, t):
      b = clean.shape[0]
      table = torch.cat(
        [
          self.embed(self.input_x_embedder, clean),
          self.embed(self.x_embedder, noisy),
          self.time_token(timestep_features(t)),
          self.special[[0, 1, 2]].expand(b, 3, d),
        ],
        dim=1,
      )
      x = table.index_select(1, source)  # the interleaved sequence, as the layout orders it
      x = self.llm(inputs_embeds=x, attention_mask=mask.expand(b, -1, -1, -1), position_ids=position).last_hidden_state
      x = x.index_select(1, noisy_patches).reshape(b, n, s, d)
      shift, scale = self.ada(nn.functional.silu(self.t_embedder(timestep_features(t)))).chunk(2, dim=-1)
      return self.linear(self.norm(x) * (1 + scale[:, :, None]) + shift[:, :, None])  # [B, N, S, p*p*C]

  torch.manual_seed(0)
  model = ReferenceStyle()
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.1)
  b = args.batch_size
  x1 = torch.randn(b, n, c, h, w)
  block = torch.from_numpy(fixed_split(args.clip_sizes).astype(np.int64))

  def patches(x):  # [B, N, C, h, w] -> [B, N, S, p*p*C]
    x = x.reshape(b, n, c, h // p, p, w // p, p).permute(0, 1, 3, 5, 4, 6, 2)
    return x.reshape(b, n, s, p * p * c)

  def step():
    t = torch.rand(b, len(args.clip_sizes))[:, block]  # one t per clip
    eps = torch.randn_like(x1)
    x_t = t[..., None, None, None] * x1 + (1 - t[..., None, None, None]) * eps
    t_in = 0.9 + 0.1 * torch.rand(b, n)
    clean = t_in[..., None, None, None] * x1 + (1 - t_in[..., None, None, None]) * torch.randn_like(x1)
    loss = torch.mean((model(clean, x_t, t) - patches(x1)) ** 2)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return float(loss.detach())

  return step, layout.length


def project_step_fn(args: argparse.Namespace):
  """The project's compiled train step at the same dims, and its loss's forward and forward+backward passes alone.

  Returns (step(), {pass name: run()}, sequence length, latent shape).
  """
  config = project_config(args)
  mesh = parallel.make_mesh(config.mesh)
  run = make_run(config)
  compiled = train_step.compile_train_step(run, mesh)
  state = train_step.create_state(run, mesh)
  frames = jax.device_put(
    jax.random.uniform(jax.random.key(0), run.input_shape(args.batch_size), minval=-1), parallel.batch_sharding(mesh)
  )
  skips = jax.device_put(train_step.no_skips(args.batch_size), parallel.batch_sharding(mesh))

  def step():
    nonlocal state
    state, metrics = compiled(state, frames, skips)
    return float(jax.block_until_ready(metrics["loss"]))

  keys = jax.random.split(jax.random.key(1), args.batch_size)
  forward = jax.jit(lambda p, x, k: train_step.loss_fn(p, run, x, k))
  forward_backward = jax.jit(jax.value_and_grad(lambda p, x, k: train_step.loss_fn(p, run, x, k)))
  passes = {
    "forward": lambda: jax.block_until_ready(forward(state.params, frames, keys)),
    "forward+backward": lambda: jax.block_until_ready(forward_backward(state.params, frames, keys)),
  }
  return step, passes, run.layout.length, run.latent_shape


def alternate(steps: dict, repeats: int) -> dict[str, list[float]]:
  """Seconds per call of each step, calling them in turn `repeats` times after one warm-up call each."""
  for fn in steps.values():
    fn()
  times: dict[str, list[float]] = {name: [] for name in steps}
  for _ in range(repeats):
    for name, fn in steps.items():
      t0 = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t0)
  return times


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--frames", type=int, default=16)
  parser.add_argument("--size", type=int, default=64, help="square frame size in pixels (64: 64 tokens per frame)")
  parser.add_argument("--clips", default="", help="clip sizes, e.g. 4,4,4,4 (default: clips of 4 frames)")
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--hidden", type=int, default=256)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--mlp", type=int, default=768)
  parser.add_argument("--batch_size", type=int, default=1)
  parser.add_argument("--attention", default="auto", help="the project's attention path (config.model.attention)")
  parser.add_argument("--repeats", type=int, default=7, help="alternated timed calls of each step (median reported)")
  args = parser.parse_args()
  args.clip_sizes = [int(x) for x in args.clips.split(",")] if args.clips else [4] * (args.frames // 4)
  if sum(args.clip_sizes) != args.frames:
    parser.error(f"--clips {args.clip_sizes} must add up to --frames={args.frames}")

  project, passes, project_tokens, latent_shape = project_step_fn(args)
  reference, reference_tokens = torch_step_fn(args, latent_shape)
  times = alternate({"vgpt_jax": project, "pytorch": reference, **passes}, args.repeats)
  median = {name: float(np.median(t)) for name, t in times.items()}
  jax_s, torch_s = median["vgpt_jax"], median["pytorch"]
  forward_s = median["forward"]
  backward_s = median["forward+backward"] - forward_s
  import torch

  print(
    f"\n{os.cpu_count()} CPU cores; jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} "
    f"({torch.get_num_threads()} threads); fp32, batch {args.batch_size}, {args.layers} layers, hidden {args.hidden}, "
    f"{args.heads} heads, MLP {args.mlp}, clips {args.clip_sizes}"
  )
  print(
    "| frames | tokens/frame | project tokens | project attention | project step (s) | pytorch tokens | "
    "pytorch step (s) | pytorch / project | project forward (s) | project backward / forward |"
  )
  print("|---|---|---|---|---|---|---|---|---|---|")
  print(
    f"| {args.frames} | {latent_shape[0] * latent_shape[1] // 4} | {project_tokens} | {args.attention} | {jax_s:.3f} | "
    f"{reference_tokens} | {torch_s:.3f} | {torch_s / jax_s:.2f}x | {forward_s:.3f} | {backward_s / forward_s:.2f} |"
  )


if __name__ == "__main__":
  main()
