"""The Video-GPT network: clean/noisy frame latents + timesteps -> predicted clean latents.

One forward pass sees the whole training layout (clean context and noisy copies
of every frame) and decodes only the noisy frames. The token order and the
clip split are inputs (a static `Layout` and per-sample `clip_of_frame`), so
the same parameters serve training, any order of the same tokens, and sampling.
"""

from __future__ import annotations

import dataclasses

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vgpt_jax.layout import NUM_SPECIAL, Layout, token_ids
from vgpt_jax.model.embeddings import FinalLayer, PatchEmbed, TimestepEmbedder, patchify, sincos_2d_table, unpatchify
from vgpt_jax.model.transformer import Decoder, KVCache, RopeScaling

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class VideoGPT(nn.Module):
  """The fields are `config.model`'s (presets.py holds their defaults); build it with `from_config`."""

  num_layers: int
  hidden: int
  num_heads: int
  mlp_dim: int
  patch_size: int
  norm_eps: float
  rope_theta: float
  rope_scaling: RopeScaling | None  # Phi-3 LongRoPE (transformer.RopeScaling); None: plain RoPE
  time_freq_dim: int
  pos_embed_max_size: int
  pos_embed_base_size: int
  attention: str  # attention/select.py: dense | chunked | pallas_tpu | pallas_gpu | auto
  attention_block: int  # tile size of the tiled paths
  remat: str  # transformer.REMAT_POLICIES
  remat_save: tuple[str, ...]  # with remat="save_names": transformer.SAVEABLE activations the backward keeps
  dtype: str  # compute dtype name (DTYPES)
  param_dtype: str
  preset: str = ""  # the preset it started from (informational)

  @classmethod
  def from_config(cls, model_cfg: ml_collections.ConfigDict) -> "VideoGPT":
    """The model of `config.model`, field for field; a field it lacks or does not know is an error."""
    values = dict(model_cfg)
    fields = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}
    missing, unknown = sorted(fields - set(values) - {"preset"}), sorted(set(values) - fields)
    if missing or unknown:
      raise ValueError(f"config.model lacks {missing} and has unknown fields {unknown} (model/presets.py lists them)")
    scaling = RopeScaling.from_config(values["rope_scaling"])
    return cls(**{**values, "remat_save": tuple(values["remat_save"]), "rope_scaling": scaling})

  @nn.compact
  def __call__(
    self,
    clean: jax.Array,
    noisy: jax.Array,
    t: jax.Array,
    clip_of_frame: jax.Array,
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
      clip_of_frame: int32 [B, N] clip index of each frame.
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
    chex.assert_equal_shape([clean, noisy])
    chex.assert_shape([t, clip_of_frame], (b, n))
    chex.assert_rank(noisy, 5)
    p = self.patch_size
    dtype = DTYPES[self.dtype]
    kw = dict(dtype=dtype, param_dtype=DTYPES[self.param_dtype])
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
        parts.append(embed + pos[idx % s].astype(dtype))
    if len(picks[2]):
      t_tok = jnp.take(t, jnp.asarray(local[2]), axis=1)
      parts.append(TimestepEmbedder(self.hidden, self.time_freq_dim, name="time_token", **kw)(t_tok).astype(dtype))
    special = self.param(
      "special_tokens",
      nn.with_logical_partitioning(nn.initializers.normal(0.02), ("special", "embed")),
      (NUM_SPECIAL, self.hidden),
      kw["param_dtype"],
    )
    if len(picks[3]):
      parts.append(jnp.broadcast_to(special[local[3]].astype(dtype), (b, len(picks[3]), self.hidden)))
    order = np.argsort(np.concatenate(picks))
    x = jnp.take(jnp.concatenate(parts, axis=1), jnp.asarray(order), axis=1)  # [B, T', D]
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))

    all_ids = token_ids(layout, clip_of_frame)
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
      self.remat_save,
      self.rope_scaling,
      name="decoder",
      **kw,
    )(x, ids, cache, cache_ids, return_kv, rope_length=int(layout.position.max()) + 1)
    # LongRoPE's factor set follows the layout's extent: the whole sequence in training (as the reference), the
    # whole window when sampling, so a rollout keeps one set and its cached keys stay valid (the reference,
    # recomputing everything, takes it from the context + clip it runs; the two differ only while the window
    # is not yet full and the full window crosses original_max_positions).
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
      out = unpatchify(FinalLayer(p * p * c, param_dtype=kw["param_dtype"], name="final")(noisy_out, cond), p, h, w)
    return (out, kv) if return_kv else out
