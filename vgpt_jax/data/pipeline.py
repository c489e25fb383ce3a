"""Grain input pipeline over the synthetic physics world.

Videos are rendered on the fly from a per-(split, index) seed, so the "dataset"
costs no disk and any index is reproducible on any host.

Train pipeline (per host):
  range(num_train_videos).seed(seed).shuffle().repeat()  one global stream, new order per epoch
  -> this host's slice of every global batch            (global position, video index)
  -> map(_RandomClip)                                  random window from (seed, position), [-1, 1]
  -> batch(batch_size, drop_remainder=True)
  -> to_iter_dataset(ReadOptions)                      thread prefetch
  -> mp_prefetch (only if worker_count > 0)            process prefetch

Each element is {"video": float32 [batch_size, num_frames, H, W, 3]}.
"""

from __future__ import annotations

from typing import Any

import grain
import ml_collections
import numpy as np
from absl import flags

from vgpt_jax.data.physics import SPLITS, PhysicsWorld, render_video, video_seed

VALID_SOURCES: tuple[str, ...] = ("physics",)


def default_data_config() -> ml_collections.ConfigDict:
  """Defaults for the data config (`config.data`); physics knobs mirror PhysicsWorld."""
  cfg = ml_collections.ConfigDict()
  cfg.source = "physics"
  cfg.height = 32
  cfg.width = 32
  cfg.num_frames = 8  # frames per training sample
  cfg.frame_stride = 1  # take every k-th frame of the rendered video
  cfg.frame_stride_max = 0  # > frame_stride: stride drawn per sample from [frame_stride, max]
  cfg.video_frames = 32  # frames per rendered video
  cfg.num_train_videos = 100_000
  cfg.num_eval_videos = 256
  cfg.min_balls = 1
  cfg.max_balls = 3
  cfg.seed = 0  # base seed of the world (which videos exist), not the shuffle seed
  cfg.worker_count = 0  # grain worker processes; 0 = render in the training process
  cfg.read_threads = 2  # grain prefetch threads per process (0 = no prefetch)
  cfg.prefetch_batches = 4  # grain prefetch buffer, in batches
  world = PhysicsWorld()
  for name in PhysicsWorld.CONFIG_KNOBS:
    cfg[name] = getattr(world, name)
  return cfg


def _get(data_cfg: Any, name: str, default: Any) -> Any:
  """Optional config field with a default (ConfigDict, dict or plain object)."""
  if hasattr(data_cfg, "get"):
    return data_cfg.get(name, default)
  return getattr(data_cfg, name, default)


def validate_data_config(data_cfg: Any) -> None:
  """Raises ValueError with an actionable message if the data config is unusable."""
  source = _get(data_cfg, "source", "physics")
  if source not in VALID_SOURCES:
    raise ValueError(f"Unknown data.source {source!r}; valid sources are {list(VALID_SOURCES)}.")
  num_frames, stride = int(data_cfg.num_frames), _stride_range(data_cfg)[1]
  video_frames = int(data_cfg.video_frames)
  if num_frames < 1 or stride < 1:
    raise ValueError(f"data.num_frames ({num_frames}) and data.frame_stride ({stride}) must be >= 1.")
  if num_frames * stride > video_frames:
    raise ValueError(
      f"data.num_frames * largest data.frame_stride = {num_frames} * {stride} = "
      f"{num_frames * stride} exceeds data.video_frames = {video_frames}; "
      f"raise data.video_frames to at least {num_frames * stride} or lower "
      "data.num_frames / data.frame_stride."
    )
  for name in ("num_train_videos", "num_eval_videos"):
    if int(getattr(data_cfg, name)) < 1:
      raise ValueError(f"data.{name} must be >= 1.")
  PhysicsWorld.from_config(data_cfg)  # validates the physics knobs


def _stride_range(data_cfg: Any) -> tuple[int, int]:
  """(min, max) frame stride; max = min unless data.frame_stride_max is larger."""
  low = int(_get(data_cfg, "frame_stride", 1))
  return low, max(low, int(_get(data_cfg, "frame_stride_max", 0)))


def to_float(video: np.ndarray) -> np.ndarray:
  """uint8 video -> float32 in [-1, 1] (same shape)."""
  return np.asarray(video, dtype=np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0)


def to_uint8(video: Any) -> np.ndarray:
  """float video in [-1, 1] (numpy or jax, any shape) -> uint8, clipped; inverse of to_float."""
  scaled = (np.asarray(video, dtype=np.float32) + 1.0) * 127.5
  return np.clip(np.round(scaled), 0, 255).astype(np.uint8)


