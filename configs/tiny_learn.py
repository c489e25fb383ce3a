"""The learning benchmark: tiny Video-GPT trained ~30 minutes on 2 CPU cores, then evaluated.

  python -m vgpt_jax.train --config=configs/tiny_learn.py --workdir=runs/tiny_learn
  python -m vgpt_jax.evaluate --checkpoint=runs/tiny_learn

The tiny config trained longer, with an EMA of the weights for sampling.
BENCHMARKS.md records what it reached against the copy-last-frame baseline.
"""

import ml_collections

from configs import tiny


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = tiny.get_config(arg)
  c.train.steps = 2500
  c.train.ema_decay = 0.999
  c.checkpoint.every_steps = 500
  return c
