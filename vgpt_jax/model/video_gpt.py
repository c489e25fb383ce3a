"""The Video-GPT network: clean/noisy frame latents + timesteps -> predicted clean latents.

One forward pass sees the whole training layout (clean context and noisy copies
of every frame) and decodes only the noisy frames. The token order and the
clip split are inputs (a static `Layout` and per-sample `block_of_frame`), so
the same parameters serve training, any order of the same tokens, and sampling.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vgpt_jax.layout import NUM_SPECIAL, Layout, token_ids
from vgpt_jax.model.embeddings import FinalLayer, PatchEmbed, TimestepEmbedder, patchify, sincos_2d_table, unpatchify
from vgpt_jax.model.transformer import Decoder, KVCache

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class VideoGPT(nn.Module):
  """Hyper-parameters mirror `config.model` (see `from_config`)."""

  num_layers: int
  hidden: int
  num_heads: int
  mlp_dim: int
  patch_size: int
  norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  time_freq_dim: int = 256
  pos_embed_max_size: int = 192
  pos_embed_base_size: int = 64
  attention: str = "dense"  # attention/select.py: dense | chunked | pallas_tpu | pallas_gpu | auto
  attention_block: int = 512  # tile size of the tiled paths
  remat: str = "none"
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @classmethod
  def from_config(cls, model_cfg: ml_collections.ConfigDict) -> "VideoGPT":
    return cls(
      num_layers=model_cfg.num_layers,
      hidden=model_cfg.hidden,
      num_heads=model_cfg.num_heads,
      mlp_dim=model_cfg.mlp_dim,
      patch_size=model_cfg.patch_size,
      norm_eps=model_cfg.norm_eps,
      rope_theta=model_cfg.rope_theta,
      time_freq_dim=model_cfg.time_freq_dim,
      pos_embed_max_size=model_cfg.pos_embed_max_size,
      pos_embed_base_size=model_cfg.pos_embed_base_size,
      attention=model_cfg.attention,
      attention_block=model_cfg.get("attention_block", 512),
      remat=model_cfg.remat,
      dtype=DTYPES[model_cfg.dtype],
      param_dtype=DTYPES[model_cfg.param_dtype],
    )

  @nn.compact
  def __call__(
    self,
    clean: jax.Array,
    noisy: jax.Array,
    t: jax.Array,
    block_of_frame: jax.Array,
    layout: Layout,
    tokens: np.ndarray | None = None,
    cache: KVCache | None = None,
    cache_tokens: np.ndarray | None = None,
    return_kv: bool = False,
  ) -> jax.Array | tuple[jax.Array | None, KVCache]:
    """Predict clean latents of the noisy frames.

    Args:
      clean: [B, N, h, w, C] context latents (the clean copies, possibly lightly noised).
      noisy: [B, N, h, w, C] noised latents x_t.
      t: [B, N] flow time of each noisy frame (1 = clean).
      block_of_frame: int32 [B, N] clip index of each frame.
      layout: static token layout for N frames of S = h*w/p^2 tokens.
      tokens: static int [T'] subset of the layout's tokens to run (default: all);
        the KV-cached sampler runs a clip's tokens alone.
      cache, cache_tokens: keys/values of earlier layout tokens `cache_tokens`
        (static int [Tc]) that `tokens` also attend to, as `return_kv` gave them.
      return_kv: also return this call's KVCache ([layers, B, T', H, Dh] each).
    Returns:
      float32 [B, N', h, w, C]: the output for every noisy frame whose patches are
      all in `tokens` (N' = N by default; None if there is none), and the KVCache
      with `return_kv`.
    """
    b, n, h, w, c = noisy.shape
    p = self.patch_size
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    pos = jnp.asarray(sincos_2d_table(self.hidden, h // p, w // p, self.pos_embed_max_size, self.pos_embed_base_size))

    s = pos.shape[0]
    if layout.table_size != 2 * n * s + n + NUM_SPECIAL:
      raise ValueError(
        f"layout is for {layout.num_frames} frames x {layout.tokens_per_frame} tokens, got {n} frames x {s} tokens"
      )
    tokens = np.arange(layout.length) if tokens is None else np.asarray(tokens)
    # Embed only the tokens that run (the KV-cached sampler runs a clip's tokens, not the window's): each kind of
    # token source is embedded for its selected entries, then the parts are put in the tokens' order.
    source = layout.source[tokens]
    bounds = np.cumsum([0, n * s, n * s, n, NUM_SPECIAL])
    picks = [np.nonzero((source >= lo) & (source < hi))[0] for lo, hi in zip(bounds[:-1], bounds[1:])]
    local = [source[pick] - lo for pick, lo in zip(picks, bounds[:-1])]  # index within each kind's table
    parts = []
    for frames, name, zero_init, pick, idx in (
      (clean, "clean_embed", False, picks[0], local[0]),
      (noisy, "noisy_embed", True, picks[1], local[1]),
    ):
      if len(pick):
        patches = jnp.take(patchify(frames, p).reshape(b, n * s, -1), jnp.asarray(idx), axis=1)
        embed = PatchEmbed(self.hidden, zero_init=zero_init, name=name, **kw)(patches)
        parts.append(embed + pos[idx % s].astype(self.dtype))
    if len(picks[2]):
      t_tok = jnp.take(t, jnp.asarray(local[2]), axis=1)
      parts.append(TimestepEmbedder(self.hidden, self.time_freq_dim, name="time_token", **kw)(t_tok).astype(self.dtype))
    special = self.param(
      "special_tokens",
      nn.with_logical_partitioning(nn.initializers.normal(0.02), ("special", "embed")),
      (NUM_SPECIAL, self.hidden),
      self.param_dtype,
    )
    if len(picks[3]):
      parts.append(jnp.broadcast_to(special[local[3]].astype(self.dtype), (b, len(picks[3]), self.hidden)))
    order = np.argsort(np.concatenate(picks))
    x = jnp.take(jnp.concatenate(parts, axis=1), jnp.asarray(order), axis=1)  # [B, T', D]
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))

    all_ids = token_ids(layout, block_of_frame)
    ids = all_ids[:, tokens]
    cache_ids = None if cache is None else all_ids[:, np.asarray(cache_tokens)]
    decoded = Decoder(
      self.num_layers,
      self.num_heads,
      self.hidden // self.num_heads,
      self.mlp_dim,
      self.norm_eps,
      self.rope_theta,
      self.attention,
      self.attention_block,
      self.remat,
      name="decoder",
      **kw,
    )(x, ids, cache, cache_ids, return_kv)
    x, kv = decoded if return_kv else (decoded, None)

    # Sequence index (within `tokens`) of each noisy patch, for the frames whose patches are all there.
    where = np.full(layout.length, -1)
    where[tokens] = np.arange(len(tokens))
    patch_index = where[layout.noisy_patch_index()]  # [N, S]
    frames = np.nonzero((patch_index >= 0).all(axis=1))[0]
    out = None
    if len(frames):
      noisy_out = jnp.take(x, jnp.asarray(patch_index[frames].reshape(-1)), axis=1)
      noisy_out = noisy_out.reshape(b, len(frames), s, self.hidden)
      cond = TimestepEmbedder(self.hidden, self.time_freq_dim, name="final_time", **kw)(t[:, frames])
      out = unpatchify(FinalLayer(p * p * c, param_dtype=self.param_dtype, name="final")(noisy_out, cond), p, h, w)
    return (out, kv) if return_kv else out
