"""Autoregressive next-clip generation (SPEC section 7), with a KV cache.

Given m clean context frames (latents), clips of g frames are generated one
after another by Euler integration of the flow ODE; each finished clip joins
the context. The model sees a window of at most W frames (its trained length):
when the context and the next clip no longer fit, the window slides to the
last W - g frames, renumbered from frame 0, so positions always lie where
training put them.

Why a cache is exact: clean tokens never attend to noisy ones (SPEC section
3), so the context's keys and values do not depend on the clip being denoised.
`rollout(..., cached=True)` computes them once (and appends each finished
clip's), then every denoising step runs only the g noisy frames' tokens
against them. `cached=False` recomputes the whole sequence at every step, as
the reference does; tests check both give the same clips.

Classifier-free guidance (scale w != 1): the unconditional branch is the same
noisy clip with no history, its frames at positions from 0 (the reference's
choice; a training sample's first clip is exactly that case), and
v = v_u + w (v_c - v_u).

Unlike the reference, generated latents join the context directly, not after a
decode/re-encode round trip.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import tqdm

from vgpt_jax import diffusion
from vgpt_jax.layout import CLEAN, NOISY, fixed_split, sampling_layout, segment_tokens, training_layout
from vgpt_jax.model.transformer import KVCache
from vgpt_jax.run import Run, run_at

_CONTEXT_NOISE = 0x5EED  # folded into a clip's key for its context noise (the clip's own noise uses the key itself)
Videos = list[tuple[str, np.ndarray]]  # (name, float32 frames [T, H, W, 3] in [-1, 1]), T may differ per video


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How clips are generated; `window` 0 means the trained length (data.num_frames)."""

  steps: int = 50  # Euler steps per clip (0 in `with_run_defaults`: the run's train.sample_steps)
  shift: float = 1.0  # timestep shift (1 = none)
  guidance: float = 1.0  # classifier-free guidance scale (1 = off: one model call per step; 0 in `with_run_defaults`)
  clip_frames: int = 1  # g: frames generated per clip
  window: int = 0  # W: frames the model sees at once (0: the run's train.sample_window, or data.num_frames)
  # Feed context frames noised as training does (diffusion.corrupt_context with the run's t range), each frame
  # once as it joins the context. False: clean context, the reference's inference. None in `with_run_defaults`.
  context_noise: bool | None = False

  def window_for(self, run: Run) -> int:
    return self.window or run.config.train.sample_window or run.layout.num_frames


def with_run_defaults(
  config: Any, context_frames: int, frames: int, sampling: SamplingConfig | None
) -> tuple[int, int, SamplingConfig]:
  """(context frames, frames to generate, sampling) where 0 (or None) means the run's own choice.

  The one place the end-of-run sample, `sample` and `evaluate` take their defaults
  from: context train.sample_context_frames; frames the rest of the window;
  steps train.sample_steps; clip_frames train.sample_clip_frames, or all the
  generated frames in one clip; window train.sample_window (0: data.num_frames);
  guidance train.sample_guidance; context_noise train.sample_context_noise.
  configs/paper.py sets them as the reference's inference script runs.
  """
  tr = config.train
  n = tr.sample_window or config.data.num_frames
  context_frames = context_frames or tr.sample_context_frames
  sampling = sampling or SamplingConfig(steps=0, guidance=0.0, clip_frames=0, context_noise=None)
  default_clip = tr.sample_clip_frames or n - context_frames
  sampling = dataclasses.replace(
    sampling,
    steps=sampling.steps or tr.sample_steps,
    clip_frames=sampling.clip_frames or default_clip,
    guidance=sampling.guidance or tr.sample_guidance,
    window=sampling.window or tr.sample_window,
    context_noise=tr.sample_context_noise if sampling.context_noise is None else sampling.context_noise,
  )
  return context_frames, frames or n - context_frames, sampling


