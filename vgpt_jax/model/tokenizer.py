"""Frames <-> latents. Tiny runs use pixels folded into channels; the SDXL VAE
(a later addition) implements the same three members.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections

TOKENIZERS = ("pixel",)


@dataclasses.dataclass(frozen=True)
class PixelTokenizer:
  """Space-to-depth by `downsample`: [..., H, W, 3] in [-1, 1] -> [..., H/f, W/f, 3 f^2].

  It plays the VAE's role (a spatial down-sampling with more channels) with no
  parameters, so tiny models train on raw pixels and decode exactly.
  """

  downsample: int = 4
  channels: int = 3

  def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
    f = self.downsample
    return height // f, width // f, self.channels * f * f

  def encode(self, frames: jax.Array) -> jax.Array:
    f = self.downsample
    *lead, h, w, c = frames.shape
    x = frames.reshape(*lead, h // f, f, w // f, f, c)
    x = jnp.moveaxis(x, -4, -3)
    return x.reshape(*lead, h // f, w // f, f * f * c)

  def decode(self, latents: jax.Array) -> jax.Array:
    f = self.downsample
    *lead, h, w, _ = latents.shape
    x = latents.reshape(*lead, h, w, f, f, self.channels)
    x = jnp.moveaxis(x, -3, -4)
    return x.reshape(*lead, h * f, w * f, self.channels)


def make_tokenizer(tokenizer_cfg: ml_collections.ConfigDict) -> PixelTokenizer:
  if tokenizer_cfg.kind == "pixel":
    return PixelTokenizer(downsample=tokenizer_cfg.downsample)
  raise ValueError(f"unknown tokenizer kind {tokenizer_cfg.kind!r}; choose one of {TOKENIZERS}")
