"""Tiny Video-GPT on the built-in physics world: trains on 2 CPU cores in minutes.

  python -m vgpt_jax.train --config=configs/tiny.py --workdir=/tmp/vgpt_tiny
Any field can be overridden, e.g. --config.train.steps=50.
"""

import ml_collections

from configs import base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = base.get_config(arg)
  c.data.height = c.data.width = 32
  c.data.num_frames = 8
  c.tokenizer.downsample = 4  # 32x32x3 frame -> 8x8x48 latent -> 16 tokens of patch 2
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 100
  c.train.steps = 600
  c.train.batch_size = 16
  return c
