"""The train state, optimiser, loss and the jit-compiled sharded train step (pure functions) of a `Run`.

`train.py` drives these; tests call them directly. Nothing that samples imports this module.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from vgpt_jax import diffusion, parallel
from vgpt_jax.data.sources import SKIP_REASONS
from vgpt_jax.layout import sample_splits
from vgpt_jax.run import Run, init_params


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
  step: jax.Array  # int32 []
  params: Any
  opt_state: Any
  rng: jax.Array  # uint32 [2] raw key data (checkpointable); see `step_key`
  ema: Any  # exponential moving average of params, or None when train.ema_decay = 0
  skipped: jax.Array  # int32 []: steps whose loss or gradient was not finite (update skipped)
  skipped_videos: jax.Array  # int32 [len(SKIP_REASONS)]: bad videos the pipeline replaced, all processes, by reason


def make_schedule(optim_cfg: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup to a constant LR (the reference's schedule)."""
  warmup = max(optim_cfg.warmup_steps, 1)
  return optax.join_schedules(
    [optax.linear_schedule(0.0, optim_cfg.lr, warmup), optax.constant_schedule(optim_cfg.lr)], [warmup]
  )


def make_optimizer(optim_cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """AdamW (reference hyper-parameters) after global-norm clipping."""
  return optax.chain(
    optax.clip_by_global_norm(optim_cfg.grad_clip),
    optax.adamw(
      make_schedule(optim_cfg), b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps, weight_decay=optim_cfg.weight_decay
    ),
  )


def _boxed_state(run: Run, seed: int) -> TrainState:
  init_key, run_key = jax.random.split(jax.random.key(seed))
  params = init_params(run, init_key)
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    opt_state=make_optimizer(run.config.optim).init(params),
    rng=jax.random.key_data(run_key),
    ema=jax.tree.map(jnp.copy, params) if run.config.train.ema_decay > 0 else None,
    skipped=jnp.zeros((), jnp.int32),
    skipped_videos=jnp.zeros(len(SKIP_REASONS), jnp.int32),
  )


def _boxed_abstract_state(run: Run) -> TrainState:
  """Shapes of the state with their logical axis names (one trace of init, nothing allocated)."""
  return jax.eval_shape(functools.partial(_boxed_state, run, run.config.seed))


def _shardings_of(boxed: TrainState, mesh: Mesh) -> TrainState:
  with nn.logical_axis_rules(parallel.LOGICAL_RULES):
    return parallel.logical_shardings(boxed, mesh)


def abstract_state(run: Run) -> TrainState:
  """Shapes and dtypes of the (unboxed) train state; nothing is allocated."""
  return nn.unbox(_boxed_abstract_state(run))


def state_shardings(run: Run, mesh: Mesh) -> TrainState:
  """NamedShardings of the train state, from shapes only (nothing materialised)."""
  return _shardings_of(_boxed_abstract_state(run), mesh)


def sharded_abstract_state(run: Run, mesh: Mesh) -> TrainState:
  """The state's shapes with the shardings wanted on `mesh`: the target for compiling and restoring."""
  boxed = _boxed_abstract_state(run)
  return jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.unbox(boxed), _shardings_of(boxed, mesh)
  )


def create_state(run: Run, mesh: Mesh) -> TrainState:
  """Initialise the train state directly into its shardings."""
  shardings = state_shardings(run, mesh)
  init = jax.jit(lambda: nn.unbox(_boxed_state(run, run.config.seed)), out_shardings=shardings)
  with jax.set_mesh(mesh):
    return init()


def _noised_sample(run: Run, key: jax.Array, x1: jax.Array) -> tuple[jax.Array, ...]:
  """The random part of one training sample: split, timesteps and noise.

  x1: [N, h, w, C] clean latents. Returns (clean context input, x_t, t [N],
  clip_of_frame [N], eps). Drawn from a per-sample key so a sample's noise does
  not depend on the batch it sits in (gradient accumulation and any sharding
  see the same randomness).
  """
  cfg = run.config
  n = x1.shape[0]
  split_key, t_key, eps_key, ctx_key = jax.random.split(key, 4)
  clip_of_frame = sample_splits(split_key, 1, n, cfg.layout)[0]
  t = diffusion.sample_timesteps(t_key, (n,), cfg.diffusion)[clip_of_frame]  # one t per clip
  eps = jax.random.normal(eps_key, x1.shape, x1.dtype)
  x_t = diffusion.interpolate(x1[None], eps[None], t[None])[0]
  clean = diffusion.corrupt_context(ctx_key, x1[None], cfg.diffusion)[0]
  return clean, x_t, t, clip_of_frame, eps


def loss_fn(params: Any, run: Run, inputs: jax.Array, keys: jax.Array) -> jax.Array:
  """Next-clip flow-matching loss of one batch.

  inputs: float32 frames [B, N, H, W, 3] in [-1, 1], or latents [B, N, h, w, C]
  when run.inputs == "latents"; keys: [B] per-sample PRNG keys.
  """
  chex.assert_shape(inputs, run.input_shape(inputs.shape[0]))
  chex.assert_shape(keys, (inputs.shape[0],))
  x1 = inputs if run.inputs == "latents" else run.tokenizer.encode(inputs)  # [B, N, h, w, C]
  clean, x_t, t, clip_of_frame, eps = jax.vmap(functools.partial(_noised_sample, run))(keys, x1)
  output = run.model.apply({"params": params}, clean, x_t, t, clip_of_frame, run.layout)
  dif = run.config.diffusion
  weight = None if dif.first_clip_weight == 1.0 else diffusion.first_clip_weights(clip_of_frame, dif.first_clip_weight)
  return diffusion.prediction_loss(output, x1, eps, dif.prediction, weight)


