"""Pre-encoded latents: the shards `python -m vgpt_jax.encode` writes, and the source that trains on them.

Why: encoding every clip with the VAE at every step costs more than the
transformer step at small scale and ties the accelerator to the decoder;
production pipelines encode each video once and train on latents.

On disk (DIR = data.latents_path):
  DIR/encoding.json       the settings the shards were made with (checked when resuming)
  DIR/{split}-{j:05d}-of-{n:05d}.array_record
                          one record per usable video of the split, in source order
  DIR/{split}-{j:05d}-of-{n:05d}.json
                          that shard's videos and skip counts; written last, so a
                          shard whose .json exists is complete
  DIR/latents.json        written once every shard of every split exists: the
                          settings, and per split its shards, videos and skips

A record (msgpack, flax.serialization) holds `latents` [T, h, w, C] in the
stored dtype (the tokenizer's scaled latents of frames 0, s, 2s, ... of the
video, s = the encoding stride), `index` (the video's number in its source
split) and `name` (its path or id). With data.buckets, h and w are the
video's bucket's, and latents.json lists each video's bucket per split
(`bucket_of`).

Training clips (`LatentSource.clip`): the config's frame strides are in source
frames and must be multiples of s; a clip takes F = data.num_frames latent
frames at a latent stride drawn from [frame_stride / s, frame_stride_max / s],
from a uniform start: the same draw as the pixel sources make, so stages 3-4's
stride range works on latents too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import grain
import ml_dtypes
import numpy as np
from flax import serialization

from vgpt_jax.data.buckets import config_buckets
from vgpt_jax.data.sources import BadVideo, VideoSource, Window, stride_range

FORMAT_VERSION = 1
SPLITS = ("train", "eval")
DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
INDEX_FILE = "latents.json"
SETTINGS_FILE = "encoding.json"
# ArrayRecord groups of one record: random access reads one video, not a block of them.
WRITER_OPTIONS = "group_size:1"


def shard_name(split: str, shard: int, num_shards: int) -> str:
  return f"{split}-{shard:05d}-of-{num_shards:05d}"


def pack_record(latents: np.ndarray, index: int, name: str) -> bytes:
  """One video's latents [T, h, w, C] (already in the stored dtype) and where they came from -> bytes."""
  return serialization.msgpack_serialize({"latents": np.ascontiguousarray(latents), "index": int(index), "name": name})


def unpack_record(record: bytes) -> dict[str, Any]:
  """bytes -> {"latents": ndarray [T, h, w, C], "index": int, "name": str}."""
  return serialization.msgpack_restore(record)


def read_json(path: str | Path) -> Any:
  return json.loads(Path(path).read_text())


def write_json_atomic(path: str | Path, value: Any) -> None:
  """Write a JSON file so that readers see the old file or the whole new one, never half of it."""
  path = Path(path)
  tmp = path.with_name(path.name + f".tmp{os.getpid()}")
  tmp.write_text(json.dumps(value, indent=2, sort_keys=True))
  os.replace(tmp, path)


def _how_to_encode(directory: str) -> str:
  return (
    f"make it with python -m vgpt_jax.encode --config=CONFIG_OF_THE_VIDEOS --output={directory} "
    "(it resumes where an interrupted run stopped)"
  )


def load_index(directory: str) -> dict[str, Any]:
  """DIR/latents.json; a clear error when the directory was never encoded or its encoding is unfinished."""
  path = Path(directory) / INDEX_FILE
  if not path.exists():
    started = (Path(directory) / SETTINGS_FILE).exists()
    state = "an unfinished encoding (some shards are missing)" if started else "no encoded latents"
    raise FileNotFoundError(f"data.latents_path={directory} holds {state}: {_how_to_encode(directory)}")
  index = read_json(path)
  if index.get("format") != FORMAT_VERSION:
    raise ValueError(f"{path} has format {index.get('format')!r}; this code reads format {FORMAT_VERSION}")
  return index


def validate_config(data_cfg: Any) -> list[str]:
  """Problems of a data.source='latents' config (empty when sound); reads only DIR/latents.json."""
  directory = data_cfg.latents_path
  if not directory:
    return ["data.source='latents' needs data.latents_path: a directory written by python -m vgpt_jax.encode"]
  try:
    settings = load_index(directory)["settings"]
  except (OSError, ValueError) as e:
    return [str(e)]
  problems = []
  encoded = settings.get("buckets", [])
  wanted = [[b.height, b.width, b.frames] for b in config_buckets(data_cfg)]
  if encoded != wanted:
    problems.append(
      f"data.buckets={tuple(map(tuple, wanted))} but the latents in {directory} were encoded with buckets "
      f"{tuple(map(tuple, encoded))}; set data.buckets to those (each video is stored at its bucket's size)"
    )
  for name in ("height", "width"):
    if int(data_cfg[name]) != settings[name]:
      problems.append(
        f"data.{name}={data_cfg[name]} but the latents in {directory} were encoded at "
        f"{settings['height']}x{settings['width']} frames; set data.{name}={settings[name]}"
      )
  s = settings["stride"]
  low, high = stride_range(data_cfg)
  if low % s or high % s:
    problems.append(
      f"data.frame_stride={low} / data.frame_stride_max={high} must be multiples of the encoding stride {s} "
      f"of {directory} (the latents hold only every {s}-th frame)"
    )
  return problems


