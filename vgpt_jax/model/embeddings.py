"""Video-GPT input and output pieces: patches, sin-cos tables, timestep MLPs, final layer."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def patchify(latents: jax.Array, patch: int) -> jax.Array:
  """[..., h, w, C] -> [..., (h/p)*(w/p), p*p*C], patches in row-major order."""
  *lead, h, w, c = latents.shape
  x = latents.reshape(*lead, h // patch, patch, w // patch, patch, c)
  x = jnp.moveaxis(x, -4, -3)  # [..., h/p, w/p, p, p, C]
  return x.reshape(*lead, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(tokens: jax.Array, patch: int, height: int, width: int) -> jax.Array:
  """Inverse of `patchify`: [..., (h/p)*(w/p), p*p*C] -> [..., h, w, C]."""
  *lead, _, features = tokens.shape
  c = features // (patch * patch)
  x = tokens.reshape(*lead, height // patch, width // patch, patch, patch, c)
  x = jnp.moveaxis(x, -3, -4)  # [..., h/p, p, w/p, p, C]
  return x.reshape(*lead, height, width, c)


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
  """[M, dim]: sin of pos * omega_i then cos, omega_i = 10000^(-i / (dim/2))."""
  omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2))
  angles = pos.reshape(-1)[:, None] * omega[None, :]
  return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d_table(dim: int, grid_h: int, grid_w: int, max_size: int = 192, base_size: int = 64) -> np.ndarray:
  """float32 [grid_h * grid_w, dim] 2D sin-cos embedding (DiT/SD3 style).

  Built on a max_size x max_size grid whose coordinates are scaled by
  base_size / max_size, then centre-cropped to the frame's patch grid, so every
  resolution shares one coordinate system. First half of the channels encodes
  the column, second half the row.
  """
  if dim % 4:
    raise ValueError(f"hidden size {dim} must be divisible by 4 for the 2D sin-cos table")
  if grid_h > max_size or grid_w > max_size:
    raise ValueError(f"patch grid {grid_h}x{grid_w} exceeds pos_embed_max_size={max_size}")
  # Coordinates rounded to float32 first, as the reference computes its table (so the tables agree bit for bit).
  coords = (np.arange(max_size, dtype=np.float32) / np.float32(max_size / base_size)).astype(np.float64)
  top, left = (max_size - grid_h) // 2, (max_size - grid_w) // 2
  rows, cols = np.meshgrid(coords[top : top + grid_h], coords[left : left + grid_w], indexing="ij")
  table = np.concatenate([_sincos_1d(dim // 2, cols), _sincos_1d(dim // 2, rows)], axis=1)
  return table.astype(np.float32)


def timestep_features(t: jax.Array, dim: int = 256, max_period: float = 10000.0) -> jax.Array:
  """[..., dim] sinusoidal features of (fractional) timesteps t [...]: cos then sin."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[..., None] * freqs
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class TimestepEmbedder(nn.Module):
  """t -> sinusoidal(freq_dim) -> Dense -> SiLU -> Dense (weights N(0, 0.02))."""

  hidden: int
  freq_dim: int = 256
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, t: jax.Array) -> jax.Array:
    init = nn.initializers.normal(stddev=0.02)

    def dense(name: str, axes: tuple[str, str]) -> nn.Dense:
      return nn.Dense(
        self.hidden,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name=name,
        kernel_init=nn.with_logical_partitioning(init, axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]),
      )

    x = dense("fc1", ("freq", "embed"))(timestep_features(t, self.freq_dim))
    return dense("fc2", ("embed", "embed_out"))(nn.silu(x))


class PatchEmbed(nn.Module):
  """Linear map of flattened p x p x C patches to the hidden size (a strided conv)."""

  hidden: int
  zero_init: bool = False
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, patches: jax.Array) -> jax.Array:
    init = nn.initializers.zeros if self.zero_init else nn.initializers.xavier_uniform()
    return nn.Dense(
      self.hidden,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=nn.with_logical_partitioning(init, ("patch", "embed")),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
    )(patches)


class FinalLayer(nn.Module):
  """LayerNorm (no affine) + adaLN shift/scale from a timestep vector + linear; zero-init.

  Computed in float32: it is cheap and it is the prediction.
  """

  out_features: int
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, cond: jax.Array) -> jax.Array:
    """x: [..., S, D] tokens; cond: [..., D] one vector per frame. Returns [..., S, out]."""
    hidden = x.shape[-1]
    zeros = nn.initializers.zeros
    mod = nn.Dense(
      2 * hidden,
      param_dtype=self.param_dtype,
      name="ada_ln",
      kernel_init=nn.with_logical_partitioning(zeros, ("embed", "embed_out")),
      bias_init=nn.with_logical_partitioning(zeros, ("embed_out",)),
    )(nn.silu(cond.astype(jnp.float32)))
    shift, scale = jnp.split(mod, 2, axis=-1)
    h = nn.LayerNorm(epsilon=1e-6, use_bias=False, use_scale=False, name="norm")(x.astype(jnp.float32))
    h = h * (1 + scale[..., None, :]) + shift[..., None, :]
    return nn.Dense(
      self.out_features,
      param_dtype=self.param_dtype,
      name="linear",
      kernel_init=nn.with_logical_partitioning(zeros, ("embed", "patch")),
      bias_init=nn.with_logical_partitioning(zeros, ("patch",)),
    )(h)
