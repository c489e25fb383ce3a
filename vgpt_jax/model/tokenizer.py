"""Frames <-> latents. Tiny runs use pixels folded into channels; real runs use the
SDXL VAE per frame (SPEC section 2). Both implement `latent_shape`, `encode`, `decode`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections

from vgpt_jax.model.vae import AutoencoderKL, DiagonalGaussian, VaeConfig, load_vae

TOKENIZERS = ("pixel", "vae")
DEFAULT_FRAMES_PER_CHUNK = 8


@jax.tree_util.register_dataclass  # no leaves: a jitted function can take it as an argument
@dataclasses.dataclass(frozen=True)
class PixelTokenizer:
  """Space-to-depth by `downsample`: [..., H, W, 3] in [-1, 1] -> [..., H/f, W/f, 3 f^2].

  It plays the VAE's role (a spatial down-sampling with more channels) with no
  parameters, so tiny models train on raw pixels and decode exactly.
  """

  downsample: int = dataclasses.field(default=4, metadata=dict(static=True))
  channels: int = dataclasses.field(default=3, metadata=dict(static=True))

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


def map_in_chunks(fn: Callable[[jax.Array], Any], x: jax.Array, chunk: int) -> Any:
  """fn over x [N, ...] in sequential chunks of `chunk` rows (chunk <= 0: all at once); outputs concatenated.

  `lax.map` lowers to one XLA while loop: the body is compiled once whatever N is,
  and only one chunk's activations are live at a time. A Python loop inside jit
  would unroll N/chunk copies of the VAE (compile time grows with N) and leave
  XLA free to overlap chunks, so it would bound neither. A last partial chunk runs
  once more outside the loop, so N need not be a multiple of `chunk`.
  """
  n = x.shape[0]
  if chunk <= 0 or n <= chunk:
    return fn(x)
  full = n - n % chunk
  head = jax.lax.map(fn, x[:full].reshape(n // chunk, chunk, *x.shape[1:]))
  head = jax.tree.map(lambda a: a.reshape(full, *a.shape[2:]), head)
  if full == n:
    return head
  return jax.tree.map(lambda a, b: jnp.concatenate([a, b]), head, fn(x[full:]))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class VaeTokenizer:
  """Per-frame SDXL-style VAE: [..., H, W, 3] in [-1, 1] <-> latents [..., H/8, W/8, 4], z = (mean - shift) * scale.

  Frames of any leading shape are flattened into one batch and encoded
  `frames_per_chunk` at a time. It is a pytree (params are its leaves, the rest
  static), so it can be passed into a jitted function as an argument; closing over
  it instead bakes the weights into the compiled program as constants.
  """

  params: Any
  config: VaeConfig = dataclasses.field(metadata=dict(static=True))
  frames_per_chunk: int = dataclasses.field(default=DEFAULT_FRAMES_PER_CHUNK, metadata=dict(static=True))

  @classmethod
  def from_pretrained(cls, directory: str | Path, frames_per_chunk: int = DEFAULT_FRAMES_PER_CHUNK) -> VaeTokenizer:
    """Load a diffusers-format AutoencoderKL directory (strict; see `vae.load_vae`)."""
    config, params = load_vae(directory)
    return cls(jax.tree.map(jnp.asarray, params), config, frames_per_chunk)

  @property
  def downsample(self) -> int:
    return self.config.downsample

  @property
  def _shift(self) -> float:
    return self.config.shift_factor or 0.0

  def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
    f = self.downsample
    return height // f, width // f, self.config.latent_channels

  def posterior(self, frames: jax.Array) -> DiagonalGaussian:
    """Unscaled posterior of each frame: frames [..., H, W, 3] -> mean, logvar [..., h, w, C]."""
    *lead, h, w, c = frames.shape
    module = AutoencoderKL(self.config)
    encode = lambda x: module.apply({"params": self.params}, x, method=AutoencoderKL.encode)
    post = map_in_chunks(encode, frames.reshape(-1, h, w, c).astype(jnp.float32), self.frames_per_chunk)
    return jax.tree.map(lambda a: a.reshape(*lead, *a.shape[1:]), post)

  def encode(self, frames: jax.Array, key: jax.Array | None = None) -> jax.Array:
    """frames [..., H, W, 3] in [-1, 1] -> scaled latents [..., h, w, C]: the posterior mean, or a sample with `key`."""
    post = self.posterior(frames)
    z = post.mode() if key is None else post.sample(key)
    return (z - self._shift) * self.config.scaling_factor

  def decode(self, latents: jax.Array) -> jax.Array:
    """Scaled latents [..., h, w, C] -> frames [..., h f, w f, 3] (not clipped)."""
    *lead, h, w, c = latents.shape
    module = AutoencoderKL(self.config)
    decode = lambda z: module.apply({"params": self.params}, z, method=AutoencoderKL.decode)
    z = latents.reshape(-1, h, w, c).astype(jnp.float32) / self.config.scaling_factor + self._shift
    frames = map_in_chunks(decode, z, self.frames_per_chunk)
    return frames.reshape(*lead, *frames.shape[1:])


Tokenizer = PixelTokenizer | VaeTokenizer


def describe(tokenizer: Tokenizer, height: int, width: int) -> dict[str, Any]:
  """What determines a tokenizer's latents of height x width frames (stored with pre-encoded latents)."""
  out: dict[str, Any] = {
    "kind": "pixel" if isinstance(tokenizer, PixelTokenizer) else "vae",
    "downsample": tokenizer.downsample,
    "latent_shape": list(tokenizer.latent_shape(height, width)),
  }
  if isinstance(tokenizer, VaeTokenizer):
    out.update(scaling_factor=tokenizer.config.scaling_factor, shift_factor=tokenizer.config.shift_factor)
  return out


def tokenizer_config(**overrides: Any) -> ml_collections.ConfigDict:
  """`config.tokenizer`. pixel: frames folded into channels (tiny runs). vae: the SDXL AutoencoderKL from a
  diffusers-format directory (vae_path; downsample must be 8), encoding frames_per_chunk frames per call."""
  cfg = ml_collections.ConfigDict(
    dict(kind="pixel", downsample=4, vae_path="", frames_per_chunk=DEFAULT_FRAMES_PER_CHUNK)
  )
  cfg.update(overrides)
  return cfg


def make_tokenizer(tokenizer_cfg: ml_collections.ConfigDict) -> Tokenizer:
  """The tokenizer of `config.tokenizer` (`tokenizer_config`)."""
  if tokenizer_cfg.kind == "pixel":
    return PixelTokenizer(downsample=tokenizer_cfg.downsample)
  if tokenizer_cfg.kind == "vae":
    path = tokenizer_cfg.vae_path
    if not path:
      raise ValueError("tokenizer.kind='vae' needs tokenizer.vae_path (a diffusers-format AutoencoderKL directory)")
    tokenizer = VaeTokenizer.from_pretrained(path, tokenizer_cfg.frames_per_chunk)
    want = tokenizer_cfg.downsample
    if want != tokenizer.downsample:
      # The config's frame-size checks use tokenizer.downsample; it must describe the VAE actually loaded.
      raise ValueError(f"tokenizer.downsample={want} but the VAE at {path} downsamples by {tokenizer.downsample}")
    return tokenizer
  raise ValueError(f"unknown tokenizer kind {tokenizer_cfg.kind!r}; choose one of {TOKENIZERS}")
