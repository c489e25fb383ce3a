"""Flow matching for next-clip diffusion (SPEC section 4) and the samplers' ODE math.

Convention: x_t = t * x1 + (1 - t) * eps, t = 1 is clean. The network predicts
x1 ("x") by default, or the velocity v = x1 - eps ("v").
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections

PREDICTIONS = ("x", "v")
TIMESTEP_SAMPLINGS = ("uniform", "logit_normal")


def shift_timesteps(t: jax.Array, shift: float) -> jax.Array:
  """t' = t / (t + s - s t); s = 1 is the identity, s > 1 spends more time near t = 0 (noise)."""
  if shift == 1.0:
    return t
  return t / (t + shift - shift * t)


def sample_timesteps(key: jax.Array, shape: tuple[int, ...], cfg: ml_collections.ConfigDict) -> jax.Array:
  """Training timesteps in [0, 1): uniform (reference) or logit-normal, then shifted."""
  if cfg.timestep_sampling == "uniform":
    t = jax.random.uniform(key, shape)
  elif cfg.timestep_sampling == "logit_normal":
    t = jax.nn.sigmoid(cfg.logit_normal_mean + cfg.logit_normal_std * jax.random.normal(key, shape))
  else:
    raise ValueError(f"unknown timestep_sampling {cfg.timestep_sampling!r}; choose one of {TIMESTEP_SAMPLINGS}")
  return shift_timesteps(t, cfg.timestep_shift)


def interpolate(x1: jax.Array, eps: jax.Array, t: jax.Array) -> jax.Array:
  """x_t for per-frame t [B, N] and frames [B, N, ...]."""
  t = t.reshape(t.shape + (1,) * (x1.ndim - t.ndim))
  return t * x1 + (1.0 - t) * eps


def corrupt_context(key: jax.Array, x1: jax.Array, cfg: ml_collections.ConfigDict) -> jax.Array:
  """The clean copies fed to the model: x1 lightly noised with t_in ~ U(min, max) per frame.

  The model is not told t_in; it learns to read slightly corrupted context,
  which is what it gets from its own generated clips at inference.
  """
  if not cfg.context_noise:
    return x1
  t_key, eps_key = jax.random.split(key)
  t_in = jax.random.uniform(t_key, x1.shape[:2], minval=cfg.context_t_min, maxval=cfg.context_t_max)
  return interpolate(x1, jax.random.normal(eps_key, x1.shape, x1.dtype), t_in)


def prediction_loss(
  output: jax.Array, x1: jax.Array, eps: jax.Array, prediction: str, frame_weight: jax.Array | None = None
) -> jax.Array:
  """Mean over samples of each sample's weighted mean over frames of the per-frame MSE. output, x1, eps: [B, N, ...].

  frame_weight: [B, N] (default: all ones, the reference's plain mean). Each
  sample is normalised by its own weights, so splitting the batch into equal
  micro-batches (gradient accumulation) gives the same loss.
  """
  if prediction == "x":
    target = x1
  elif prediction == "v":
    target = x1 - eps
  else:
    raise ValueError(f"unknown prediction {prediction!r}; choose one of {PREDICTIONS}")
  per_frame = jnp.mean(jnp.square(output.astype(jnp.float32) - target), axis=tuple(range(2, x1.ndim)))
  if frame_weight is None:
    return jnp.mean(per_frame)
  per_sample = jnp.sum(frame_weight * per_frame, axis=1) / jnp.maximum(jnp.sum(frame_weight, axis=1), 1e-6)
  return jnp.mean(per_sample)


def first_clip_weights(clip_of_frame: jax.Array, weight: float) -> jax.Array:
  """float32 [B, N] loss weights: `weight` for the frames of each sample's first clip, 1 elsewhere.

  The first clip is denoised with no history (an unconditional video); with a
  weight below 1 the loss spends its signal on predicting from context.
  """
  return jnp.where(clip_of_frame == 0, jnp.float32(weight), jnp.float32(1.0))


def velocity(output: jax.Array, x_t: jax.Array, t: jax.Array, prediction: str) -> jax.Array:
  """dx/dt of the flow from the network output; for x-prediction v = (x1_hat - x_t) / (1 - t).

  t must be < 1 (the Euler grid never evaluates at t = 1).
  """
  if prediction == "v":
    return output
  t = t.reshape(t.shape + (1,) * (x_t.ndim - t.ndim))
  return (output - x_t) / (1.0 - t)


def euler_grid(steps: int, shift: float = 1.0) -> jax.Array:
  """float32 [steps + 1] times from 0 (noise) to 1 (clean), optionally shifted."""
  return shift_timesteps(jnp.linspace(0.0, 1.0, steps + 1), shift)


def euler_integrate(
  velocity_fn: Callable[[jax.Array, jax.Array], jax.Array], x0: jax.Array, grid: jax.Array
) -> jax.Array:
  """Integrate dx/dt = velocity_fn(x, t) from grid[0] to grid[-1] with Euler steps.

  velocity_fn takes x and a scalar t; `lax.scan` keeps it one compiled body.
  """

  def step(x, times):
    t0, t1 = times
    return x + (t1 - t0) * velocity_fn(x, t0), None

  x, _ = jax.lax.scan(step, x0, (grid[:-1], grid[1:]))
  return x