def check_sampling(run: Run, cfg: SamplingConfig, context_frames: int) -> None:
  """Raise ValueError naming the fix when `cfg` cannot run on this model."""
  w = cfg.window_for(run)
  problems = []
  if cfg.steps < 1:
    problems.append(f"steps={cfg.steps} must be >= 1")
  if cfg.clip_frames < 1:
    problems.append(f"clip_frames={cfg.clip_frames} must be >= 1")
  if w > run.layout.num_frames:
    problems.append(f"window={w} exceeds the trained length data.num_frames={run.layout.num_frames}")
  if cfg.clip_frames >= w:
    problems.append(f"clip_frames={cfg.clip_frames} leaves no room for context in a window of {w} frames")
  if context_frames < 1:
    problems.append("at least one context frame is needed")
  if problems:
    raise ValueError("cannot sample: " + "; ".join(problems))


def _frame_times(b: int, m: int, g: int, t: jax.Array) -> jax.Array:
  """[B, m + g]: 1 for the context frames, t for the clip's."""
  return jnp.concatenate([jnp.ones((b, m)), jnp.full((b, g), t)], axis=1)


def _unconditional_velocity(run: Run, params: Any, x: jax.Array, t: jax.Array) -> jax.Array:
  """The guidance branch: the clip alone, frames at positions 0..g-1, no history (one clip, block 0)."""
  b, g = x.shape[:2]
  layout = training_layout(g, run.layout.tokens_per_frame)
  split = jnp.zeros((b, g), jnp.int32)
  out = run.model.apply({"params": params}, x, x, jnp.full((b, g), t), split, layout)
  return diffusion.velocity(out, x, jnp.full((b, g), t), run.config.diffusion.prediction)


def _guided(run: Run, params: Any, guidance: float, conditional: Callable) -> Callable:
  """velocity_fn(x, t) with classifier-free guidance around `conditional(x, t)`."""

  def velocity_fn(x: jax.Array, t: jax.Array) -> jax.Array:
    v = conditional(x, t)
    if guidance == 1.0:
      return v
    v_u = _unconditional_velocity(run, params, x, t)
    return v_u + guidance * (v - v_u)

  return velocity_fn


def uncached_clip(
  run: Run, params: Any, context: jax.Array, noise: jax.Array, steps: int, shift: float, guidance: float
) -> jax.Array:
  """The reference's way: the whole training-layout sequence (split m | g) recomputed at every step.

  context: [B, m, h, w, C]; noise: [B, g, h, w, C] (the clip at t = 0). Returns the clip at t = 1.
  """
  b, m = context.shape[:2]
  g = noise.shape[1]
  layout = training_layout(m + g, run.layout.tokens_per_frame)
  split = jnp.broadcast_to(jnp.asarray(fixed_split((m, g))), (b, m + g))
  prediction = run.config.diffusion.prediction

  def conditional(x: jax.Array, t: jax.Array) -> jax.Array:
    frames = jnp.concatenate([context, x], axis=1)  # noisy copies of the context are masked from the clip
    out = run.model.apply({"params": params}, frames, frames, _frame_times(b, m, g, t), split, layout)
    return diffusion.velocity(out[:, m:], x, jnp.full((b, g), t), prediction)

  grid = diffusion.euler_grid(steps, shift)
  return diffusion.euler_integrate(_guided(run, params, guidance, conditional), noise, grid)


def _window_inputs(window: int, frames: jax.Array, first: int) -> jax.Array:
  """[B, W, h, w, C]: `frames` placed at window frames first.., zeros elsewhere (those are not run)."""
  b, n = frames.shape[:2]
  before = jnp.zeros((b, first, *frames.shape[2:]), frames.dtype)
  after = jnp.zeros((b, window - first - n, *frames.shape[2:]), frames.dtype)
  return jnp.concatenate([before, frames, after], axis=1)


