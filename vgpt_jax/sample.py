"""Next-clip generation (SPEC section 7).

`predict_clip` is the simple, exact sampler: it runs the training layout with
a two-clip split (context | clip to generate) and recomputes the whole
sequence at every Euler step, as the reference does. Its noisy context copies
are never seen by the generated clip (the mask hides other noisy clips), so
they are filled with the context itself.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from vgpt_jax import diffusion
from vgpt_jax.layout import fixed_split
from vgpt_jax.trainer import Setup


def predict_clip(
  setup: Setup, params: Any, context: jax.Array, key: jax.Array, steps: int, shift: float = 1.0
) -> jax.Array:
  """Generate the frames after `context` up to the layout's frame count.

  Args:
    context: float32 [B, m, h, w, C] clean context latents, 1 <= m < N.
    key: noise key.
    steps: Euler steps from t = 0 to 1.
  Returns:
    float32 [B, N - m, h, w, C] generated latents.
  """
  b, m = context.shape[:2]
  n = setup.layout.num_frames
  g = n - m
  split = jnp.broadcast_to(jnp.asarray(fixed_split((m, g))), (b, n))
  noise = jax.random.normal(key, (b, g) + context.shape[2:], context.dtype)
  prediction = setup.config.diffusion.prediction

  def velocity_fn(x: jax.Array, t: jax.Array) -> jax.Array:
    frames = jnp.concatenate([context, x], axis=1)  # the last clean frame is unused by the layout
    t_frames = jnp.concatenate([jnp.ones((b, m)), jnp.full((b, g), t)], axis=1)
    out = setup.model.apply({"params": params}, frames, frames, t_frames, split, setup.layout)
    return diffusion.velocity(out[:, m:], x, jnp.full((b, g), t), prediction)

  return diffusion.euler_integrate(velocity_fn, noise, diffusion.euler_grid(steps, shift))
