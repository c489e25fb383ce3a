"""Pre-encode a video source into latent shards, so training runs without the VAE in its step.

  python -m vgpt_jax.encode --config=CONFIG --output=DIR [--splits=train,eval]
      [--shard_size=256] [--max_frames=0] [--dtype=float16] [--batch_frames=16]
      [--worker_index=0 --num_workers=1] [--config.data.path=... ...]

CONFIG's `data` names the videos (any data.source but latents) and its
`tokenizer` the encoder (the VAE of tokenizer.vae_path, or pixels). Every
usable video of a split becomes one record holding the latents of its frames
0, s, 2s, ... (s = data.frame_stride; at most --max_frames of them, 0 = all),
each frame scaled and cropped to data.height x data.width as training does
(with data.buckets: to its bucket's size; the index records each video's
bucket, and training on the latents uses the same buckets).
Bad videos are skipped and counted by reason, as in training. The layout on
disk is described in vgpt_jax/data/latents.py. Then train with

  --config.data.source=latents --config.data.latents_path=DIR

(same tokenizer and frame size; data.frame_stride a multiple of s).

Resumable: shards are written whole (a temporary file renamed when done), so a
run that stops is restarted with the same command and redoes only the shards
that were not finished. DIR/encoding.json holds the settings, and a restart
with other settings is refused rather than mixing two encodings.

Parallel: N copies with --worker_index=i --num_workers=N (one per host or per
accelerator) split the shards (shard j goes to worker j % N); whichever
finishes last writes DIR/latents.json.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from array_record.python.array_record_module import ArrayRecordWriter
from ml_collections import config_flags
from tqdm import tqdm

from vgpt_jax.data import latents
from vgpt_jax.data.buckets import config_buckets
from vgpt_jax.data.pipeline import make_source, to_float
from vgpt_jax.data.sources import SKIP_REASONS, BadVideo, VideoSource
from vgpt_jax.model import tokenizer as tokenizer_lib
from vgpt_jax.model.tokenizer import Tokenizer


@functools.partial(jax.jit, static_argnames="dtype")
def _encode_frames(tokenizer: Tokenizer, frames: jax.Array, dtype: Any) -> jax.Array:
  """frames [n, H, W, 3] in [-1, 1] -> latents [n, h, w, C] in `dtype`; the tokenizer is an argument, not a constant."""
  return tokenizer.encode(frames).astype(dtype)


class FrameEncoder:
  """Encodes videos of any length in fixed batches of `batch_frames` frames, so the encoder compiles once."""

  def __init__(self, tokenizer: Tokenizer, batch_frames: int, dtype: Any):
    if batch_frames < 1:
      raise ValueError(f"batch_frames={batch_frames} must be >= 1")
    self.tokenizer, self.batch_frames, self.dtype = tokenizer, batch_frames, dtype

  def __call__(self, frames: np.ndarray) -> np.ndarray:
    """uint8 [T, H, W, 3] -> latents [T, h, w, C] in the stored dtype."""
    n, b = len(frames), self.batch_frames
    padded = np.zeros((-(-n // b) * b, *frames.shape[1:]), np.float32)
    padded[:n] = to_float(frames)  # the training pipeline's conversion, bit for bit
    chunks = [_encode_frames(self.tokenizer, padded[i : i + b], self.dtype) for i in range(0, len(padded), b)]
    return np.concatenate([np.asarray(c) for c in chunks])[:n]


def settings_of(
  config: ml_collections.ConfigDict, tokenizer: Tokenizer, *, max_frames: int, dtype: str, shard_size: int
) -> dict[str, Any]:
  """Everything that determines the shards' content; a resumed run must match it."""
  d = config.data
  return {
    "format": latents.FORMAT_VERSION,
    "tokenizer": tokenizer_lib.describe(tokenizer, d.height, d.width),
    "vae_path": str(config.tokenizer.vae_path),
    "data_source": str(d.source),
    "height": int(d.height),
    "width": int(d.width),
    "stride": int(d.frame_stride),
    "min_frames": int(d.num_frames),
    "max_frames": int(max_frames),
    "dtype": dtype,
    "shard_size": int(shard_size),
    **_bucket_settings(config, tokenizer),
  }


def _bucket_settings(config: ml_collections.ConfigDict, tokenizer: Tokenizer) -> dict[str, Any]:
  """With data.buckets: the buckets ([height, width, frames]) and each one's latent shape; else nothing (so an
  encoding made before buckets existed still resumes)."""
  buckets = config_buckets(config.data)
  if not buckets:
    return {}
  return {
    "buckets": [[b.height, b.width, b.frames] for b in buckets],
    "latent_shapes": [list(tokenizer.latent_shape(b.height, b.width)) for b in buckets],
  }