def extend_cache(run: Run, window: int, params: Any, cache: KVCache | None, frames: jax.Array, first: int) -> KVCache:
  """The cache of window frames 0..first-1 extended with clean `frames` [B, k, ...] at first..first+k-1.

  The new frames' clean tokens run once, attending to the cached ones (clean
  attention is causal over frames, so nothing earlier changes).
  """
  b, k = frames.shape[:2]
  layout = sampling_layout(window, run.layout.tokens_per_frame)
  clean = _window_inputs(window, frames, first)
  split = jnp.zeros((b, window), jnp.int32)
  _, kv = run.model.apply(
    {"params": params},
    clean,
    jnp.zeros_like(clean),
    jnp.ones((b, window)),
    split,
    layout,
    tokens=segment_tokens(layout, CLEAN, first, first + k),
    cache=cache,
    cache_tokens=segment_tokens(layout, CLEAN, 0, first) if cache is not None else None,
    return_kv=True,
  )
  if cache is None:
    return kv
  return jax.tree.map(lambda old, new: jnp.concatenate([old, new], axis=2), cache, kv)


def cached_denoise(run: Run, window: int, params: Any, cache: KVCache, m: int, x: jax.Array, t: jax.Array) -> jax.Array:
  """The network's output for the clip x [B, g, ...] at time t, given the cached context of m frames.

  Equals the training layout's output for the noisy frames m..m+g-1 with split (m | g).
  """
  b, g = x.shape[:2]
  layout = sampling_layout(window, run.layout.tokens_per_frame)
  noisy = _window_inputs(window, x, m)
  split = jnp.asarray(np.repeat([0, 1, 2], [m, g, window - m - g]).astype(np.int32))
  times = jnp.concatenate([jnp.ones((b, m)), jnp.full((b, g), t), jnp.ones((b, window - m - g))], axis=1)
  return run.model.apply(
    {"params": params},
    jnp.zeros_like(noisy),
    noisy,
    times,
    jnp.broadcast_to(split, (b, window)),
    layout,
    tokens=segment_tokens(layout, NOISY, m, m + g),
    cache=cache,
    cache_tokens=segment_tokens(layout, CLEAN, 0, m),
  )


def cached_clip(
  run: Run,
  window: int,
  params: Any,
  cache: KVCache,
  m: int,
  noise: jax.Array,
  steps: int,
  shift: float,
  guidance: float,
) -> jax.Array:
  """Generate one clip against the cached context of m frames; only the clip's tokens run per step."""
  prediction = run.config.diffusion.prediction

  def conditional(x: jax.Array, t: jax.Array) -> jax.Array:
    out = cached_denoise(run, window, params, cache, m, x, t)
    return diffusion.velocity(out, x, jnp.full(x.shape[:2], t), prediction)

  grid = diffusion.euler_grid(steps, shift)
  return diffusion.euler_integrate(_guided(run, params, guidance, conditional), noise, grid)


