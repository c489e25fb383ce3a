"""Shared defaults: the reference recipe's objective and optimiser, a small model.

Every other config starts from this one. Run it as it is with
  python -m vgpt_jax.train --config=configs/base.py --workdir=/tmp/vgpt_base
"""

import ml_collections

from vgpt_jax import parallel
from vgpt_jax.data.pipeline import default_data_config
from vgpt_jax.model import model_config
from vgpt_jax.model.tokenizer import tokenizer_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  c = ml_collections.ConfigDict()
  c.seed = 0

  # The built-in synthetic physics world. For your own videos: --config.data.source=video_files
  # --config.data.path=DIR (or data.manifest=FILE); the fields are listed in default_data_config.
  c.data = default_data_config()
  c.tokenizer = tokenizer_config()  # pixel (frames folded into channels) or vae (the SDXL VAE: tokenizer.vae_path)
  c.model = model_config("tiny")

  # How frames are cut into clips (SPEC section 3).
  c.layout = ml_collections.ConfigDict(
    dict(
      split="random",  # random | per_frame (stage 1) | fixed
      min_clips=2,
      max_clips=-1,  # -1: up to one clip per frame
      fixed_clip_sizes=(),  # with split="fixed"
    )
  )

  # Flow matching (SPEC section 4); the defaults are the reference's choices.
  c.diffusion = ml_collections.ConfigDict(
    dict(
      prediction="x",  # x | v
      timestep_sampling="uniform",  # uniform | logit_normal
      logit_normal_mean=0.0,
      logit_normal_std=1.0,
      timestep_shift=1.0,  # 1 = no shift
      context_noise=True,  # feed clean frames as t_in*x1 + (1-t_in)*eps
      context_t_min=0.9,
      context_t_max=1.0,
      first_clip_weight=1.0,  # loss weight of the first (unconditional) clip's frames; 1 = plain mean
    )
  )

  # AdamW as in the reference: constant LR after linear warmup, clip 1.0.
  c.optim = ml_collections.ConfigDict(
    dict(
      lr=1e-4,
      b1=0.9,
      b2=0.95,
      eps=1e-5,
      weight_decay=0.1,
      grad_clip=1.0,
      warmup_steps=1000,
    )
  )

  c.mesh = parallel.mesh_config()  # data/fsdp/tensor/context sizes (-1: fill) and mesh.dcn (multi-slice)

  # Orbax checkpoints: train state + data iterator + config.
  c.checkpoint = ml_collections.ConfigDict(
    dict(
      directory="",  # "" = WORKDIR/checkpoints; may be a gs:// URL (Orbax writes it directly)
      every_steps=500,  # also saved at the last step and on SIGTERM (preemption)
      keep_last=3,  # newest checkpoints kept ...
      keep_every=0,  # ... plus every step divisible by this (0: none)
      async_save=True,
      # Stage-to-stage init: parameters only from another run (a workdir or its
      # checkpoints dir); fresh optimizer, schedule and step. Ignored on resume.
      init_from="",
      init_from_step=-1,  # -1: that run's latest step
      init_from_ema=False,  # take the other run's EMA parameters
    )
  )

  c.train = ml_collections.ConfigDict(
    dict(
      steps=1000,
      batch_size=16,  # global, over all hosts
      grad_accum_steps=1,  # micro-batches per step (batch_size must divide evenly)
      ema_decay=0.0,  # > 0 keeps an EMA of the parameters (0: off, as the reference)
      max_skipped_steps=10,  # stop after this many steps with a non-finite loss or gradient
      log_every=10,
      tensorboard=True,  # also write TensorBoard event files to WORKDIR/tensorboard
      profile_start_step=-1,  # >= 0: write a profiler trace of steps [start, start + profile_steps)
      profile_steps=5,
      # The sample written at the end: context frames, the rest predicted.
      num_samples=4,
      sample_context_frames=4,
      sample_steps=25,
      sample_clip_frames=0,  # frames generated per clip (0: all the rest in one clip); also sample/evaluate's default
      sample_window=0,  # frames the model sees at once when sampling (0: data.num_frames); also sample/evaluate's
      sample_guidance=1.0,  # classifier-free guidance scale (1: off); also sample/evaluate's default
      sample_context_noise=False,  # noise context frames as training does (diffusion.context_t_*); off: reference
    )
  )
  return c
