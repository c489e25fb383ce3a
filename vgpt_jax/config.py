"""Config validation: refuse a bad config with every problem named, before anything compiles.

`validate` checks the config on its own (cheap, no devices, no data listing);
`preflight` adds what needs the machine and the data (device count, file
counts, usable files), for the main job to call before it restores or compiles.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections

from vgpt_jax import diffusion
from vgpt_jax.attention.select import ATTENTIONS
from vgpt_jax.data import latents
from vgpt_jax.data.buckets import base_bucket, parse_buckets
from vgpt_jax.data.pipeline import bucket_probabilities, held_out_members, make_source, validate_data_config
from vgpt_jax.layout import SPLITS
from vgpt_jax.model.tokenizer import TOKENIZERS
from vgpt_jax.model.transformer import REMAT_POLICIES, SAVEABLE, RopeScaling
from vgpt_jax.model.video_gpt import DTYPES


class ConfigError(ValueError):
  """A config value that cannot work; the message names each field and its fix."""


def _choice(problems: list[str], name: str, value, options) -> None:
  if value not in options:
    problems.append(f"{name}={value!r} is not a known option; choose one of {sorted(options)}")


def validate(config: ml_collections.ConfigDict) -> None:
  """Raise ConfigError listing every problem found in `config` (no-op when it is sound)."""
  problems = _problems(config)
  if problems:
    raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))


def preflight(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """`validate`, then the checks that need this machine and the data; raise ConfigError naming every problem.

  Builds the train and eval sources (for video files: lists and probes every
  file once, see video_files.py) to learn how many usable videos there are, and
  returns them ({"train": ..., "eval": ...}) so the caller need not build them again.
  """
  problems = _problems(config)
  sources: dict[str, Any] = {}
  if not problems:
    problems = _machine_problems(config) + _data_problems(config, sources)
  if problems:
    raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))
  return sources


def _machine_problems(config: ml_collections.ConfigDict) -> list[str]:
  """The mesh against the devices and processes there are, and the batch against the mesh."""
  from vgpt_jax import parallel  # jax device queries: only here, not in the static checks

  try:
    shape = dict(zip(parallel.MESH_AXES, parallel.device_grid(config.mesh, jax.devices()).shape))
  except ValueError as e:
    fields = " ".join(f"--config.mesh.{axis}=..." for axis in parallel.MESH_AXES)
    return [f"{e}: set the mesh to fit the {jax.device_count()} devices ({fields}; one of them may be -1)"]
  shards, processes, batch = shape["data"] * shape["fsdp"], jax.process_count(), config.train.batch_size
  problems = []
  if batch % shards or batch % processes:
    problems.append(
      f"train.batch_size={batch} must divide evenly over the {shards} data*fsdp shards of the mesh {shape} "
      f"and the {processes} processes"
    )
  elif batch // processes < config.train.grad_accum_steps:
    problems.append(
      f"train.grad_accum_steps={config.train.grad_accum_steps} leaves no sample per micro-batch on a process"
    )
  return problems


def _data_problems(config: ml_collections.ConfigDict, sources: dict[str, Any]) -> list[str]:
  """Whether the train and eval sources can be built and hold enough usable videos; fills `sources`."""
  problems = []
  for split in ("train", "eval"):
    try:
      source = sources[split] = make_source(config.data, split)
    except Exception as e:  # noqa: BLE001 - whatever stops the source is a problem to name
      problems.append(f"{split} data: {e}")
      continue
    if split == "train" and len(config.data.bucket_weights):
      try:
        bucket_probabilities(source, config.data)
      except ValueError as e:
        problems.append(f"train data: {e}")
    usable = len(held_out_members(source, config.data))
    if split == "eval" and usable < config.train.num_samples:
      shape = f" at {config.data.height}x{config.data.width} (their bucket)" if len(config.data.buckets) else ""
      problems.append(
        f"train.num_samples={config.train.num_samples} held-out samples asked for, but {source.describe()} has "
        f"{usable} usable videos{shape}: lower train.num_samples or hold out more (data.num_eval_videos, "
        "data.eval_path)"
      )
  return problems


BUCKETED_SOURCES = ("video_files", "latents")


def _problems(config: ml_collections.ConfigDict, check_source: bool = True) -> list[str]:
  """Every problem `validate` finds, as one line each (`check_source`: the data source's fields too)."""
  problems: list[str] = []
  m, d, tok, lay, dif, opt, tr = (
    config.model,
    config.data,
    config.tokenizer,
    config.layout,
    config.diffusion,
    config.optim,
    config.train,
  )

  # Model shape.
  _choice(problems, "model.attention", m.attention, ATTENTIONS)
  if m.attention_block < 8 or m.attention_block % 8:
    problems.append(f"model.attention_block={m.attention_block} must be a positive multiple of 8")
  _choice(problems, "model.remat", m.remat, REMAT_POLICIES)
  unknown = sorted(set(m.remat_save) - set(SAVEABLE))
  if unknown:
    problems.append(f"model.remat_save names unknown activations {unknown}; choose from {list(SAVEABLE)}")
  if m.remat_save and m.remat != "save_names":
    problems.append(f"model.remat_save={tuple(m.remat_save)} needs model.remat='save_names' (got {m.remat!r})")
  _choice(problems, "model.dtype", m.dtype, DTYPES)
  _choice(problems, "model.param_dtype", m.param_dtype, DTYPES)
  if m.hidden % m.num_heads:
    problems.append(f"model.hidden={m.hidden} is not divisible by model.num_heads={m.num_heads}")
  elif (m.hidden // m.num_heads) % 2:
    problems.append(f"head dim model.hidden/model.num_heads={m.hidden // m.num_heads} must be even for RoPE")
  if m.hidden % 4:
    problems.append(f"model.hidden={m.hidden} must be divisible by 4 (2D sin-cos table)")
  try:
    scaling = RopeScaling.from_config(m.rope_scaling)
  except (ValueError, TypeError) as e:
    problems.append(str(e))
  else:
    if scaling is not None and not m.hidden % m.num_heads:
      half = m.hidden // m.num_heads // 2
      if len(scaling.short_factor) != half or len(scaling.long_factor) != half:
        problems.append(f"model.rope_scaling factors must have head_dim / 2 = {half} entries each")
  for name in ("num_layers", "hidden", "num_heads", "mlp_dim", "patch_size"):
    if m[name] < 1:
      problems.append(f"model.{name}={m[name]} must be >= 1")

  # Frames -> latents -> patches.
  if check_source:
    try:
      validate_data_config(d)
    except ValueError as e:
      problems.append(str(e))
  _choice(problems, "tokenizer.kind", tok.kind, TOKENIZERS)
  if d.source == "latents" and check_source:
    problems.extend(latents.tokenizer_problems(d, tok))
  cell = tok.downsample * m.patch_size
  for name in ("height", "width"):
    if cell > 0 and d[name] % cell:
      problems.append(
        f"data.{name}={d[name]} is not divisible by tokenizer.downsample*model.patch_size={cell}: "
        f"use a frame size that is a multiple of {cell} or a smaller patch"
      )
  if cell > 0 and max(d.height, d.width) // cell > m.pos_embed_max_size:
    problems.append(
      f"patch grid {d.height // cell}x{d.width // cell} exceeds model.pos_embed_max_size={m.pos_embed_max_size}"
    )

  if config.mesh.context < 1:
    problems.append(f"mesh.context={config.mesh.context}: give the context-parallel size explicitly (1 = off)")

  # Frames and clips.
  n = d.num_frames
  if n < 2:
    problems.append(f"data.num_frames={n} must be >= 2 (a context clip and a clip to predict)")
  _choice(problems, "layout.split", lay.split, SPLITS)
  max_clips = n if lay.max_clips <= 0 else lay.max_clips
  if lay.split == "random":
    if lay.min_clips < 2:
      problems.append(f"layout.min_clips={lay.min_clips} must be >= 2 (SPEC: K >= 2)")
    if max_clips > n:
      problems.append(
        f"layout.max_clips={lay.max_clips} is larger than data.num_frames={n}: "
        f"a clip needs at least one frame; use <= {n} (or -1 for num_frames)"
      )
    if lay.min_clips > max_clips:
      problems.append(f"layout.min_clips={lay.min_clips} > layout.max_clips={max_clips}")
  if lay.split == "fixed":
    sizes = tuple(lay.fixed_clip_sizes)
    if sum(sizes) != n or any(s < 1 for s in sizes) or len(sizes) < 2:
      problems.append(f"layout.fixed_clip_sizes={sizes} must be >= 2 positive sizes summing to data.num_frames={n}")

  # Objective.
  _choice(problems, "diffusion.prediction", dif.prediction, diffusion.PREDICTIONS)
  _choice(problems, "diffusion.timestep_sampling", dif.timestep_sampling, diffusion.TIMESTEP_SAMPLINGS)
  if dif.timestep_shift <= 0:
    problems.append(f"diffusion.timestep_shift={dif.timestep_shift} must be > 0 (1 = no shift)")
  if dif.first_clip_weight < 0:
    problems.append(f"diffusion.first_clip_weight={dif.first_clip_weight} must be >= 0 (1 = plain mean)")
  if not 0.0 <= dif.context_t_min <= dif.context_t_max <= 1.0:
    problems.append(
      f"need 0 <= diffusion.context_t_min <= diffusion.context_t_max <= 1, got {dif.context_t_min}, {dif.context_t_max}"
    )

  # Optimisation and loop.
  if opt.lr <= 0:
    problems.append(f"optim.lr={opt.lr} must be > 0")
  if opt.warmup_steps < 0:
    problems.append(f"optim.warmup_steps={opt.warmup_steps} must be >= 0")
  if tr.steps < 1 or tr.batch_size < 1:
    problems.append(f"train.steps={tr.steps} and train.batch_size={tr.batch_size} must be >= 1")
  if tr.grad_accum_steps < 1 or tr.batch_size % tr.grad_accum_steps:
    problems.append(
      f"train.grad_accum_steps={tr.grad_accum_steps} must be >= 1 and divide train.batch_size={tr.batch_size}"
    )
  if not 0.0 <= tr.ema_decay < 1.0:
    problems.append(f"train.ema_decay={tr.ema_decay} must be in [0, 1) (0 turns EMA off)")
  ck = config.checkpoint
  if ck.every_steps < 1 or ck.keep_last < 1 or ck.keep_every < 0:
    problems.append(
      f"checkpoint.every_steps={ck.every_steps} and checkpoint.keep_last={ck.keep_last} must be >= 1, "
      f"checkpoint.keep_every={ck.keep_every} >= 0"
    )
  if not 1 <= tr.sample_context_frames < n:
    problems.append(f"train.sample_context_frames={tr.sample_context_frames} must be in [1, data.num_frames-1={n - 1}]")
  elif not 0 <= tr.sample_clip_frames <= n - tr.sample_context_frames:
    problems.append(
      f"train.sample_clip_frames={tr.sample_clip_frames} must be in [0, data.num_frames - "
      f"train.sample_context_frames = {n - tr.sample_context_frames}] (0: all the predicted frames in one clip)"
    )
  if not (tr.sample_window == 0 or tr.sample_context_frames + max(tr.sample_clip_frames, 1) <= tr.sample_window <= n):
    problems.append(
      f"train.sample_window={tr.sample_window} must be 0 (data.num_frames) or in [train.sample_context_frames + "
      f"train.sample_clip_frames, data.num_frames={n}]"
    )
  if tr.sample_guidance <= 0:
    problems.append(f"train.sample_guidance={tr.sample_guidance} must be > 0 (1: no guidance)")
  held_out = d.num_eval_videos
  separate_eval = d.eval_path or d.eval_manifest or d.source in ("tfds", "latents")
  if tr.num_samples < 1:
    problems.append(f"train.num_samples={tr.num_samples} must be >= 1 (held-out videos continued at the end)")
  elif not separate_eval and tr.num_samples > held_out:
    problems.append(
      f"train.num_samples={tr.num_samples} is more than the data.num_eval_videos={held_out} held out: lower "
      "train.num_samples or raise data.num_eval_videos"
    )
  if tok.kind == "vae":
    problems.extend(_vae_problems(tok.vae_path))
  problems.extend(_bucket_problems(config, problems))
  return problems


def _bucket_problems(config: ml_collections.ConfigDict, found: list[str]) -> list[str]:
  """data.buckets: well formed, a source that has them, data.height x data.width among them, and every check
  of the model, layout and sampling that holds for data.height x data.width x data.num_frames holding for each
  bucket's shape too (`found`: the problems of the config itself, not repeated)."""
  d = config.data
  if not len(d.buckets):
    return [f"data.bucket_weights={tuple(d.bucket_weights)} needs data.buckets"] if len(d.bucket_weights) else []
  try:
    buckets = parse_buckets(d.buckets, config.tokenizer.downsample, config.model.patch_size)
  except (ValueError, TypeError) as e:
    return [f"data.buckets={tuple(d.buckets)}: {e}"]
  problems = []
  if d.source not in BUCKETED_SOURCES:
    problems.append(f"data.buckets needs data.source in {list(BUCKETED_SOURCES)} (got {d.source!r})")
  if base_bucket(d) is None:
    problems.append(
      f"data.height x data.width = {d.height}x{d.width} ({d.num_frames} frames) is not one of data.buckets: set "
      "them to one bucket's (the end-of-run sample and the held-out clips use it)"
    )
  if len(d.bucket_weights) not in (0, len(buckets)):
    problems.append(f"data.bucket_weights has {len(d.bucket_weights)} entries for {len(buckets)} buckets")
  for b in buckets:
    variant = config.copy_and_resolve_references()
    variant.data.height, variant.data.width, variant.data.num_frames = b.height, b.width, b.frames or d.num_frames
    variant.data.buckets, variant.data.bucket_weights = (), ()
    label = f"bucket {b.height}x{b.width}" + (f"x{b.frames}" if b.frames else "")
    problems.extend(f"{label}: {p}" for p in _problems(variant, check_source=False) if p not in found)
  return problems


def _vae_problems(path: str) -> list[str]:
  from vgpt_jax.model import vae

  if not path:
    return ["tokenizer.kind='vae' needs tokenizer.vae_path: a diffusers-format AutoencoderKL directory"]
  missing = [name for name in (vae.CONFIG_NAME, vae.WEIGHTS_NAME) if not os.path.isfile(os.path.join(path, name))]
  if missing:
    return [f"tokenizer.vae_path={path!r} lacks {missing}: give a diffusers-format AutoencoderKL directory"]
  return []
