"""Train state, optimiser, loss and the jit-compiled sharded train step (pure functions).

`train.py` drives these; tests call them directly.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from vgpt_jax import diffusion, parallel
from vgpt_jax.layout import Layout, sample_splits, training_layout
from vgpt_jax.model import VideoGPT
from vgpt_jax.model.tokenizer import PixelTokenizer, make_tokenizer


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
  step: jax.Array  # int32 []
  params: Any
  opt_state: Any
  rng: jax.Array  # PRNG key; step s uses fold_in(rng, s)


@dataclasses.dataclass(frozen=True)
class Setup:
  """Everything static a run derives from its config once."""

  config: ml_collections.ConfigDict
  model: VideoGPT
  tokenizer: PixelTokenizer
  layout: Layout
  optimizer: optax.GradientTransformation
  latent_shape: tuple[int, int, int]  # (h, w, C)


def make_optimizer(optim_cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """AdamW (reference hyper-parameters) with linear warmup to a constant LR and norm clipping."""
  schedule = optax.join_schedules(
    [optax.linear_schedule(0.0, optim_cfg.lr, max(optim_cfg.warmup_steps, 1)), optax.constant_schedule(optim_cfg.lr)],
    [max(optim_cfg.warmup_steps, 1)],
  )
  return optax.chain(
    optax.clip_by_global_norm(optim_cfg.grad_clip),
    optax.adamw(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps, weight_decay=optim_cfg.weight_decay),
  )


def make_setup(config: ml_collections.ConfigDict) -> Setup:
  tokenizer = make_tokenizer(config.tokenizer)
  h, w, c = tokenizer.latent_shape(config.data.height, config.data.width)
  p = config.model.patch_size
  return Setup(
    config=config,
    model=VideoGPT.from_config(config.model),
    tokenizer=tokenizer,
    layout=training_layout(config.data.num_frames, (h // p) * (w // p)),
    optimizer=make_optimizer(config.optim),
    latent_shape=(h, w, c),
  )


def init_params(setup: Setup, key: jax.Array) -> Any:
  """Boxed (logically annotated) parameters; shapes only under eval_shape."""
  n = setup.config.data.num_frames
  latents = jnp.zeros((1, n) + setup.latent_shape, jnp.float32)
  split = jnp.zeros((1, n), jnp.int32)
  return setup.model.init(key, latents, latents, jnp.zeros((1, n)), split, setup.layout)["params"]


def _boxed_state(setup: Setup, seed: int) -> TrainState:
  init_key, run_key = jax.random.split(jax.random.key(seed))
  params = init_params(setup, init_key)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=setup.optimizer.init(params), rng=run_key)


def state_shardings(setup: Setup, mesh: Mesh) -> TrainState:
  """NamedShardings of the train state, from shapes only (nothing materialised)."""
  abstract = jax.eval_shape(functools.partial(_boxed_state, setup, setup.config.seed))
  with nn.logical_axis_rules(parallel.LOGICAL_RULES):
    return parallel.logical_shardings(abstract, mesh)


def create_state(setup: Setup, mesh: Mesh) -> TrainState:
  """Initialise the train state directly into its shardings."""
  shardings = state_shardings(setup, mesh)
  init = jax.jit(lambda: nn.unbox(_boxed_state(setup, setup.config.seed)), out_shardings=shardings)
  with jax.set_mesh(mesh):
    return init()


def loss_fn(params: Any, setup: Setup, video: jax.Array, key: jax.Array) -> tuple[jax.Array, dict]:
  """Next-clip flow-matching loss of one batch.

  video: float32 [B, N, H, W, 3] in [-1, 1]. Randomness (split, t, noise,
  context noise) all comes from `key`.
  """
  cfg = setup.config
  x1 = setup.tokenizer.encode(video)  # [B, N, h, w, C]
  b, n = x1.shape[:2]
  split_key, t_key, eps_key, ctx_key = jax.random.split(key, 4)
  block_of_frame = sample_splits(split_key, b, n, cfg.layout)
  t_clip = diffusion.sample_timesteps(t_key, (b, n), cfg.diffusion)  # one t per clip index
  t = jnp.take_along_axis(t_clip, block_of_frame, axis=1)  # [B, N] per frame
  eps = jax.random.normal(eps_key, x1.shape, x1.dtype)
  x_t = diffusion.interpolate(x1, eps, t)
  clean = diffusion.corrupt_context(ctx_key, x1, cfg.diffusion)
  output = setup.model.apply({"params": params}, clean, x_t, t, block_of_frame, setup.layout)
  loss = diffusion.prediction_loss(output, x1, eps, cfg.diffusion.prediction)
  return loss, {"loss": loss}


def train_step(setup: Setup, state: TrainState, video: jax.Array) -> tuple[TrainState, dict]:
  """One optimiser step; pure, so it can be jit-compiled with shardings."""
  key = jax.random.fold_in(state.rng, state.step)
  grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params, setup, video, key)
  updates, opt_state = setup.optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = dict(metrics, grad_norm=optax.tree.norm(grads))
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=state.rng), metrics


def compile_train_step(setup: Setup, mesh: Mesh) -> Callable[[TrainState, jax.Array], tuple[TrainState, dict]]:
  """jit with explicit in/out shardings and the state donated (updated in place)."""
  shardings = state_shardings(setup, mesh)
  step = jax.jit(
    functools.partial(train_step, setup),
    in_shardings=(shardings, parallel.batch_sharding(mesh)),
    out_shardings=(shardings, parallel.replicated(mesh)),
    donate_argnums=0,
  )

  def run(state: TrainState, video: jax.Array) -> tuple[TrainState, dict]:
    with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.LOGICAL_RULES):
      return step(state, video)

  return run
