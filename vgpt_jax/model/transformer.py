"""Phi-3-style decoder backbone: RMSNorm, RoPE on given positions, SwiGLU, no bias.

Layers are stacked with `nn.scan` (one compiled layer body, parameters with a
leading 'layers' axis) and optionally rematerialised with a named policy. Every
parameter carries logical axis names so a single rules table can shard it. The
attention mask (or the kernels' tile lists) is planned once per forward pass
from the token ids and handed to every layer (attention/select.py).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from vgpt_jax.attention.path import Plan
from vgpt_jax.attention.select import attention_path
from vgpt_jax.layout import TokenIds

AttendFn = Callable[[jax.Array, jax.Array, jax.Array, Plan], jax.Array]  # AttentionPath.attend
# Keys and values of earlier tokens, per layer: (k, v) each [layers, B, Tc, H, Dh] (keys after RoPE).
KVCache = tuple[jax.Array, jax.Array]

# Named rematerialisation policies (what the backward pass may keep from the forward).
REMAT_POLICIES: dict[str, Callable | None] = {
  "none": None,  # no remat: keep every activation
  "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole layer
  "dots": jax.checkpoint_policies.checkpoint_dots,  # keep matmul outputs
  "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep weight matmuls only
  "save_names": None,  # keep the activations named in model.remat_save (SAVEABLE), recompute the rest
}

# Activations a layer names with `checkpoint_name`, for remat="save_names" (model.remat_save).
SAVEABLE = (
  "query",  # [B, T, H, Dh] after RoPE
  "key",
  "value",
  "attention",  # [B, T, H, Dh] attention output, before the output projection
  "mlp_gate",  # [B, T, mlp_dim]
  "mlp_up",
  "layer_out",  # [B, T, D] the residual stream after the layer
)


def remat_policy(remat: str, save: tuple[str, ...]) -> Callable | None:
  """The checkpoint policy of model.remat (and model.remat_save for "save_names")."""
  if remat == "save_names":
    return jax.checkpoint_policies.save_only_these_names(*save)
  return REMAT_POLICIES[remat]


_DENSE_INIT = nn.initializers.normal(stddev=0.02)  # Phi-3 initializer_range


# Logical axes of the activations (parallel.LOGICAL_RULES maps them to the mesh).
EMBED_AXES = ("batch", "length", "embed")
HEAD_AXES = ("batch", "length", "heads", "kv")
MLP_AXES = ("batch", "length", "mlp")


def _named(x: jax.Array, name: str, axes: tuple[str, ...]) -> jax.Array:
  """`x` sharded by its logical `axes` and named `name` for remat="save_names"."""
  return checkpoint_name(nn.with_logical_constraint(x, axes), name)


class RMSNorm(nn.Module):
  """Root-mean-square norm with a learned scale, computed in float32."""

  eps: float = 1e-5
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param(
      "scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (x.shape[-1],), self.param_dtype
    )
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * scale.astype(jnp.float32)).astype(self.dtype)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Phi-3's LongRoPE (`rope_scaling` type "su" / "longrope", as transformers computes it).

  Each frequency i is divided by a factor: `long_factor[i]` when the sequence is longer than
  `original_max_positions`, else `short_factor[i]`; cos and sin are multiplied by `attention_factor`.
  `config.model.rope_scaling` holds these fields (None: plain RoPE); convert.py reads them from a Phi-3 config.
  """

  short_factor: tuple[float, ...]
  long_factor: tuple[float, ...]
  original_max_positions: int
  attention_factor: float

  FIELDS = ("short_factor", "long_factor", "original_max_positions", "attention_factor")

  @classmethod
  def from_config(cls, cfg) -> "RopeScaling | None":
    """From config.model.rope_scaling (a mapping with exactly FIELDS, or None)."""
    if cfg is None:
      return None
    values = dict(cfg)
    if set(values) != set(cls.FIELDS):
      raise ValueError(
        f"model.rope_scaling needs exactly {list(cls.FIELDS)}; missing {sorted(set(cls.FIELDS) - set(values))}, "
        f"unknown {sorted(set(values) - set(cls.FIELDS))}"
      )
    return cls(
      tuple(float(x) for x in values["short_factor"]),
      tuple(float(x) for x in values["long_factor"]),
      int(values["original_max_positions"]),
      float(values["attention_factor"]),
    )