def step_key(state: TrainState) -> jax.Array:
  """The PRNG key of the state's current step."""
  return jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)


def loss_and_grads(run: Run, params: Any, inputs: jax.Array, key: jax.Array) -> tuple[jax.Array, Any]:
  """Mean loss and gradient over the batch, in train.grad_accum_steps sequential micro-batches.

  Sample i always uses fold_in(key, i), so accumulation changes memory, not the result.
  """
  b = inputs.shape[0]
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(b))
  k = run.config.train.grad_accum_steps
  grad_fn = jax.value_and_grad(loss_fn)
  if k == 1:
    return grad_fn(params, run, inputs, keys)

  def micro(x: jax.Array) -> jax.Array:
    # Strided micro-batches ([B/k, k] -> [k, B/k]) keep each device's rows on that device.
    return jnp.swapaxes(x.reshape((b // k, k) + x.shape[1:]), 0, 1)

  def accumulate(carry, batch):
    loss, grads = grad_fn(params, run, *batch)
    return jax.tree.map(jnp.add, carry, (loss, grads)), None

  zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
  (loss, grads), _ = jax.lax.scan(accumulate, zeros, (micro(inputs), micro(keys)))
  return loss / k, jax.tree.map(lambda g: g / k, grads)


def no_skips(batch_size: int) -> jax.Array:
  """int32 [batch_size, len(SKIP_REASONS)] zeros: the skip counts of a batch with no bad video."""
  return jnp.zeros((batch_size, len(SKIP_REASONS)), jnp.int32)


def train_step(run: Run, state: TrainState, inputs: jax.Array, skipped_videos: jax.Array) -> tuple[TrainState, dict]:
  """One optimiser step on a batch of `run.input_shape`; pure, so it can be jit-compiled with shardings.

  skipped_videos: int32 [B, len(SKIP_REASONS)], the bad videos the pipeline
  replaced for each sample; summed into the state, so the totals cover every
  process and survive a resume. A step whose loss or gradient is not finite
  leaves params, optimiser state and EMA untouched and is counted in `skipped`.
  """
  loss, grads = loss_and_grads(run, state.params, inputs, step_key(state))
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  updates, opt_state = make_optimizer(run.config.optim).update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)

  def keep_if_finite(new, old):
    return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)

  params = keep_if_finite(params, state.params)
  ema = state.ema
  if ema is not None:
    decay = run.config.train.ema_decay
    ema = keep_if_finite(jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, ema, params), ema)
  new_state = TrainState(
    step=state.step + 1,
    params=params,
    opt_state=keep_if_finite(opt_state, state.opt_state),
    rng=state.rng,
    ema=ema,
    skipped=state.skipped + (~finite).astype(jnp.int32),
    skipped_videos=state.skipped_videos + jnp.sum(skipped_videos, axis=0, dtype=jnp.int32),
  )
  metrics = {
    "loss": loss,
    "grad_norm": grad_norm,
    "lr": make_schedule(run.config.optim)(state.step),
    "skipped_steps": new_state.skipped,
    **{f"skipped_{reason}": new_state.skipped_videos[i] for i, reason in enumerate(SKIP_REASONS)},
  }
  return new_state, metrics


def compile_train_step(run: Run, mesh: Mesh) -> jax.stages.Compiled:
  """Ahead-of-time compiled train step with explicit in/out shardings and the state donated.

  Compiled from shapes alone, so its memory use can be reported before the
  first step (`.memory_analysis()`). Call it as `state, metrics = step(state, inputs, skipped_videos)`,
  inputs of `run.input_shape(train.batch_size)` (frames or pre-encoded latents), skipped_videos
  int32 [train.batch_size, len(SKIP_REASONS)] (`no_skips` for none).
  """
  return lower_train_step(run, mesh).compile()


def lower_train_step(run: Run, mesh: Mesh) -> jax.stages.Lowered:
  """The train step traced and lowered for `mesh`, not yet compiled (`compile_train_step` compiles it)."""
  abstract = sharded_abstract_state(run, mesh)
  shardings = jax.tree.map(lambda a: a.sharding, abstract)
  inputs = jax.ShapeDtypeStruct(
    run.input_shape(run.config.train.batch_size), jnp.float32, sharding=parallel.batch_sharding(mesh)
  )
  skips = jax.ShapeDtypeStruct(
    (run.config.train.batch_size, len(SKIP_REASONS)), jnp.int32, sharding=parallel.batch_sharding(mesh)
  )
  step = jax.jit(
    functools.partial(train_step, run),
    in_shardings=(shardings, parallel.batch_sharding(mesh), parallel.batch_sharding(mesh)),
    out_shardings=(shardings, parallel.replicated(mesh)),
    donate_argnums=0,
  )
  with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.LOGICAL_RULES):
    return step.lower(abstract, inputs, skips)


def memory_summary(compiled: jax.stages.Compiled) -> dict[str, float]:
  """GiB per device of the compiled step: arguments, outputs, temporaries and their total."""
  m = compiled.memory_analysis()
  if m is None:  # not every backend reports it
    return {}
  gib = 1 << 30
  fields = {
    "argument_gib": m.argument_size_in_bytes,
    "output_gib": m.output_size_in_bytes,
    "temp_gib": m.temp_size_in_bytes,
    "alias_gib": m.alias_size_in_bytes,
  }
  out = {k: v / gib for k, v in fields.items()}
  # Donated outputs alias their arguments, so they are not counted twice.
  out["total_gib"] = (
    m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
  ) / gib
  return out