def _own_memory(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Copies a batch out of grain's shared-memory blocks so they are released at once."""
  return {key: np.array(value, copy=True) for key, value in batch.items()}


def _ensure_absl_flags_parsed() -> None:
  """Grain's worker processes read absl flags; outside absl.app.run they are unparsed."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


class PhysicsVideoSource:
  """Grain RandomAccessDataSource: index i -> uint8 video [T, H, W, 3], rendered on demand.

  Holds only the (picklable) world description, so it can be shipped to
  grain worker processes.
  """

  def __init__(self, data_cfg: Any, split: str):
    if split not in SPLITS:
      raise ValueError(f"Unknown split {split!r}; valid splits are {list(SPLITS)}.")
    self.world = PhysicsWorld.from_config(data_cfg)
    self.split = split
    self.base_seed = int(_get(data_cfg, "seed", 0))
    self.num_videos = int(data_cfg.num_train_videos if split == "train" else data_cfg.num_eval_videos)

  def __len__(self) -> int:
    return self.num_videos

  def _seed(self, index: int) -> int:
    index = int(index)
    if not -self.num_videos <= index < self.num_videos:
      raise IndexError(f"Video index {index} out of range [0, {self.num_videos}).")
    return video_seed(self.split, index % self.num_videos, self.base_seed)

  def __getitem__(self, index: int) -> np.ndarray:
    return render_video(self._seed(index), self.world)

  def clip(self, index: int, start: int, length: int, stride: int = 1) -> np.ndarray:
    """uint8 [length, H, W, 3]: frames start, start+stride, ... of video `index`.

    Equals `self[index][start : start + length * stride : stride]` but only
    simulates/draws what is needed.
    """
    frames = start + stride * np.arange(length)
    return render_video(self._seed(index), self.world, frames=frames)

  def __repr__(self) -> str:
    return (
      f"PhysicsVideoSource(split={self.split!r}, num_videos={self.num_videos}, "
      f"base_seed={self.base_seed}, world={self.world})"
    )


def make_source(data_cfg: Any, split: str) -> PhysicsVideoSource:
  """The data source named by data_cfg.source for `split` ("train" or "eval")."""
  validate_data_config(data_cfg)
  return PhysicsVideoSource(data_cfg, split)


class _RandomClip:
  """(global position, video index) -> {"video": float32 [num_frames, H, W, 3]}: random stride, then start.

  The randomness comes from (seed, global position), not from the element's
  place in this host's stream, so the same global batch is produced whatever the
  number of hosts.
  """

  def __init__(self, source: PhysicsVideoSource, num_frames: int, strides: tuple[int, int], seed: int):
    self.source = source
    self.num_frames = num_frames
    self.strides = strides
    self.seed = seed

  def __call__(self, element: tuple[int, int]) -> dict[str, np.ndarray]:
    position, index = element
    rng = np.random.default_rng([self.seed, position])
    stride = int(rng.integers(self.strides[0], self.strides[1] + 1))
    start = int(rng.integers(0, self.source.world.num_frames - self.num_frames * stride + 1))
    return {"video": to_float(self.source.clip(index, start, self.num_frames, stride))}


def train_index_dataset(
  data_cfg: Any, *, seed: int, batch_size: int, shard_index: int = 0, shard_count: int = 1
) -> grain.MapDataset:
  """This host's infinite stream of (global position, video index), reshuffled every epoch.

  All hosts share one global stream (the train videos shuffled with `seed`,
  epoch after epoch). Global batch g is positions [g*B, (g+1)*B), B =
  batch_size * shard_count, and host k takes the k-th slice of batch_size of
  each. So hosts never overlap, together they cover every video once per epoch,
  and the global batches do not depend on the number of hosts.
  """
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"Need 0 <= shard_index < shard_count, got {shard_index}, {shard_count}.")
  num_videos = int(data_cfg.num_train_videos)
  if num_videos < shard_count:
    raise ValueError(
      f"data.num_train_videos ({num_videos}) < shard_count ({shard_count}): some hosts would get no videos."
    )
  videos = grain.MapDataset.range(num_videos).seed(seed).shuffle().repeat()
  global_batch = batch_size * shard_count

  def locate(i: int) -> tuple[int, int]:
    position = (i // batch_size) * global_batch + shard_index * batch_size + i % batch_size
    return position, videos[position]

  return grain.MapDataset.range(len(videos) // shard_count).map(locate)


def train_dataset(
  data_cfg: Any,
  *,
  batch_size: int,
  seed: int,
  shard_index: int = 0,
  shard_count: int = 1,
) -> grain.IterDataset:
  """This host's infinite, shuffled train stream of {"video": float32 [B, F, H, W, 3]}.

  B = batch_size is this host's part of the global batch (see
  `train_index_dataset`). F = data_cfg.num_frames frames taken every k frames
  from a random start, k drawn from [frame_stride, frame_stride_max] (stages
  3-4). Deterministic given `seed`; the iterator's get_state()/set_state()
  resume exactly.
  """
  validate_data_config(data_cfg)
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
  source = PhysicsVideoSource(data_cfg, "train")
  clip = _RandomClip(source, int(data_cfg.num_frames), _stride_range(data_cfg), seed)
  ds = train_index_dataset(data_cfg, seed=seed, batch_size=batch_size, shard_index=shard_index, shard_count=shard_count)
  ds = ds.map(clip).batch(batch_size, drop_remainder=True)
  read_options = grain.ReadOptions(
    num_threads=int(_get(data_cfg, "read_threads", 2)),
    prefetch_buffer_size=int(_get(data_cfg, "prefetch_batches", 4)),
  )
  it_ds = ds.to_iter_dataset(read_options)
  worker_count = int(_get(data_cfg, "worker_count", 0))
  if worker_count > 0:
    _ensure_absl_flags_parsed()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    it_ds = it_ds.map(_own_memory)
  return it_ds


def eval_videos(data_cfg: Any, count: int) -> np.ndarray:
  """float32 [count, num_frames, H, W, 3] in [-1, 1]: the first `count` held-out videos.

  Frames 0, stride, 2*stride, ... so evaluation always sees the same clips.
  """
  validate_data_config(data_cfg)
  source = PhysicsVideoSource(data_cfg, "eval")
  if not 0 <= count <= len(source):
    raise ValueError(f"count must lie in [0, data.num_eval_videos={len(source)}], got {count}.")
  num_frames, stride = int(data_cfg.num_frames), int(_get(data_cfg, "frame_stride", 1))
  world = source.world
  out = np.empty((count, num_frames, world.height, world.width, 3), dtype=np.float32)
  for i in range(count):
    out[i] = to_float(source.clip(i, 0, num_frames, stride))
  return out