def rope_tables(
  position: jax.Array, head_dim: int, theta: float, scaling: RopeScaling | None = None, length: int = 0
) -> tuple[jax.Array, jax.Array]:
  """cos, sin float32 [B, T, 1, head_dim] for integer positions [B, T] (rotate-half RoPE).

  With `scaling`, `length` (static: one more than the largest position of the sequence, as transformers takes
  it from the position ids) picks the long or the short factors.
  """
  wavelength = theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  scale = 1.0
  if scaling is not None:
    factors = scaling.long_factor if length > scaling.original_max_positions else scaling.short_factor
    if len(factors) != head_dim // 2:
      raise ValueError(f"rope_scaling has {len(factors)} factors; heads of {head_dim} need {head_dim // 2}")
    wavelength = jnp.asarray(factors, jnp.float32) * wavelength
    scale = scaling.attention_factor
  inv_freq = 1.0 / wavelength
  angles = position.astype(jnp.float32)[..., None] * inv_freq  # [B, T, Dh/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
  return jnp.cos(angles) * scale, jnp.sin(angles) * scale


class RopeAndPlan(NamedTuple):
  """What the Decoder makes from the token ids once per forward pass and hands to every layer."""

  rope: tuple[jax.Array, jax.Array]  # `rope_tables` (cos, sin)
  plan: Plan  # the attention path's plan of the mask


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotate [B, T, H, Dh] by the tables of `rope_tables`."""
  half = x.shape[-1] // 2
  x32 = x.astype(jnp.float32)
  rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
  return (x32 * cos + rotated * sin).astype(x.dtype)


class Attention(nn.Module):
  """Multi-head self-attention through `attend`, on the plan the Decoder made from the token ids.

  With `cached` (k, v [B, Tc, H, Dh]) the queries also attend to those earlier
  tokens (the plan covers them): the KV-cached sampler's path. Returns the
  output and this call's own (k, v), so a caller can cache them.
  """

  num_heads: int
  head_dim: int
  attend: AttendFn
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(
    self, x: jax.Array, shared: RopeAndPlan, cached: tuple[jax.Array, jax.Array] | None = None
  ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    shape, axes = (x.shape[-1], self.num_heads, self.head_dim), ("embed", "heads", "kv")

    def kernel(name: str, shape: tuple[int, ...], axes: tuple[str, ...]) -> jax.Array:
      # Created at its final shape (not flattened, as DenseGeneral does) so the
      # logical names always match the array's rank.
      init = nn.with_logical_partitioning(_DENSE_INIT, axes)
      return self.param(name, init, shape, self.param_dtype).astype(self.dtype)

    x = x.astype(self.dtype)
    q, k, v = (jnp.einsum("btd,dhk->bthk", x, kernel(name, shape, axes)) for name in ("query", "key", "value"))
    q, k = apply_rope(q, *shared.rope), apply_rope(k, *shared.rope)
    q, k, v = (_named(a, name, HEAD_AXES) for a, name in zip((q, k, v), ("query", "key", "value")))
    if cached is None:
      out = self.attend(q, k, v, shared.plan)
    else:
      k_all, v_all = (jnp.concatenate([c.astype(self.dtype), new], axis=1) for c, new in zip(cached, (k, v)))
      out = self.attend(q, k_all, v_all, shared.plan)
    out = _named(out, "attention", HEAD_AXES)
    out = jnp.einsum("bthk,hkd->btd", out, kernel("out", shape[1:] + shape[:1], axes[1:] + axes[:1]))
    return out, (k, v)


class SwiGLU(nn.Module):
  """down(silu(gate(x)) * up(x))."""

  mlp_dim: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    def dense(features: int, axes: tuple[str, str], name: str) -> nn.Dense:
      return nn.Dense(
        features,
        use_bias=False,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        kernel_init=nn.with_logical_partitioning(_DENSE_INIT, axes),
        name=name,
      )

    gate = _named(dense(self.mlp_dim, ("embed", "mlp"), "gate")(x), "mlp_gate", MLP_AXES)
    up = _named(dense(self.mlp_dim, ("embed", "mlp"), "up")(x), "mlp_up", MLP_AXES)
    return dense(x.shape[-1], ("mlp", "embed"), "down")(nn.silu(gate) * up)


class DecoderLayer(nn.Module):
  """Pre-norm block: x + attn(norm(x)); x + mlp(norm(x)). Scan-compatible signature.

  `cached` is this layer's slice of a KVCache (or None); with `return_kv` the
  layer's keys/values are its scan output, so the Decoder returns a KVCache.
  """

  num_heads: int
  head_dim: int
  mlp_dim: int
  norm_eps: float
  attend: AttendFn
  return_kv: bool = False
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, shared: RopeAndPlan, cached: tuple[jax.Array, jax.Array] | None):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = RMSNorm(self.norm_eps, name="attn_norm", **kw)(x)
    attn = Attention(self.num_heads, self.head_dim, self.attend, name="attn", **kw)
    out, kv = attn(h, shared, cached)
    x = x + out
    h = RMSNorm(self.norm_eps, name="mlp_norm", **kw)(x)
    x = x + SwiGLU(self.mlp_dim, name="mlp", **kw)(h)
    x = _named(x, "layer_out", EMBED_AXES)
    return x, (kv if self.return_kv else None)


class Decoder(nn.Module):
  """`num_layers` scanned DecoderLayers followed by a final RMSNorm."""

  num_layers: int
  num_heads: int
  head_dim: int
  mlp_dim: int
  norm_eps: float
  rope_theta: float
  attention: str  # config.model.attention (attention/select.py)
  attention_block: int  # tile size of the tiled paths
  remat: str = "none"
  remat_save: tuple[str, ...] = ()
  rope_scaling: RopeScaling | None = None
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    ids: TokenIds,
    cache: KVCache | None = None,
    cache_ids: TokenIds | None = None,
    return_kv: bool = False,
    rope_length: int = 0,
  ) -> jax.Array | tuple[jax.Array, KVCache]:
    """x: [B, T, D] embeddings; ids: fields [B, T]. Returns [B, T, D].

    With `cache` (and `cache_ids`, fields [B, Tc]) the tokens also attend to the
    cached earlier tokens; with `return_kv` it returns (x, this call's KVCache).
    rope_length (static): the sequence's extent in positions, for `rope_scaling`.
    """
    layer_cls = DecoderLayer
    if self.remat != "none":
      layer_cls = nn.remat(DecoderLayer, policy=remat_policy(self.remat, self.remat_save), prevent_cse=False)
    stack = nn.scan(
      layer_cls,
      variable_axes={"params": 0},
      split_rngs={"params": True},
      in_axes=(nn.broadcast, 0),
      length=self.num_layers,
      metadata_params={nn.PARTITION_NAME: "layers"},
    )
    # The keys are the cached tokens (if any), then this call's own.
    k_ids = ids if cache is None else jax.tree.map(lambda a, b: jnp.concatenate([a, b], axis=1), cache_ids, ids)
    path = attention_path(self.attention, ids.frame.shape[1], k_ids.frame.shape[1], self.attention_block)
    rope = rope_tables(ids.position, self.head_dim, self.rope_theta, self.rope_scaling, rope_length)
    shared = RopeAndPlan(rope, path.plan(ids, k_ids))  # once for every layer, forward and backward
    layers = stack(
      self.num_heads,
      self.head_dim,
      self.mlp_dim,
      self.norm_eps,
      path.attend,
      return_kv,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="layers",
    )
    x, kv = layers(x.astype(self.dtype), shared, cache)
    x = RMSNorm(self.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, name="final_norm")(x)
    return (x, kv) if return_kv else x