def _check_settings(directory: Path, settings: dict[str, Any]) -> dict[str, Any]:
  """Returns DIR/encoding.json (created from `settings` if new); refuses a directory encoded otherwise."""
  path = directory / latents.SETTINGS_FILE
  if not path.exists():
    stored = {"settings": settings, "splits": {}}
    latents.write_json_atomic(path, stored)
    return stored
  stored = latents.read_json(path)
  differs = {k: (stored["settings"].get(k), v) for k, v in settings.items() if stored["settings"].get(k) != v}
  if differs:
    listing = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in differs.items())
    raise ValueError(
      f"{directory} holds latents encoded with other settings ({listing}); resume with the same settings "
      "or write to a new --output"
    )
  return stored


def encode_shard(
  source: VideoSource,
  encoder: Callable[[np.ndarray], np.ndarray],
  indices: Sequence[int],
  stem: Path,
  *,
  stride: int,
  max_frames: int,
  progress: tqdm | None = None,
) -> dict[str, Any]:
  """Write the latents of videos `indices` to stem.array_record, then stem.json (the shard is then complete)."""
  skipped = dict.fromkeys(SKIP_REASONS, 0)
  kept, buckets, frames = [], [], 0
  tmp = stem.with_name(stem.name + ".array_record.tmp")
  writer = ArrayRecordWriter(str(tmp), latents.WRITER_OPTIONS)
  try:
    for index in indices:
      try:
        video = source.leading_frames(index, stride, max_frames)
      except BadVideo as e:
        skipped[e.reason] += 1
        logging.info("skipped video %d (%s)", index, e)
      else:
        writer.write(latents.pack_record(encoder(video), index, source.name(index)))
        kept.append(int(index))
        buckets.append(source.bucket(index))
        frames += len(video)
      if progress is not None:
        progress.update(1)
        progress.set_postfix(skipped=sum(skipped.values()), refresh=False)
  finally:
    writer.close()
  os.replace(tmp, stem.with_name(stem.name + ".array_record"))
  summary = {"videos": len(kept), "frames": frames, "indices": kept, "skipped": skipped}
  if source.bucket_of is not None:
    summary["buckets"] = buckets  # each kept video's bucket, in record order
  latents.write_json_atomic(stem.with_name(stem.name + ".json"), summary)
  return summary


def _finished_splits(directory: Path, stored: dict[str, Any]) -> dict[str, Any] | None:
  """The index's per-split entries if every shard of every started split is complete, else None."""
  out = {}
  for split, info in stored["splits"].items():
    names = [latents.shard_name(split, j, info["num_shards"]) for j in range(info["num_shards"])]
    if not all((directory / f"{name}.json").exists() for name in names):
      return None
    shards = [latents.read_json(directory / f"{name}.json") for name in names]
    out[split] = {
      "source": info["source"],
      "shards": names,
      "videos": sum(s["videos"] for s in shards),
      "frames": sum(s["frames"] for s in shards),
      "skipped": {r: info.get("excluded", {}).get(r, 0) + sum(s["skipped"][r] for s in shards) for r in SKIP_REASONS},
    }
    if all("buckets" in s for s in shards):
      out[split]["bucket_of"] = [b for s in shards for b in s["buckets"]]
  return out


