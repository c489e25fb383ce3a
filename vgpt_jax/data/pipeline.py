"""Grain input pipeline over any video source: the synthetic physics world or the user's video files.

Sources (data.source), each a `VideoSource` (sources.py):
  physics      synthetic physics world rendered on the fly from a per-(split, index)
               seed: costs no disk, any index is reproducible on any host
  video_files  the user's videos, a directory tree or a manifest, decoded with PyAV
               (video_files.py)
  tfds         any prepared TFDS video dataset, read without TensorFlow (tfds_source.py)
  latents      videos pre-encoded by `python -m vgpt_jax.encode` (latents.py)

Train pipeline (per host):
  per bucket: its videos .seed(seed).shuffle().repeat()  one stream per bucket, new order per epoch
  -> this host's slice of every global batch           (global position, video index, bucket): each global
                                                        batch's bucket drawn from (seed, batch number)
  -> map(_ClipOrSkip)                                   clip drawn from (seed, position), [-1, 1]
  -> batch(batch_size, drop_remainder=True)             skip counts stacked per sample
  -> to_iter_dataset(ReadOptions)                       thread prefetch
  -> mp_prefetch (only if worker_count > 0)             process prefetch
Without data.buckets there is one bucket: one shuffled stream of all the videos.

Each element is {"video": float32 [B, F, H, W, 3], "skipped": int32 [B, len(SKIP_REASONS)], "bucket": int32 [B]},
or {"latents": float32 [B, F, h, w, C], ...} for data.source="latents"; with data.buckets, F, H and W are
those of the batch's bucket. The iterator's state is its position alone: the buckets follow from it.

Bad videos: a source may exclude files it knows to be bad before numbering its
videos (video_files probes every file once), so those are never drawn. When the
video at global position p still raises BadVideo, attempt a =
1, 2, ... takes video rng_a.integers(n) of its bucket's n videos with rng_a =
default_rng([seed, p, a]) and cuts its clip with rng_a, up to
data.max_skip_tries attempts in all. Every candidate depends only on (seed,
p), so all hosts and any worker count agree, and the batches stay the same
for any number of hosts. "skipped" counts the rejected candidates by reason.
If every attempt fails the pipeline raises NoUsableVideo naming the source.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import grain
import ml_collections
import numpy as np
from absl import flags

from vgpt_jax.data import latents, tfds_source, video_files
from vgpt_jax.data.buckets import BucketSchedule, base_bucket, probabilities
from vgpt_jax.data.physics import SPLITS, PhysicsWorld, render_video, video_seed
from vgpt_jax.data.sources import SKIP_REASONS, BadVideo, NoUsableVideo, VideoSource, Window, stride_range

_REASON_INDEX = {reason: i for i, reason in enumerate(SKIP_REASONS)}


def default_data_config() -> ml_collections.ConfigDict:
  """Defaults for the data config (`config.data`); physics knobs mirror PhysicsWorld."""
  cfg = ml_collections.ConfigDict()
  cfg.source = "physics"  # physics | video_files | tfds | latents
  cfg.height = 32
  cfg.width = 32
  cfg.num_frames = 8  # frames per training sample
  cfg.frame_stride = 1  # take every k-th frame of the video
  cfg.frame_stride_max = 0  # > frame_stride: stride drawn per sample from [frame_stride, max]
  cfg.max_skip_tries = 16  # videos tried per sample (the first + replacements of bad ones) before giving up
  cfg.num_eval_videos = 256  # held-out videos (video_files without eval_path/eval_manifest: the last ones)
  cfg.worker_count = 0  # grain worker processes; 0 = decode/render in the training process
  cfg.read_threads = 2  # grain prefetch threads per process (0 = no prefetch)
  cfg.prefetch_batches = 4  # grain prefetch buffer, in batches
  # source="tfds": any prepared TFDS video dataset, read with tfds.data_source (ArrayRecord, no TensorFlow).
  cfg.tfds_name = ""  # e.g. "vgpt_physics" (python -m vgpt_jax.data.tfds_physics), "ucf101", "moving_mnist"
  cfg.tfds_data_dir = ""  # "" = TFDS's default data dir
  cfg.tfds_video_key = "video"  # the feature holding the frames (nested keys as "a/b")
  cfg.tfds_train_split = "train"
  cfg.tfds_eval_split = "test"
  # source="physics": the synthetic world.
  cfg.video_frames = 32  # frames per rendered video
  cfg.num_train_videos = 100_000
  cfg.min_balls = 1
  cfg.max_balls = 3
  cfg.seed = 0  # base seed of the world (which videos exist), not the shuffle seed
  world = PhysicsWorld()
  for name in PhysicsWorld.CONFIG_KNOBS:
    cfg[name] = getattr(world, name)
  # source="video_files": the user's videos (vgpt_jax/data/video_files.py).
  cfg.path = ""  # a directory, searched recursively for `extensions`
  cfg.manifest = ""  # or a text file: one path per line, optionally path<TAB>frame_count
  cfg.eval_path = ""  # held-out videos (a directory) ...
  cfg.eval_manifest = ""  # ... or manifest; neither: the last num_eval_videos files of path/manifest
  cfg.extensions = video_files.VIDEO_EXTENSIONS  # case-insensitive
  cfg.min_size = 128  # skip videos whose shorter side has fewer pixels (reference: 128)
  cfg.max_aspect = 4.0  # skip videos whose long side / short side is larger (reference: 4)
  # Aspect buckets (data/buckets.py; README "Videos of any shape"): ((height, width[, frames]), ...); each video
  # goes to the one nearest its aspect, each batch holds one. Empty: every video fills data.height x data.width.
  cfg.buckets = ()
  cfg.bucket_weights = ()  # how often each bucket's batches come; empty: in proportion to its videos
  # source="latents": shards written by python -m vgpt_jax.encode (vgpt_jax/data/latents.py); no VAE in the step.
  cfg.latents_path = ""
  cfg.decode_threads = 1  # FFmpeg threads per decoded video; 0: FFmpeg decides (see BENCHMARKS.md)
  return cfg


def _physics_problems(data_cfg: Any) -> list[str]:
  """What is wrong with a physics-world data config (empty when sound)."""
  num_frames, stride = int(data_cfg.num_frames), stride_range(data_cfg)[1]
  video_frames = int(data_cfg.video_frames)
  if num_frames * stride > video_frames:
    return [
      f"data.num_frames * largest data.frame_stride = {num_frames} * {stride} = "
      f"{num_frames * stride} exceeds data.video_frames = {video_frames}; "
      f"raise data.video_frames to at least {num_frames * stride} or lower "
      "data.num_frames / data.frame_stride."
    ]
  counts = ("num_train_videos", "num_eval_videos")
  problems = [f"data.{name} must be >= 1." for name in counts if int(data_cfg[name]) < 1]
  if not problems:
    try:
      PhysicsWorld.from_config(data_cfg)  # validates the physics knobs
    except ValueError as e:
      problems.append(str(e))
  return problems


# data.source -> (make the source of a split, list the config's problems).
SOURCES: dict[str, tuple[Callable[[Any, str], VideoSource], Callable[[Any], list[str]]]] = {}
VALID_SOURCES: tuple[str, ...] = ()


def register_source(
  name: str, make: Callable[[Any, str], VideoSource], problems: Callable[[Any], list[str]] = lambda cfg: []
) -> None:
  """Makes `data.source=name` available: `make(data_cfg, split)` builds it, `problems(data_cfg)` vets its fields."""
  global VALID_SOURCES
  SOURCES[name] = (make, problems)
  VALID_SOURCES = tuple(SOURCES)


def validate_data_config(data_cfg: Any) -> None:
  """Raises ValueError with an actionable message (every problem found) if the data config is unusable."""
  source = data_cfg.source
  if source not in SOURCES:
    raise ValueError(f"Unknown data.source {source!r}; valid sources are {list(VALID_SOURCES)}.")
  num_frames, low = int(data_cfg.num_frames), stride_range(data_cfg)[0]
  if num_frames < 1 or low < 1:
    raise ValueError(f"data.num_frames ({num_frames}) and data.frame_stride ({low}) must be >= 1.")
  problems = SOURCES[source][1](data_cfg)
  tries = int(data_cfg.max_skip_tries)
  if tries < 1:
    problems.append(f"data.max_skip_tries={tries} must be >= 1 (videos tried per sample)")
  if int(data_cfg.worker_count) < 0:
    problems.append(f"data.worker_count={data_cfg.worker_count} must be >= 0")
  if problems:
    raise ValueError("; ".join(problems))


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


class PhysicsVideoSource(VideoSource):
  """`VideoSource` over the physics world: index i -> uint8 video [T, H, W, 3], rendered on demand.

  Holds only the (picklable) world description, so it can be shipped to
  grain worker processes.
  """

  def __init__(self, data_cfg: Any, split: str):
    if split not in SPLITS:
      raise ValueError(f"Unknown split {split!r}; valid splits are {list(SPLITS)}.")
    self.world = PhysicsWorld.from_config(data_cfg)
    self.split = split
    self.base_seed = int(data_cfg.seed)
    self.num_videos = int(data_cfg.num_train_videos if split == "train" else data_cfg.num_eval_videos)
    self.num_frames = int(data_cfg.num_frames)
    self.strides = stride_range(data_cfg)
    self.clip_shape = (self.num_frames, self.world.height, self.world.width, 3)

  def __len__(self) -> int:
    return self.num_videos

  def _seed(self, index: int) -> int:
    index = int(index)
    if not -self.num_videos <= index < self.num_videos:
      raise IndexError(f"Video index {index} out of range [0, {self.num_videos}).")
    return video_seed(self.split, index % self.num_videos, self.base_seed)

  def __getitem__(self, index: int) -> np.ndarray:
    return render_video(self._seed(index), self.world)

  def read(self, index: int, window: Window) -> np.ndarray:
    """uint8 [count, H, W, 3]: the window's frames, simulating and drawing only those."""
    start, stride, count = window(self.world.num_frames)
    return render_video(self._seed(index), self.world, frames=start + stride * np.arange(count))

  def describe(self) -> str:
    return f"the synthetic physics world ({self.split} split, {self.num_videos} videos, seed {self.base_seed})"

  def __repr__(self) -> str:
    return (
      f"PhysicsVideoSource(split={self.split!r}, num_videos={self.num_videos}, "
      f"base_seed={self.base_seed}, world={self.world})"
    )


