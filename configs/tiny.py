"""Tiny Video-GPT on the built-in physics world: trains on 2 CPU cores in about 8 minutes.

  python -m vgpt_jax.train --config=configs/tiny.py --workdir=/tmp/vgpt_tiny
Any field can be overridden, e.g. --config.train.steps=50.

The recipe was chosen by measured runs (BENCHMARKS.md, issue 12): with the
reference's defaults this model learns to copy the last frame; with these
choices its first predicted frame beats copying.
"""

import ml_collections

from configs import base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = base.get_config(arg)
  c.data.height = c.data.width = 32
  c.data.num_frames = 8
  c.tokenizer.downsample = 4  # 32x32x3 frame -> 8x8x48 latent -> 16 tokens of patch 2
  c.model.pos_embed_base_size = 192  # one unit per token: on a 4x4 grid the default 64 gives near-equal embeddings
  c.layout.split = "per_frame"  # every frame its own clip: each trains the next-frame prediction sampling uses
  c.diffusion.first_clip_weight = 0.1  # the first clip has no context: little to learn about motion there
  c.diffusion.timestep_shift = 3.0  # more training near pure noise, where a one-step sample starts
  c.optim.lr = 2e-3
  c.optim.warmup_steps = 200
  c.train.steps = 1000
  c.train.batch_size = 8  # at equal compute, twice the updates of batch 16 learned much more (BENCHMARKS.md)
  c.train.ema_decay = 0.99  # the sample uses the EMA of the weights
  # The world is deterministic: the x-prediction at full noise is already the next frame, and one Euler
  # step per frame scored best (more steps drift where the shifted training rarely looks).
  c.train.num_samples = 32
  c.train.sample_steps = 1
  c.train.sample_clip_frames = 1
  return c