def encode(
  config: ml_collections.ConfigDict,
  output: str | Path,
  *,
  splits: Sequence[str] = latents.SPLITS,
  shard_size: int = 256,
  max_frames: int = 0,
  dtype: str = "float16",
  batch_frames: int = 16,
  worker_index: int = 0,
  num_workers: int = 1,
  stop_after_shards: int = -1,
) -> dict[str, Any] | None:
  """Encode `splits` of config.data into DIR; returns the finished index (latents.json), or None while
  other workers' shards are still missing. `stop_after_shards` >= 0 stops after that many shards (for tests
  of resuming)."""
  if config.data.source == "latents":
    raise ValueError("config.data.source='latents': point the config at the videos to encode, not at latents")
  if dtype not in latents.DTYPES:
    raise ValueError(f"dtype={dtype!r}; choose one of {sorted(latents.DTYPES)}")
  if shard_size < 1 or max_frames < 0 or not 0 <= worker_index < num_workers:
    raise ValueError(
      f"need shard_size >= 1, max_frames >= 0 and 0 <= worker_index < num_workers, got {shard_size}, "
      f"{max_frames}, {worker_index}, {num_workers}"
    )
  unknown = set(splits) - set(latents.SPLITS)
  if unknown:
    raise ValueError(f"unknown splits {sorted(unknown)}; valid splits are {list(latents.SPLITS)}")
  if 0 < max_frames < config.data.num_frames:
    raise ValueError(f"max_frames={max_frames} < data.num_frames={config.data.num_frames}: no clip would fit")
  tokenizer = tokenizer_lib.make_tokenizer(config.tokenizer)
  directory = Path(output)
  directory.mkdir(parents=True, exist_ok=True)
  settings = settings_of(config, tokenizer, max_frames=max_frames, dtype=dtype, shard_size=shard_size)
  stored = _check_settings(directory, settings)
  encoder = FrameEncoder(tokenizer, batch_frames, latents.DTYPES[dtype])
  stride, done = settings["stride"], 0
  for split in splits:
    source = make_source(config.data, split)
    num_shards = -(-len(source) // shard_size)
    info = {"num_shards": num_shards, "videos_in_source": len(source), "source": source.describe()}
    info["excluded"] = dict(source.excluded)  # bad files the source left out before numbering
    known = stored["splits"].get(split)
    if known is not None and known["num_shards"] != num_shards:
      raise ValueError(
        f"{directory} has {known['num_shards']} {split} shards of {known['source']}; the source now gives "
        f"{num_shards} ({len(source)} videos): it changed, so encode it into a new --output"
      )
    stored["splits"][split] = info
    latents.write_json_atomic(directory / latents.SETTINGS_FILE, stored)
    mine = [j for j in range(num_shards) if j % num_workers == worker_index]
    todo = [j for j in mine if not (directory / f"{latents.shard_name(split, j, num_shards)}.json").exists()]
    logging.info("%s: %d of this worker's %d shards to encode (%s)", split, len(todo), len(mine), source.describe())
    count = sum(min(shard_size, len(source) - j * shard_size) for j in todo)
    with tqdm(total=count, desc=f"encode {split}", unit="video", dynamic_ncols=True) as progress:
      for j in todo:
        if done == stop_after_shards:
          return None
        indices = range(j * shard_size, min((j + 1) * shard_size, len(source)))
        stem = directory / latents.shard_name(split, j, num_shards)
        encode_shard(source, encoder, indices, stem, stride=stride, max_frames=max_frames, progress=progress)
        done += 1
  finished = _finished_splits(directory, latents.read_json(directory / latents.SETTINGS_FILE))
  if finished is None:
    logging.info("this worker is done; latents.json is written by the worker that finishes last")
    return None
  index = {"format": latents.FORMAT_VERSION, "settings": settings, "splits": finished}
  latents.write_json_atomic(directory / latents.INDEX_FILE, index)
  for split, info in finished.items():
    skips = ", ".join(f"{r}={n}" for r, n in info["skipped"].items() if n) or "none"
    logging.info("%s: %d videos, %d frames encoded; skipped: %s", split, info["videos"], info["frames"], skips)
  return index


def _define_flags() -> None:
  config_flags.DEFINE_config_file("config", None, "Config naming the videos (data) and the tokenizer.")
  flags.DEFINE_string("output", None, "Directory for the latent shards (data.latents_path when training).")
  flags.DEFINE_list("splits", list(latents.SPLITS), "Splits to encode.")
  flags.DEFINE_integer("shard_size", 256, "Videos per ArrayRecord shard (the unit of resuming).")
  flags.DEFINE_integer("max_frames", 0, "Frames kept per video (at stride data.frame_stride); 0 = all.")
  flags.DEFINE_enum("dtype", "float16", sorted(latents.DTYPES), "Stored latent dtype.")
  flags.DEFINE_integer("batch_frames", 16, "Frames per encoder call.")
  flags.DEFINE_integer("worker_index", 0, "This worker's number, for parallel encoding.")
  flags.DEFINE_integer("num_workers", 1, "Number of parallel workers.")
  flags.mark_flags_as_required(["config", "output"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  try:
    options = ("splits", "shard_size", "max_frames", "dtype", "batch_frames", "worker_index", "num_workers")
    index = encode(f.config, f.output, **{name: f[name].value for name in options})  # each has a flag of its name
  except (ValueError, FileNotFoundError) as e:
    raise SystemExit(f"encode: {e}") from None
  if index is not None:
    videos = ", ".join(f"{s}: {i['videos']} videos" for s, i in index["splits"].items())
    print(
      f"wrote {f.output}/{latents.INDEX_FILE} ({videos}); train with --config.data.source=latents "
      f"--config.data.latents_path={f.output}"
    )


if __name__ == "__main__":
  _define_flags()
  app.run(main)
