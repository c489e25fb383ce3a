"""SDXL-style `AutoencoderKL` (diffusers layout) in Flax linen, NHWC, float32.

Video-GPT tokenizes each frame with the SDXL VAE (SPEC section 2). The module tree
mirrors diffusers' names (`encoder/down_blocks_0/resnets_1/conv1`, ...) so a
diffusers checkpoint maps onto it name by name; `load_vae` does that mapping and
refuses any checkpoint that does not fill the tree exactly.

Shapes: B frames, H x W pixels, h x w = H/f x W/f latent cells (f = 2^(levels-1),
8 for SDXL), C latent channels (4 for SDXL).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"

# The VAE runs in true float32 (SPEC): without HIGHEST, TPUs/GPUs would run fp32
# convolutions through bf16/tf32 passes and the latents would drift from the reference.
PRECISION = jax.lax.Precision.HIGHEST

# diffusers config keys that change nothing here: dtype policy (we always run fp32),
# tiling (not implemented: frames are encoded whole), and bookkeeping.
_IGNORED_CONFIG_KEYS = ("_class_name", "_diffusers_version", "_name_or_path", "force_upcast", "sample_size")


@dataclasses.dataclass(frozen=True)
class VaeConfig:
  """The architecture and latent scaling of one AutoencoderKL (diffusers field names)."""

  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 4
  norm_num_groups: int = 32
  scaling_factor: float = 0.13025
  shift_factor: float | None = None
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True

  @property
  def downsample(self) -> int:
    """Spatial reduction f: one stride-2 downsampler per level but the last."""
    return 2 ** (len(self.block_out_channels) - 1)

  @classmethod
  def from_diffusers(cls, config: dict[str, Any]) -> VaeConfig:
    """Read a diffusers `AutoencoderKL` config.json dict; refuse what this module cannot reproduce."""
    config = dict(config)
    problems = []
    if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
      problems.append(f"_class_name={config['_class_name']!r} is not 'AutoencoderKL'")
    if config.pop("act_fn", "silu") not in ("silu", "swish"):
      problems.append("only act_fn='silu' is supported")
    levels = len(config.get("block_out_channels", cls.block_out_channels))
    for key, want in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
      types = config.pop(key, [want] * levels)
      if len(types) != levels or any(t != want for t in types):
        problems.append(f"{key}={types} must be {levels} x {want!r}")
    for key in ("latents_mean", "latents_std"):
      # Pipelines normalise latents with these instead of scaling/shift: silently ignoring them would be wrong.
      if config.pop(key, None) is not None:
        problems.append(f"{key} is set; per-channel latent normalisation is not supported")
    for key in _IGNORED_CONFIG_KEYS:
      config.pop(key, None)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(config) - names)
    if unknown:
      logging.warning("VAE config keys ignored: %s", unknown)
    if problems:
      raise ValueError("unsupported VAE config: " + "; ".join(problems))
    kwargs = {k: v for k, v in config.items() if k in names}
    if "block_out_channels" in kwargs:
      kwargs["block_out_channels"] = tuple(kwargs["block_out_channels"])
    vae_config = cls(**kwargs)
    for ch in vae_config.block_out_channels:
      if ch % vae_config.norm_num_groups:
        raise ValueError(f"block_out_channels {ch} is not divisible by norm_num_groups={vae_config.norm_num_groups}")
    return vae_config


def _conv(features: int, kernel: int, name: str, stride: int = 1, padding: Any = "SAME") -> nn.Conv:
  return nn.Conv(features, (kernel, kernel), (stride, stride), padding=padding, precision=PRECISION, name=name)


def _group_norm(groups: int, name: str) -> nn.GroupNorm:
  # The two-pass variance matches torch's GroupNorm to fp32 rounding; the fast E[x^2]-E[x]^2 form does not.
  return nn.GroupNorm(num_groups=groups, epsilon=1e-6, use_fast_variance=False, name=name)


class ResnetBlock(nn.Module):
  """GroupNorm-SiLU-conv twice plus a (1x1-projected when widths differ) skip: [B, H, W, Cin] -> [..., Cout]."""

  out_channels: int
  groups: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = _conv(self.out_channels, 3, "conv1")(nn.silu(_group_norm(self.groups, "norm1")(x)))
    h = _conv(self.out_channels, 3, "conv2")(nn.silu(_group_norm(self.groups, "norm2")(h)))
    if x.shape[-1] != self.out_channels:
      x = _conv(self.out_channels, 1, "conv_shortcut")(x)
    return x + h


class Downsample(nn.Module):
  """Stride-2 3x3 conv after zero-padding only bottom/right (diffusers' padding=0 convention): H -> floor(H/2)."""

  channels: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return _conv(self.channels, 3, "conv", stride=2, padding="VALID")(x)


class Upsample(nn.Module):
  """Nearest-neighbour x2 then a 3x3 conv: [B, H, W, C] -> [B, 2H, 2W, C]."""

  channels: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return _conv(self.channels, 3, "conv")(x)


class SpatialSelfAttention(nn.Module):
  """Single-head self-attention over all h*w cells with a residual; head dim = channels."""

  groups: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    y = _group_norm(self.groups, "group_norm")(x).reshape(b, h * w, c)
    dense = lambda name: nn.Dense(c, precision=PRECISION, name=name)
    q, k, v = dense("to_q")(y), dense("to_k")(y), dense("to_v")(y)
    logits = jnp.einsum("bqc,bkc->bqk", q, k, precision=PRECISION) / math.sqrt(c)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    out = jnp.einsum("bqk,bkc->bqc", weights, v, precision=PRECISION)
    return x + dense("to_out_0")(out).reshape(b, h, w, c)


class MidBlock(nn.Module):
  """ResNet, attention (optional), ResNet at the lowest resolution; width unchanged."""

  groups: int
  attention: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    x = ResnetBlock(c, self.groups, name="resnets_0")(x)
    if self.attention:
      x = SpatialSelfAttention(self.groups, name="attentions_0")(x)
    return ResnetBlock(c, self.groups, name="resnets_1")(x)


class DownBlock(nn.Module):
  """`layers` ResNet blocks at one width, then (except at the last level) a stride-2 downsampler."""

  channels: int
  groups: int
  layers: int
  downsample: bool

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for j in range(self.layers):
      x = ResnetBlock(self.channels, self.groups, name=f"resnets_{j}")(x)
    return Downsample(self.channels, name="downsamplers_0")(x) if self.downsample else x


class UpBlock(nn.Module):
  """`layers` ResNet blocks at one width, then (except at the last level) a x2 upsampler."""

  channels: int
  groups: int
  layers: int
  upsample: bool

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for j in range(self.layers):
      x = ResnetBlock(self.channels, self.groups, name=f"resnets_{j}")(x)
    return Upsample(self.channels, name="upsamplers_0")(x) if self.upsample else x


class Encoder(nn.Module):
  """Frames [B, H, W, in] in [-1, 1] -> moments [B, h, w, 2C] (mean then logvar), before quant_conv."""

  config: VaeConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg, g = self.config, self.config.norm_num_groups
    x = _conv(cfg.block_out_channels[0], 3, "conv_in")(x)
    levels = len(cfg.block_out_channels)
    for i, ch in enumerate(cfg.block_out_channels):
      x = DownBlock(ch, g, cfg.layers_per_block, i < levels - 1, name=f"down_blocks_{i}")(x)
    x = MidBlock(g, cfg.mid_block_add_attention, name="mid_block")(x)
    x = nn.silu(_group_norm(g, "conv_norm_out")(x))
    return _conv(2 * cfg.latent_channels, 3, "conv_out")(x)


class Decoder(nn.Module):
  """Latents [B, h, w, C] (after post_quant_conv) -> frames [B, H, W, out]."""

  config: VaeConfig

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    cfg, g = self.config, self.config.norm_num_groups
    channels = cfg.block_out_channels[::-1]
    x = _conv(channels[0], 3, "conv_in")(z)
    x = MidBlock(g, cfg.mid_block_add_attention, name="mid_block")(x)
    for i, ch in enumerate(channels):
      x = UpBlock(ch, g, cfg.layers_per_block + 1, i < len(channels) - 1, name=f"up_blocks_{i}")(x)
    x = nn.silu(_group_norm(g, "conv_norm_out")(x))
    return _conv(cfg.out_channels, 3, "conv_out")(x)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DiagonalGaussian:
  """The encoder's posterior N(mean, exp(logvar)) per latent element; mean, logvar [B, h, w, C]."""

  mean: jax.Array
  logvar: jax.Array

  @classmethod
  def from_moments(cls, moments: jax.Array) -> DiagonalGaussian:
    """Split [..., 2C] into mean and logvar; logvar is clipped to [-30, 20] as in the reference VAE."""
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return cls(mean, jnp.clip(logvar, -30.0, 20.0))

  @property
  def std(self) -> jax.Array:
    return jnp.exp(0.5 * self.logvar)

  @property
  def var(self) -> jax.Array:
    return jnp.exp(self.logvar)

  def sample(self, key: jax.Array) -> jax.Array:
    return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)

  def mode(self) -> jax.Array:
    return self.mean