def tokenizer_problems(data_cfg: Any, tokenizer_cfg: Any) -> list[str]:
  """Problems of training with config.tokenizer on the latents of data.latents_path (they must be its latents)."""
  try:
    stored = load_index(data_cfg.latents_path)["settings"]["tokenizer"]
  except (OSError, ValueError):
    return []  # validate_config reports it
  problems = []
  for name in ("kind", "downsample"):
    if stored[name] != tokenizer_cfg[name]:
      problems.append(
        f"tokenizer.{name}={tokenizer_cfg[name]!r} but the latents in {data_cfg.latents_path} were made with "
        f"{stored[name]!r}; use the tokenizer that encoded them (it decodes the samples)"
      )
  return problems


def check_tokenizer(directory: str, description: dict[str, Any]) -> None:
  """Raise ValueError unless `description` (see encode.describe_tokenizer) equals the one that encoded DIR."""
  stored = load_index(directory)["settings"]["tokenizer"]
  differs = {k: (stored.get(k), v) for k, v in description.items() if k != "vae_path" and stored.get(k) != v}
  if differs:
    listing = ", ".join(f"{k}: encoded with {a!r}, configured {b!r}" for k, (a, b) in differs.items())
    raise ValueError(f"the tokenizer does not match the one that encoded {directory} ({listing})")


class LatentSource(VideoSource):
  """`VideoSource`-like random access over encoded latents: index -> float32 latent clip [F, h, w, C].

  `yields = "latents"` tells the pipeline its clips are latents, not uint8
  frames. Picklable (the ArrayRecord reader is reopened per process).
  """

  yields = "latents"

  def __init__(self, data_cfg: Any, split: str):
    if split not in SPLITS:
      raise ValueError(f"Unknown split {split!r}; valid splits are {list(SPLITS)}.")
    self.directory = str(data_cfg.latents_path)
    index = load_index(self.directory)
    settings = index["settings"]
    if split not in index["splits"]:
      raise ValueError(
        f"{self.directory} has no {split} split (encoded: {sorted(index['splits'])}); encode it with "
        f"python -m vgpt_jax.encode --splits={split} --output={self.directory}"
      )
    self.split = split
    self.shards = [str(Path(self.directory) / f"{name}.array_record") for name in index["splits"][split]["shards"]]
    self.num_videos = int(index["splits"][split]["videos"])
    self.encoded_stride = int(settings["stride"])
    self.num_frames = int(data_cfg.num_frames)
    self.latent_shape = tuple(settings["tokenizer"]["latent_shape"])
    self.clip_shape = (self.num_frames, *self.latent_shape)
    if settings.get("buckets"):  # each video stored at its bucket's size (encode.py)
      frames = [b[2] or self.num_frames for b in settings["buckets"]]
      self.bucket_shapes = tuple((n, *shape) for n, shape in zip(frames, map(tuple, settings["latent_shapes"])))
      self.bucket_of = np.asarray(index["splits"][split]["bucket_of"], np.int64)
    low, high = (stride // self.encoded_stride for stride in stride_range(data_cfg))
    self.strides = (max(low, 1), max(high, 1))
    self._reader: Any = None

  def __len__(self) -> int:
    return self.num_videos

  def __getstate__(self) -> dict:
    return {**self.__dict__, "_reader": None}

  def describe(self) -> str:
    return f"latents {self.directory} ({self.split} split, {self.num_videos} videos)"

  def record(self, index: int) -> dict[str, Any]:
    """The stored record of video `index` (see the module docstring); BadVideo("unreadable") if it is damaged."""
    index = int(index)
    if not 0 <= index < self.num_videos:
      raise IndexError(f"Video index {index} out of range [0, {self.num_videos}) in {self.describe()}.")
    if self._reader is None:
      self._reader = grain.sources.ArrayRecordDataSource(self.shards)
    try:
      record = unpack_record(self._reader[index])
      latents = record["latents"]
    except Exception as e:  # a damaged record: skip it like a broken video
      raise BadVideo("unreadable", f"record {index} of {self.describe()}: {type(e).__name__}: {e}") from e
    shape = self.shapes()[self.bucket(index)][1:]
    if not isinstance(latents, np.ndarray) or latents.ndim != 4 or latents.shape[1:] != shape:
      raise BadVideo("unreadable", f"record {index} of {self.describe()}: latents {getattr(latents, 'shape', None)}")
    return record

  def read(self, index: int, window: Window) -> np.ndarray:
    """float32 [count, h, w, C]: the window's latent frames of video `index`."""
    latents = self.record(index)["latents"]
    start, stride, count = window(len(latents))
    return np.asarray(latents[start : start + stride * count : stride], dtype=np.float32)

  def __repr__(self) -> str:
    return f"LatentSource({self.describe()})"
