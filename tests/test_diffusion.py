"""Flow-matching objective and ODE math (SPEC sections 4 and 7)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vgpt_jax import diffusion


def _cfg(**kw) -> ml_collections.ConfigDict:
  base = dict(
    prediction="x",
    timestep_sampling="uniform",
    logit_normal_mean=0.0,
    logit_normal_std=1.0,
    timestep_shift=1.0,
    context_noise=True,
    context_t_min=0.9,
    context_t_max=1.0,
  )
  return ml_collections.ConfigDict({**base, **kw})


def test_interpolate_endpoints_and_per_frame_t():
  x1, eps = jnp.ones((2, 3, 4)), jnp.zeros((2, 3, 4))
  t = jnp.array([[0.0, 0.5, 1.0], [1.0, 0.25, 0.0]])
  xt = diffusion.interpolate(x1, eps, t)
  np.testing.assert_allclose(xt[..., 0], t)


def test_x_loss_equals_v_loss_weighted_by_one_minus_t_squared():
  k = jax.random.split(jax.random.key(0), 4)
  x1, eps, x1_hat = (jax.random.normal(kk, (2, 3, 8)) for kk in k[:3])
  t = jax.random.uniform(k[3], (2, 3), maxval=0.99)
  xt = diffusion.interpolate(x1, eps, t)
  v_hat = diffusion.velocity(x1_hat, xt, t, "x")
  per_frame_x = jnp.mean((x1_hat - x1) ** 2, axis=-1)
  per_frame_v = jnp.mean((v_hat - (x1 - eps)) ** 2, axis=-1)
  np.testing.assert_allclose(per_frame_x, (1 - t) ** 2 * per_frame_v, rtol=1e-4)
  np.testing.assert_allclose(diffusion.prediction_loss(x1_hat, x1, eps, "x"), per_frame_x.mean(), rtol=1e-6)
  np.testing.assert_allclose(diffusion.prediction_loss(v_hat, x1, eps, "v"), per_frame_v.mean(), rtol=1e-5)


def test_euler_with_oracle_x_prediction_lands_on_data():
  """If the network predicts x1 exactly, every Euler step moves straight to it."""
  x1 = jax.random.normal(jax.random.key(0), (3, 4))
  x0 = jax.random.normal(jax.random.key(1), (3, 4))
  for shift in (1.0, 3.0):
    out = diffusion.euler_integrate(lambda x, t: diffusion.velocity(x1, x, t, "x"), x0, diffusion.euler_grid(7, shift))
    np.testing.assert_allclose(out, x1, rtol=1e-5, atol=1e-5)


def test_euler_with_oracle_velocity():
  x1, eps = jnp.ones((2,)), -jnp.ones((2,))
  out = diffusion.euler_integrate(lambda x, t: x1 - eps, eps, diffusion.euler_grid(10))
  np.testing.assert_allclose(out, x1, atol=1e-6)


@pytest.mark.parametrize("sampling", ["uniform", "logit_normal"])
def test_timestep_sampling_range_and_shift(sampling):
  t = diffusion.sample_timesteps(jax.random.key(0), (20000,), _cfg(timestep_sampling=sampling))
  assert 0.0 <= float(t.min()) and float(t.max()) < 1.0
  assert abs(float(t.mean()) - 0.5) < 0.02
  shifted = diffusion.sample_timesteps(
    jax.random.key(0), (20000,), _cfg(timestep_sampling=sampling, timestep_shift=3.0)
  )
  assert float(shifted.mean()) < float(t.mean()) - 0.1  # shift > 1 moves mass toward noise
  grid = diffusion.euler_grid(4, 3.0)
  assert float(grid[0]) == 0.0 and float(grid[-1]) == 1.0 and bool(jnp.all(jnp.diff(grid) > 0))


def test_context_noise_range_and_off_switch():
  x1 = jnp.ones((64, 8, 16))
  out = diffusion.corrupt_context(jax.random.key(0), x1, _cfg())
  # Per frame out = t_in + (1 - t_in) * eps; the deviation from x1 is small but non-zero.
  dev = jnp.std(out - x1, axis=-1)
  assert 0.0 < float(dev.min()) and float(dev.max()) < 0.1 * 1.5
  assert out is not x1
  np.testing.assert_array_equal(diffusion.corrupt_context(jax.random.key(0), x1, _cfg(context_noise=False)), x1)
  np.testing.assert_array_equal(
    diffusion.corrupt_context(jax.random.key(0), x1, _cfg(context_t_min=1.0, context_t_max=1.0)), x1
  )


def test_unknown_options_raise():
  with pytest.raises(ValueError, match="prediction"):
    diffusion.prediction_loss(jnp.zeros((1, 1, 1)), jnp.zeros((1, 1, 1)), jnp.zeros((1, 1, 1)), "eps")
  with pytest.raises(ValueError, match="timestep_sampling"):
    diffusion.sample_timesteps(jax.random.key(0), (2,), _cfg(timestep_sampling="cosine"))


def test_first_clip_weight_scales_the_unconditional_frames_only():
  k = jax.random.split(jax.random.key(0), 3)
  x1, eps, out = (jax.random.normal(kk, (2, 4, 8)) for kk in k)
  block = jnp.asarray([[0, 0, 1, 2], [0, 1, 1, 1]])
  per_frame = jnp.mean((out - x1) ** 2, axis=-1)
  weights = diffusion.first_clip_weights(block, 0.25)
  np.testing.assert_array_equal(weights, [[0.25, 0.25, 1, 1], [0.25, 1, 1, 1]])
  expected = jnp.mean(jnp.sum(weights * per_frame, axis=1) / jnp.sum(weights, axis=1))  # each sample's own mean
  loss = diffusion.prediction_loss(out, x1, eps, "x", weights)
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  # Micro-batches (gradient accumulation) average to the same loss, whatever each sample's split.
  halves = [diffusion.prediction_loss(out[i : i + 1], x1[i : i + 1], eps, "x", weights[i : i + 1]) for i in (0, 1)]
  np.testing.assert_allclose(np.mean(halves), loss, rtol=1e-6)
  # Weight 0: only the frames with history count.
  only_history = diffusion.prediction_loss(out, x1, eps, "x", diffusion.first_clip_weights(block, 0.0))
  np.testing.assert_allclose(only_history, (per_frame[0, 2:].mean() + per_frame[1, 1:].mean()) / 2, rtol=1e-6)
  # Weight 1 is the reference's plain mean.
  ones = diffusion.first_clip_weights(block, 1.0)
  np.testing.assert_allclose(diffusion.prediction_loss(out, x1, eps, "x", ones), per_frame.mean(), rtol=1e-6)