class AutoencoderKL(nn.Module):
  """The KL autoencoder: `encode` frames -> posterior, `decode` raw (unscaled) latents -> frames."""

  config: VaeConfig

  def setup(self) -> None:
    cfg = self.config
    self.encoder = Encoder(cfg)
    self.decoder = Decoder(cfg)
    if cfg.use_quant_conv:
      self.quant_conv = _conv(2 * cfg.latent_channels, 1, "quant_conv")
    if cfg.use_post_quant_conv:
      self.post_quant_conv = _conv(cfg.latent_channels, 1, "post_quant_conv")

  def encode(self, frames: jax.Array) -> DiagonalGaussian:
    """frames [B, H, W, in] in [-1, 1] -> posterior over [B, H/f, W/f, C]."""
    moments = self.encoder(frames.astype(jnp.float32))
    if self.config.use_quant_conv:
      moments = self.quant_conv(moments)
    return DiagonalGaussian.from_moments(moments)

  def decode(self, z: jax.Array) -> jax.Array:
    """Raw latents [B, h, w, C] (no scaling) -> frames [B, h f, w f, out], not clipped."""
    z = z.astype(jnp.float32)
    if self.config.use_post_quant_conv:
      z = self.post_quant_conv(z)
    return self.decoder(z)

  def __call__(self, frames: jax.Array) -> jax.Array:
    """Reconstruction from the posterior mean (also what `init` traces to create every parameter)."""
    return self.decode(self.encode(frames).mode())