class Sampler:
  """Jit-compiled rollouts for one model; compiled functions are reused across calls of the same shapes."""

  def __init__(self, run: Run, cfg: SamplingConfig):
    self.run, self.cfg = run, cfg
    self.window = cfg.window_for(run)
    w = self.window
    self._extend = jax.jit(functools.partial(extend_cache, run, w), static_argnames="first")
    self._cached_clip = jax.jit(
      functools.partial(cached_clip, run, w), static_argnames=("m", "steps", "shift", "guidance")
    )
    self._uncached_clip = jax.jit(functools.partial(uncached_clip, run), static_argnames=("steps", "shift", "guidance"))

  def rollout(
    self,
    params: Any,
    context: jax.Array,
    keys: jax.Array,
    num_frames: int,
    cached: bool = True,
    on_clip: Callable[[int, int], None] | None = None,
  ) -> jax.Array:
    """Generate `num_frames` frames after `context` [B, m, h, w, C]; returns [B, num_frames, h, w, C].

    keys: [B] one PRNG key per video. Clip c of video i starts from noise drawn
    with fold_in(keys[i], c), so the cached and uncached paths, and any batch
    holding the same video, see the same noise. `on_clip(done, total)` is
    called after each clip (progress bars).
    """
    cfg, w = self.cfg, self.window
    chex.assert_rank(context, 5)
    chex.assert_shape(keys, (context.shape[0],))
    check_sampling(self.run, cfg, context.shape[1])
    shape = context.shape[2:]
    history = jnp.asarray(context, jnp.float32)
    seen = self._as_context(keys, 0, history)  # what the model reads of the history (noised if asked)
    total = -(-num_frames // cfg.clip_frames)
    cache, cache_start, cached_upto = None, -1, 0
    for c in range(total):
      g = min(cfg.clip_frames, num_frames - c * cfg.clip_frames)
      start = max(0, history.shape[1] + g - w)  # slide so that context + clip fit the window
      window_context = seen[:, start:]
      m = window_context.shape[1]
      noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, c), (g, *shape), jnp.float32))(keys)
      sampling = dict(steps=cfg.steps, shift=float(cfg.shift), guidance=float(cfg.guidance))
      if cached:
        if start != cache_start:  # positions moved: the window's context is encoded afresh
          cache, cache_start, cached_upto = None, start, 0
        cache = self._extend(params, cache, window_context[:, cached_upto:], first=cached_upto)
        cached_upto = m
        clip = self._cached_clip(params, cache, m=m, noise=noise, **sampling)
      else:
        clip = self._uncached_clip(params, window_context, noise, **sampling)
      history = jnp.concatenate([history, clip], axis=1)
      seen = jnp.concatenate([seen, self._as_context(keys, c + 1, clip)], axis=1)
      if on_clip is not None:
        on_clip(c + 1, total)
    return history[:, context.shape[1] :]

  def _as_context(self, keys: jax.Array, entry: int, frames: jax.Array) -> jax.Array:
    """frames [B, k, ...] as they join the context: unchanged, or with `context_noise` noised as training noises
    clean frames (diffusion.corrupt_context), from a key per video and entry (0: the given context, c + 1: clip c)."""
    if not self.cfg.context_noise:
      return frames
    noise_cfg = ml_collections.ConfigDict({**self.run.config.diffusion.to_dict(), "context_noise": True})
    entry_keys = jax.vmap(lambda k: jax.random.fold_in(jax.random.fold_in(k, entry), _CONTEXT_NOISE))(keys)
    return jax.vmap(lambda k, x: diffusion.corrupt_context(k, x[None], noise_cfg)[0])(entry_keys, frames)


def continue_videos(
  run: Run,
  params: Any,
  videos: Videos,
  sampling: SamplingConfig,
  context_frames: int,
  frames: int,
  seed: int,
  cached: bool = True,
  batch_size: int = 8,
  video_ids: list[int] | None = None,
) -> list[np.ndarray]:
  """float32 [frames, H, W, 3] continuations of each video's first `context_frames` frames, in batches.

  Videos of several sizes (data.buckets) are generated in batches of one size each, with the run at that size
  (`run_at`: the same model, that patch grid's positions). Video i's noise comes from
  fold_in(key(seed), video_ids[i]) (default i), so a video's sample does not depend on the batch it is
  generated in.
  """
  video_ids = list(range(len(videos))) if video_ids is None else list(video_ids)
  short = [name for name, v in videos if len(v) < context_frames]
  if short:
    raise ValueError(f"videos with fewer than --context_frames={context_frames} frames: {short}")
  clips = -(-frames // sampling.clip_frames)
  out: list[np.ndarray] = [np.empty(0)] * len(videos)
  sizes = sorted({v.shape[1:3] for _, v in videos})
  with tqdm(total=clips * len(videos), desc="sample", unit="clip", dynamic_ncols=True) as progress:
    for size in sizes:
      sized = run_at(run, *size, run.config.data.num_frames)
      sampler = Sampler(sized, sampling)
      encode, decode = jax.jit(sized.tokenizer.encode), jax.jit(sized.tokenizer.decode)
      chosen = [i for i, (_, v) in enumerate(videos) if v.shape[1:3] == size]
      for first in range(0, len(chosen), batch_size):
        batch = chosen[first : first + batch_size]
        latents = encode(jnp.asarray(np.stack([videos[i][1][:context_frames] for i in batch])))
        keys = jnp.stack([jax.random.fold_in(jax.random.key(seed), video_ids[i]) for i in batch])
        generated = sampler.rollout(
          params, latents, keys, frames, cached=cached, on_clip=lambda done, _: progress.update(len(batch))
        )
        for i, video in zip(batch, np.clip(np.asarray(decode(generated)), -1, 1)):
          out[i] = video
  return out
