"""What a checkpoint needs to be used: the model, its tokenizer and its token layout, built from the config once.

Sampling, evaluation, export and conversion need only a `Run`; training adds
the optimizer, the train state and the step (train_step.py), which nothing
that samples imports.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vgpt_jax.data import latents as latents_lib
from vgpt_jax.data.buckets import config_buckets
from vgpt_jax.data.pipeline import input_key
from vgpt_jax.layout import Layout, context_parallel_layout, training_layout
from vgpt_jax.model import VideoGPT
from vgpt_jax.model import tokenizer as tokenizer_lib
from vgpt_jax.model.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class Run:
  """Everything static a run derives from its config once."""

  config: ml_collections.ConfigDict
  model: VideoGPT
  tokenizer: Tokenizer  # pixel or VAE; the VAE weights are closed over (pre-encoded latents avoid that)
  layout: Layout
  latent_shape: tuple[int, int, int]  # (h, w, C)
  inputs: str  # "video": batches of frames, encoded in the step; "latents": pre-encoded (no tokenizer in the step)

  def input_shape(self, batch_size: int) -> tuple[int, ...]:
    """Shape of a batch of model inputs: frames [B, N, H, W, 3] or latents [B, N, h, w, C]."""
    d = self.config.data
    per_frame = self.latent_shape if self.inputs == "latents" else (d.height, d.width, 3)
    return (batch_size, d.num_frames, *per_frame)


def model_layout(num_frames: int, tokens_per_frame: int, context: int = 1) -> Layout:
  """The training layout; with context parallelism (mesh.context > 1) in the order that balances the devices."""
  layout = training_layout(num_frames, tokens_per_frame)
  return context_parallel_layout(layout, context) if context > 1 else layout


def _shaped(config: ml_collections.ConfigDict, tokenizer: Tokenizer) -> dict[str, Any]:
  """The fields of a Run that follow the frame shape (data.height, data.width, data.num_frames)."""
  h, w, c = tokenizer.latent_shape(config.data.height, config.data.width)
  p = config.model.patch_size
  layout = model_layout(config.data.num_frames, (h // p) * (w // p), config.mesh.context)
  return {"config": config, "layout": layout, "latent_shape": (h, w, c)}


def make_run(config: ml_collections.ConfigDict) -> Run:
  """The run of `config`: its model, tokenizer and layout (the stored latents must be this tokenizer's)."""
  tokenizer = tokenizer_lib.make_tokenizer(config.tokenizer)
  inputs = input_key(config.data)
  if inputs == "latents":  # the stored latents must be this tokenizer's (it decodes the samples)
    description = tokenizer_lib.describe(tokenizer, config.data.height, config.data.width)
    latents_lib.check_tokenizer(config.data.latents_path, description)
  model = VideoGPT.from_config(config.model)
  return Run(model=model, tokenizer=tokenizer, inputs=inputs, **_shaped(config, tokenizer))


def run_at(run: Run, height: int, width: int, num_frames: int) -> Run:
  """The run with frames of height x width and clips of num_frames (a bucket's): the same model, parameters and
  tokenizer (its weights are not loaded again), with the layout, RoPE positions and sin-cos table of that patch
  grid. The run itself when it already has that shape."""
  d = run.config.data
  if (d.height, d.width, d.num_frames) == (height, width, num_frames):
    return run
  config = run.config.copy_and_resolve_references()
  config.data.height, config.data.width, config.data.num_frames = height, width, num_frames
  return dataclasses.replace(run, **_shaped(config, run.tokenizer))


def bucket_runs(run: Run) -> list[Run]:
  """One run per bucket of data.buckets, in order (the run itself at its own shape); [run] without buckets."""
  n = run.config.data.num_frames
  return [run_at(run, b.height, b.width, b.frames or n) for b in config_buckets(run.config.data)] or [run]


def init_params(run: Run, key: jax.Array) -> Any:
  """Boxed (logically annotated) parameters; shapes only under eval_shape."""
  n = run.config.data.num_frames
  latents = jnp.zeros((1, n) + run.latent_shape, jnp.float32)
  split = jnp.zeros((1, n), jnp.int32)
  return run.model.init(key, latents, latents, jnp.zeros((1, n)), split, run.layout)["params"]


def abstract_params(run: Run) -> Any:
  """Shapes and dtypes of the (unboxed) parameters; nothing is allocated."""
  return nn.unbox(jax.eval_shape(functools.partial(init_params, run), jax.random.key(0)))