def abstract_params(config: VaeConfig) -> Any:
  """The parameter tree's shapes (nothing allocated); parameter shapes do not depend on the frame size."""
  f = config.downsample
  frames = jax.ShapeDtypeStruct((1, f, f, config.in_channels), jnp.float32)
  return jax.eval_shape(AutoencoderKL(config).init, jax.random.key(0), frames)["params"]


# --- diffusers checkpoint -> Flax tree ------------------------------------------------------------------------------

# Deprecated attention-block names that older diffusers files still carry.
_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _flax_path(name: str) -> tuple[tuple[str, ...], str]:
  """diffusers name -> (Flax module path, leaf kind); 'down_blocks.0.resnets.1.conv1.weight' -> down_blocks_0/..."""
  *modules, leaf = name.split(".")
  if modules and modules[-1] in _LEGACY_ATTENTION:
    modules = modules[:-1] + _LEGACY_ATTENTION[modules[-1]].split(".")
  path: list[str] = []
  for part in modules:
    if part.isdigit() and path:
      path[-1] = f"{path[-1]}_{part}"
    else:
      path.append(part)
  return tuple(path), leaf


def _diffusers_name(path: tuple[str, ...]) -> str:
  """Flax path -> current diffusers name, for error messages: (..., 'to_out_0', 'kernel') -> '...to_out.0.weight'."""
  *modules, leaf = path
  modules = [re.sub(r"_(\d+)$", r".\1", m) for m in modules]
  return ".".join(modules + ["bias" if leaf == "bias" else "weight"])


