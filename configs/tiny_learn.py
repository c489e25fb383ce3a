"""The learning benchmark: the tiny recipe trained for about 30 minutes on 2 CPU cores, then evaluated.

  python -m vgpt_jax.train --config=configs/tiny_learn.py --workdir=runs/tiny_learn
  python -m vgpt_jax.benchmarks.learning_curve --checkpoint=runs/tiny_learn --num_videos=256
  python -m vgpt_jax.evaluate --checkpoint=runs/tiny_learn --num_videos=256 --frames=8

`configs/tiny.py` trained longer, every checkpoint kept for the learning curve.
BENCHMARKS.md records what it reached against the copy-last-frame and linear
baselines.
"""

import ml_collections

from configs import tiny


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = tiny.get_config(arg)
  c.train.steps = 3600
  c.train.ema_decay = 0.995
  c.checkpoint.every_steps = 600
  c.checkpoint.keep_every = 600  # every checkpoint stays: one point each on the learning curve
  return c
