"""Shared test fixtures: small configs that compile quickly on CPU."""

import ml_collections
import pytest

from configs import tiny


def small_config(**overrides) -> ml_collections.ConfigDict:
  """The tiny config shrunk to the `test` model and 16x16 frames; fast to compile."""
  from vgpt_jax.model import model_config

  c = tiny.get_config()
  c.model = model_config("test")
  c.data.height = c.data.width = 16
  c.data.num_frames = 5
  c.train.batch_size = 4
  c.train.steps = 4
  c.train.num_samples = 2
  c.train.sample_context_frames = 2
  c.train.sample_steps = 3
  for key, value in overrides.items():
    target = c
    *path, leaf = key.split(".")
    for p in path:
      target = target[p]
    target[leaf] = value
  return c


@pytest.fixture
def config() -> ml_collections.ConfigDict:
  return small_config()