def _convert(value: np.ndarray, leaf: str, target_ndim: int) -> tuple[str, np.ndarray]:
  """torch tensor -> (Flax leaf name, array): conv OIHW -> HWIO, linear [out, in] -> [in, out], norm weight -> scale."""
  value = np.asarray(value, dtype=np.float32)
  if leaf == "bias":
    return "bias", value
  if leaf != "weight":
    return leaf, value  # unknown leaf: reported as unexpected by the caller
  if value.ndim == 4 and target_ndim == 2 and value.shape[2:] == (1, 1):
    value = value[:, :, 0, 0]  # an attention projection stored as a 1x1 conv
  if value.ndim == 4:
    return "kernel", value.transpose(2, 3, 1, 0)
  if value.ndim == 2:
    return "kernel", value.T
  return "scale", value


def params_from_diffusers(tensors: dict[str, np.ndarray], config: VaeConfig) -> dict[str, Any]:
  """Map a diffusers state dict onto the Flax tree of `AutoencoderKL(config)`; strict.

  Raises ValueError naming every missing, unexpected or mis-shaped tensor, so a
  broken checkpoint is never half-loaded.
  """
  leaves = jax.tree_util.tree_leaves_with_path(abstract_params(config))
  expected = {tuple(k.key for k in path): leaf for path, leaf in leaves}
  filled: dict[tuple[str, ...], np.ndarray] = {}
  seen: set[tuple[str, ...]] = set()  # matched by name, whatever the shape
  unexpected, misshaped = [], []
  for name, value in tensors.items():
    modules, leaf = _flax_path(name)
    target = expected.get(modules + ("kernel",))
    flax_leaf, array = _convert(value, leaf, target.ndim if target is not None else -1)
    path = modules + (flax_leaf,)
    if path not in expected:
      unexpected.append(f"{name} {tuple(value.shape)}")
    elif path in seen:
      unexpected.append(f"{name} (a second tensor for {_diffusers_name(path)})")
    else:
      seen.add(path)
      if array.shape == expected[path].shape:
        filled[path] = array
      else:
        misshaped.append(f"{name}: file {tuple(value.shape)} -> {array.shape}, model wants {expected[path].shape}")
  missing = [f"{_diffusers_name(p)} {expected[p].shape}" for p in expected if p not in seen]
  if missing or unexpected or misshaped:
    lines = [f"VAE checkpoint does not match the model ({len(filled)}/{len(expected)} parameters matched):"]
    for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
      if items:
        lines.append(f"  {title} ({len(items)}): " + ", ".join(sorted(items)))
    raise ValueError("\n".join(lines))
  params: dict[str, Any] = {}
  for path, array in filled.items():
    node = params
    for part in path[:-1]:
      node = node.setdefault(part, {})
    node[path[-1]] = array
  return params


def load_vae(directory: str | Path) -> tuple[VaeConfig, dict[str, Any]]:
  """(config, float32 numpy params) from a diffusers-format AutoencoderKL directory (or a pipeline's `vae/`).

  Reads `config.json` and `diffusion_pytorch_model.safetensors` with safetensors'
  numpy backend (no torch); see `params_from_diffusers` for the strictness.
  """
  directory = Path(directory)
  if not (directory / CONFIG_NAME).exists() and (directory / "vae" / CONFIG_NAME).exists():
    directory = directory / "vae"
  for name in (CONFIG_NAME, WEIGHTS_NAME):
    if not (directory / name).exists():
      raise FileNotFoundError(f"{directory / name} not found: expected a diffusers-format AutoencoderKL directory")
  config = VaeConfig.from_diffusers(json.loads((directory / CONFIG_NAME).read_text()))
  tensors = safetensors.numpy.load_file(str(directory / WEIGHTS_NAME))
  return config, params_from_diffusers(tensors, config)