register_source("physics", PhysicsVideoSource, _physics_problems)
register_source("video_files", video_files.VideoFileSource, video_files.validate_config)


def _tfds_problems(data_cfg: Any) -> list[str]:
  if data_cfg.tfds_name:
    return []
  return [
    "data.source='tfds' needs data.tfds_name: a prepared TFDS video dataset, e.g. vgpt_physics "
    "(python -m vgpt_jax.data.tfds_physics --data_dir=DIR, then --config.data.tfds_data_dir=DIR)"
  ]


register_source("tfds", tfds_source.TfdsVideoSource, _tfds_problems)


register_source("latents", latents.LatentSource, latents.validate_config)


def input_key(data_cfg: Any) -> str:
  """The batch key of the model's input: "latents" for pre-encoded latents, else "video" (frames)."""
  return "latents" if data_cfg.source == "latents" else "video"


def make_source(data_cfg: Any, split: str) -> VideoSource:
  """The data source named by data_cfg.source for `split` ("train" or "eval")."""
  validate_data_config(data_cfg)
  source = SOURCES[data_cfg.source][0](data_cfg, split)
  if len(source) < 1:
    raise ValueError(f"no videos in {source.describe()}")
  return source


class _ClipOrSkip:
  """(global position, video index, bucket) -> {key: float32 clip, "skipped": int32 [len(SKIP_REASONS)],
  "bucket": int32 []}.

  key is "video" (uint8 frames from the source, scaled to [-1, 1]) or, for a
  source whose `yields` is "latents", "latents" (float32 latents, as stored).
  The clip has its bucket's shape (source.shapes()).

  The randomness comes from (seed, global position), not from the element's
  place in this host's stream, so the same global batch is produced whatever
  the number of hosts. A bad video is replaced, as the module docstring says,
  by another of the same bucket.
  """

  def __init__(self, source: VideoSource, seed: int, max_tries: int, bucket_of: np.ndarray):
    self.source = source
    self.seed = seed
    self.max_tries = max_tries
    self.members = bucket_members(bucket_of, len(source.shapes()))
    self.key = source.yields
    self.dtype = np.float32 if self.key == "latents" else np.uint8

  def __call__(self, element: tuple[int, int, int]) -> dict[str, np.ndarray]:
    position, index, bucket = (int(x) for x in element)
    members, shape = self.members[bucket], self.source.shapes()[bucket]
    skipped = np.zeros(len(SKIP_REASONS), dtype=np.int32)
    for attempt in range(self.max_tries):
      if attempt == 0:
        rng = np.random.default_rng([self.seed, position])
      else:
        rng = np.random.default_rng([self.seed, position, attempt])
        index = int(members[rng.integers(len(members))])
      try:
        video = self.source.clip(index, rng)
      except BadVideo as e:
        skipped[_REASON_INDEX[e.reason]] += 1
        continue
      if video.shape != shape or video.dtype != self.dtype:
        raise ValueError(
          f"{self.source.describe()} gave a {video.dtype} clip {video.shape}; "
          f"expected {np.dtype(self.dtype).name} {shape}"
        )
      clip = video if self.key == "latents" else to_float(video)
      return {self.key: clip, "skipped": skipped, "bucket": np.int32(bucket)}
    counts = ", ".join(f"{r}={n}" for r, n in zip(SKIP_REASONS, skipped) if n)
    raise NoUsableVideo(
      f"all {self.max_tries} videos tried for sample {position} were bad ({counts}) in {self.source.describe()}; "
      "check the files (python -m vgpt_jax.benchmarks.video_pipeline --dir=... decodes a few), data.min_size, "
      "data.max_aspect and data.num_frames * data.frame_stride, or raise data.max_skip_tries"
    )


def _stack(elements: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """Batch: clips stacked [B, F, ...] (one bucket, one shape); skip counts [B, len(SKIP_REASONS)] (the step sums
  them globally); "bucket" int32 [B], the same in every row."""
  return {key: np.stack([e[key] for e in elements]) for key in elements[0]}


@dataclasses.dataclass(frozen=True)
class HostSlice:
  """This host's part of every global batch: `batch_size` samples, the `index`-th slice of `count` hosts."""

  batch_size: int
  index: int = 0
  count: int = 1

  def __post_init__(self):
    if self.batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {self.batch_size}.")
    if not 0 <= self.index < self.count:
      raise ValueError(f"Need 0 <= host index < host count, got {self.index}, {self.count}.")


def video_buckets(source: VideoSource) -> np.ndarray:
  """int64 [len(source)]: each video's bucket (all 0 without data.buckets)."""
  return np.zeros(len(source), np.int64) if source.bucket_of is None else np.asarray(source.bucket_of, np.int64)


def bucket_members(bucket_of: np.ndarray, count: int) -> list[np.ndarray]:
  """The indices of each of `count` buckets' videos, in order."""
  return [np.flatnonzero(bucket_of == b) for b in range(count)]


def bucket_probabilities(source: VideoSource, data_cfg: Any) -> np.ndarray:
  """float64 [buckets]: how often each bucket's batches come (data.bucket_weights, or its share of the videos)."""
  counts = np.bincount(video_buckets(source), minlength=len(source.shapes()))
  return probabilities(counts, tuple(data_cfg.bucket_weights))


def held_out_members(source: VideoSource, data_cfg: Any) -> np.ndarray:
  """Indices of the videos at data.height x data.width: all of them without buckets, else those of its bucket
  (the end-of-run sample stacks them)."""
  return np.flatnonzero(video_buckets(source) == base_bucket(data_cfg))


def train_index_dataset(
  bucket_of: int | np.ndarray, seed: int, host: HostSlice, p: Sequence[float] | None = None
) -> grain.MapDataset:
  """This host's infinite stream of (global position, video index, bucket), each bucket reshuffled every epoch.

  bucket_of: each video's bucket (int64 [num videos]), or the number of videos when there is one bucket;
  p: how often each bucket's batches come (default: in proportion to its videos).

  Global batch g is positions [g*B, (g+1)*B), B = host.batch_size * host.count;
  all its videos come from one bucket, `BucketSchedule(seed, p).bucket(g)`.
  Each bucket has its own stream (its videos shuffled with `seed`, epoch after
  epoch), and batch g takes the next B of it: from seen(g) * B on, seen(g) the
  bucket's batches before g. Host k takes the k-th slice of host.batch_size of
  each global batch. So hosts never overlap, together they cover each bucket's
  videos once per its epoch, and the global batches do not depend on the
  number of hosts. With one bucket this is the plain shuffled stream.
  """
  bucket_of = np.zeros(bucket_of, np.int64) if isinstance(bucket_of, int) else np.asarray(bucket_of, np.int64)
  counts = np.bincount(bucket_of, minlength=1 if p is None else len(p))
  if len(bucket_of) < host.count:
    raise ValueError(f"{len(bucket_of)} train videos < host count ({host.count}): some hosts would get no videos.")
  schedule = BucketSchedule(seed, probabilities(counts) if p is None else p)
  members = bucket_members(bucket_of, len(counts))
  streams = [grain.MapDataset.range(max(len(m), 1)).seed(seed).shuffle().repeat() for m in members]
  b, total = host.batch_size, host.batch_size * host.count

  def locate(i: int) -> tuple[int, int, int]:
    g, slot = divmod(i, b)
    slot += host.index * b
    bucket = schedule.bucket(g)
    return g * total + slot, int(members[bucket][streams[bucket][schedule.seen(g) * total + slot]]), bucket

  return grain.MapDataset.range(len(streams[0]) // host.count).map(locate)


def train_dataset(data_cfg: Any, seed: int, host: HostSlice, source: VideoSource | None = None) -> grain.IterDataset:
  """This host's infinite, shuffled train stream of {"video": float32 [B, F, H, W, 3], "skipped": int32 [B, R],
  "bucket": int32 [B]} ({"latents": float32 [B, F, h, w, C], ...} when data.source="latents").

  B = host.batch_size is this host's part of the global batch (see
  `train_index_dataset`). F = data_cfg.num_frames frames taken every k frames
  from a random start, k drawn from [frame_stride, frame_stride_max] (stages
  3-4). R = len(SKIP_REASONS): bad videos replaced for each sample, by reason.
  With data.buckets, each batch is one bucket's and has its shape (data.bucket_weights: how often each
  bucket comes; default in proportion to its videos). Deterministic given `seed`; the iterator's
  get_state()/set_state() resume exactly. `source`: the train source when the caller has built it already.
  """
  source = make_source(data_cfg, "train") if source is None else source
  bucket_of = video_buckets(source)
  clip = _ClipOrSkip(source, seed, int(data_cfg.max_skip_tries), bucket_of)
  ds = train_index_dataset(bucket_of, seed, host, bucket_probabilities(source, data_cfg))
  ds = ds.map(clip).batch(host.batch_size, drop_remainder=True, batch_fn=_stack)
  read_options = grain.ReadOptions(
    num_threads=int(data_cfg.read_threads),
    prefetch_buffer_size=int(data_cfg.prefetch_batches),
  )
  it_ds = ds.to_iter_dataset(read_options)
  worker_count = int(data_cfg.worker_count)
  if worker_count > 0:
    _ensure_absl_flags_parsed()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    it_ds = it_ds.map(_own_memory)
  return it_ds
