"""Tests for the synthetic physics world and its Grain pipeline (fast, CPU only)."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest

from tests.conftest import data_config
from vgpt_jax.data import physics
from vgpt_jax.data.held_out import held_out_clips
from vgpt_jax.data.physics import PhysicsWorld, Scene, render_video, sample_scene, simulate, video_seed
from vgpt_jax.data.pipeline import (
  VALID_SOURCES,
  HostSlice,
  PhysicsVideoSource,
  _ClipOrSkip,
  default_data_config,
  make_source,
  to_float,
  to_uint8,
  train_dataset,
  train_index_dataset,
  video_buckets,
)
from vgpt_jax.data.sources import SKIP_REASONS

ONE_BALL = PhysicsWorld(min_balls=1, max_balls=1, occluder_prob=0.0)


def small_config(**overrides):
  """A tiny data config: 8 train videos of 12 frames, 4-frame clips with stride 2."""
  fields = dict(num_train_videos=8, num_eval_videos=6, video_frames=12, num_frames=4, frame_stride=2)
  return data_config(**{**fields, **overrides})


def take(iterator, n):
  return [next(iterator)["video"] for _ in range(n)]


def pixel_centroids(video: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(x, y) [T] centroids of non-background pixels and their total weight [T]."""
  v = video.astype(np.float64)
  background = np.median(v.reshape(-1, 3), axis=0)
  weight = np.abs(v - background).sum(-1)  # [T, H, W]
  mass = weight.sum((1, 2))
  ys = np.arange(v.shape[1]) + 0.5
  xs = np.arange(v.shape[2]) + 0.5
  cx = (weight * xs[None, None, :]).sum((1, 2)) / mass
  cy = (weight * ys[None, :, None]).sum((1, 2)) / mass
  return np.stack([cx, cy], axis=-1), mass


# ------------------------------------------------------------------------ physics


def test_render_shape_dtype_and_determinism():
  world = PhysicsWorld()
  video = render_video(123, world)
  assert video.shape == (32, 32, 32, 3) and video.dtype == np.uint8
  assert video.tobytes() == render_video(123, world).tobytes()
  assert video.tobytes() != render_video(124, world).tobytes()
  assert video.std() > 5  # not a blank frame


def test_render_frame_subset_matches_full_video():
  world = PhysicsWorld()
  full = render_video(7, world)
  frames = [3, 5, 7, 9]
  np.testing.assert_array_equal(render_video(7, world, frames=frames), full[frames])


def test_video_seed_splits_disjoint_and_validated():
  train = {video_seed("train", i, 0) for i in range(200)}
  evals = {video_seed("eval", i, 0) for i in range(200)}
  assert len(train) == 200 and len(evals) == 200 and not train & evals
  assert video_seed("train", 0, 0) != video_seed("train", 0, 1)
  with pytest.raises(ValueError, match="train.*eval"):
    video_seed("test", 0, 0)


def test_train_and_eval_videos_differ():
  cfg = small_config()
  train, held_out = PhysicsVideoSource(cfg, "train"), PhysicsVideoSource(cfg, "eval")
  train_bytes = {train[i].tobytes() for i in range(4)}
  eval_bytes = {held_out[i].tobytes() for i in range(4)}
  assert len(train_bytes) == 4 and len(eval_bytes) == 4
  assert not train_bytes & eval_bytes


@pytest.mark.parametrize("seed", range(4))
def test_single_ball_moves_stays_inside_and_falls(seed):
  video = render_video(seed, ONE_BALL)
  centre, mass = pixel_centroids(video)
  # The drawing agrees with the simulation, so the simulator can be checked directly.
  scene = sample_scene(np.random.default_rng(seed), ONE_BALL)
  track = simulate(scene, ONE_BALL)[:, 0]
  np.testing.assert_allclose(centre, track, atol=0.1)
  # Moves every frame.
  assert np.all(np.hypot(*np.diff(centre, axis=0).T) > 0.05)
  # Never clipped by the frame border: its pixel mass stays constant...
  assert mass.min() / mass.max() > 0.95
  # ...and its centre keeps a radius away from the walls.
  r = scene.radius[0]
  assert np.all(track >= r - 1e-9) and np.all(track <= np.array([32, 32]) - r + 1e-9)
  # Gravity: between bounces the downward velocity grows by g each frame.
  g = ONE_BALL.gravity * ONE_BALL.height
  accel = centre[2:, 1] - 2 * centre[1:-1, 1] + centre[:-2, 1]
  assert np.mean(accel > 0) > 0.6
  assert 0.7 * g < np.median(accel) < 1.3 * g


def test_elastic_collision_conserves_momentum_and_energy():
  """Head-on collision of a light and a heavy ball, no gravity: the 1-D elastic result."""
  world = PhysicsWorld(num_frames=7, gravity=0.0)
  r = np.array([3.0, 4.0])
  scene = Scene(
    position=np.array([[10.0, 16.0], [22.0, 16.0]]),
    velocity=np.array([[1.0, 0.0], [-1.0, 0.0]]),
    radius=r,
    layer=np.array([0, 0]),
    colour=np.ones((2, 3), np.float32),
    background=np.zeros(3, np.float32),
    occluder=None,
    occluder_colour=np.zeros(3, np.float32),
  )
  track = simulate(scene, world)
  after = track[-1, :, 0] - track[-2, :, 0]  # x velocities after the collision
  m = r**2
  expected = np.array([((m[0] - m[1]) * 1 + 2 * m[1] * -1) / m.sum(), ((m[1] - m[0]) * -1 + 2 * m[0] * 1) / m.sum()])
  np.testing.assert_allclose(after, expected, atol=1e-6)
  np.testing.assert_allclose((m * after).sum(), 9 * 1 - 16 * 1, atol=1e-6)
  np.testing.assert_allclose((m * after**2).sum(), m.sum(), atol=1e-6)
  assert np.all(np.diff(track[:, :, 1], axis=0) == 0)  # head-on stays on its line


def test_balls_on_different_layers_pass_through_each_other():
  world = PhysicsWorld(num_frames=12, gravity=0.0)
  scene = Scene(
    position=np.array([[8.5, 16.5], [24.5, 16.5]]),
    velocity=np.array([[1.0, 0.0], [-1.0, 0.0]]),
    radius=np.array([3.0, 3.0]),
    layer=np.array([0, 1]),
    colour=np.array([[1, 0, 0], [0, 0, 1]], np.float32),
    background=np.zeros(3, np.float32),
    occluder=None,
    occluder_colour=np.zeros(3, np.float32),
  )
  track = simulate(scene, world)
  np.testing.assert_allclose(track[-1, :, 0], [19.5, 13.5])  # crossed without bouncing
  frame = physics.draw(scene, track, world)[8]  # both centred on pixel (16, 16)
  np.testing.assert_array_equal(frame[16, 16], [0, 0, 255])  # nearer (blue) ball in front


def test_occluder_hides_what_is_behind_it():
  world = PhysicsWorld(occluder_prob=1.0, min_balls=3, max_balls=3)
  hid_something = False
  for seed in range(4):
    scene = sample_scene(np.random.default_rng(seed), world)
    x0, y0, x1, y1 = scene.occluder
    box = (slice(None), slice(int(np.ceil(y0)), int(y1)), slice(int(np.ceil(x0)), int(x1)))
    video = render_video(seed, world)
    inside = video[box]
    assert inside.size > 0
    assert np.all(inside == inside[:1, :1, :1])  # one constant colour, every frame
    track = simulate(scene, world)
    unoccluded = physics.draw(dataclasses.replace(scene, occluder=None), track, world)
    hid_something |= bool(np.any(unoccluded[box] != unoccluded[box][:1, :1, :1]))
  assert hid_something  # a ball did pass behind the bar


def test_world_from_config_and_validation():
  cfg = default_data_config()
  cfg.gravity = 0.01
  world = PhysicsWorld.from_config(cfg)
  assert (world.height, world.width, world.num_frames) == (32, 32, cfg.video_frames)
  assert world.gravity == 0.01 and world.max_balls == cfg.max_balls
  with pytest.raises(ValueError, match="min_balls"):
    PhysicsWorld(min_balls=3, max_balls=2)


def test_render_speed():
  world = PhysicsWorld()
  best = np.inf
  for repeat in range(3):
    start = time.perf_counter()
    for i in range(10):
      render_video(video_seed("train", 10 * repeat + i, 0), world)
    best = min(best, (time.perf_counter() - start) / 10)
  print(f"render 32x32x32 video: {best * 1e3:.1f} ms")
  assert best < 0.05


def test_video_is_writable_as_gif(tmp_path):
  from PIL import Image

  video = render_video(0, PhysicsWorld())
  frames = [Image.fromarray(frame) for frame in video]
  path = tmp_path / "video.gif"
  frames[0].save(path, save_all=True, append_images=frames[1:], duration=80, loop=0)
  assert path.exists()
  with Image.open(path) as gif:
    assert gif.n_frames > 1


# ----------------------------------------------------------------------- pipeline


def test_to_uint8_inverts_to_float():
  values = np.arange(256, dtype=np.uint8)
  floats = to_float(values)
  assert floats.dtype == np.float32 and floats.min() == -1.0 and floats.max() == 1.0
  np.testing.assert_array_equal(to_uint8(floats), values)
  np.testing.assert_array_equal(to_uint8(np.array([-3.0, 3.0])), [0, 255])


def test_train_batches_shape_range_and_content():
  cfg = small_config()
  batch = next(iter(train_dataset(cfg, 0, HostSlice(3))))
  assert set(batch) == {"video", "skipped", "bucket"} and not batch["bucket"].any()
  assert batch["skipped"].shape == (3, len(SKIP_REASONS)) and not batch["skipped"].any()
  video = batch["video"]
  assert video.shape == (3, 4, 32, 32, 3) and video.dtype == np.float32
  assert video.min() >= -1.0 and video.max() <= 1.0
  # Each element is a strided window of the video whose index the index dataset yields.
  source = PhysicsVideoSource(cfg, "train")
  indices = [index for _, index, _ in train_index_dataset(len(make_source(cfg, "train")), 0, HostSlice(3))[:3]]
  for clip, index in zip(video, indices):
    full = to_float(source[index])
    windows = [full[s : s + 8 : 2] for s in range(12 - 8 + 1)]
    assert any(np.array_equal(clip, w) for w in windows)


def test_shards_are_disjoint_and_cover_the_data():
  cfg = small_config()
  firsts = []
  for shard in range(2):
    ds = train_index_dataset(len(make_source(cfg, "train")), 5, HostSlice(2, shard, 2))
    firsts.append({index for _, index, _ in ds[:4]})  # first epoch: 8 videos over 2 hosts
    assert len(firsts[-1]) == 4
  assert not firsts[0] & firsts[1]
  assert firsts[0] | firsts[1] == set(range(8))
  with pytest.raises(ValueError, match="host index"):
    train_index_dataset(len(make_source(cfg, "train")), 5, HostSlice(2, 2, 2))


def test_global_batches_do_not_depend_on_the_number_of_hosts():
  """Two hosts' slices, concatenated, are exactly the one-host batches (same videos, windows, order)."""
  cfg = small_config(frame_stride=1, frame_stride_max=2)
  single = take(iter(train_dataset(cfg, 7, HostSlice(4))), 5)
  hosts = [take(iter(train_dataset(cfg, 7, HostSlice(2, k, 2))), 5) for k in range(2)]
  for step in range(5):
    np.testing.assert_array_equal(np.concatenate([hosts[0][step], hosts[1][step]]), single[step])


def test_train_dataset_is_deterministic_per_seed():
  cfg = small_config()
  a = take(iter(train_dataset(cfg, 1, HostSlice(2))), 3)
  b = take(iter(train_dataset(cfg, 1, HostSlice(2))), 3)
  c = take(iter(train_dataset(cfg, 2, HostSlice(2))), 3)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert any(not np.array_equal(x, z) for x, z in zip(a, c))


def test_iterator_state_restores_exactly():
  cfg = small_config()
  iterator = iter(train_dataset(cfg, 3, HostSlice(2)))
  take(iterator, 3)
  state = iterator.get_state()
  expected = take(iterator, 2)
  fresh = iter(train_dataset(cfg, 3, HostSlice(2)))
  fresh.set_state(state)
  for x, y in zip(expected, take(fresh, 2)):
    np.testing.assert_array_equal(x, y)


def test_worker_processes_match_in_process():
  cfg = small_config(worker_count=1)
  iterator = iter(train_dataset(cfg, 4, HostSlice(2)))
  try:
    with_workers = take(iterator, 2)
  finally:
    iterator.close()
  in_process = take(iter(train_dataset(small_config(), 4, HostSlice(2))), 2)
  for x, y in zip(with_workers, in_process):
    np.testing.assert_array_equal(x, y)


def test_held_out_clips():
  cfg = small_config()
  videos = held_out_clips(cfg, 3)
  assert videos.shape == (3, 4, 32, 32, 3) and videos.dtype == np.float32
  np.testing.assert_array_equal(videos, held_out_clips(cfg, 3))
  source = PhysicsVideoSource(cfg, "eval")
  np.testing.assert_array_equal(videos[1], to_float(source[1][0:8:2]))
  with pytest.raises(ValueError, match="num_eval_videos"):
    held_out_clips(cfg, 7)


def test_config_validation_messages():
  with pytest.raises(ValueError, match="num_frames.*frame_stride.*video_frames"):
    train_dataset(small_config(num_frames=7), 0, HostSlice(2))
  with pytest.raises(ValueError, match="video_frames"):
    held_out_clips(small_config(frame_stride=4), 1)
  with pytest.raises(ValueError, match="physics"):
    train_dataset(small_config(source="mnist"), 0, HostSlice(2))


def test_source_plugs_into_grain_map_dataset():
  import grain

  source = PhysicsVideoSource(small_config(), "eval")
  ds = grain.MapDataset.source(source)
  assert len(ds) == 6
  np.testing.assert_array_equal(ds[2], source[2])
  with pytest.raises(IndexError):
    source[6]


def test_random_stride_range_for_stages_3_and_4():
  """frame_stride_max > frame_stride: each sample's stride is drawn from the range."""
  cfg = small_config(frame_stride=1, frame_stride_max=3, num_frames=3)
  source = PhysicsVideoSource(cfg, "train")
  full = to_float(source[0])
  clip = _ClipOrSkip(source, seed=0, max_tries=1, bucket_of=video_buckets(source))
  seen = set()
  for i in range(40):
    out = clip((i, 0, 0))["video"]
    match = [
      (k, s) for k in (1, 2, 3) for s in range(len(full) - 2 * k) if np.array_equal(out, full[s : s + 3 * k : k])
    ]
    assert match, "clip is not a strided window of the video"
    seen.add(match[0][0])
  assert seen == {1, 2, 3}


def test_physics_source_follows_the_protocol():
  """clip(index, rng) draws stride then start from rng; leading_frames is frames 0, s, 2s, ...; describe names it."""
  cfg = small_config(frame_stride=1, frame_stride_max=2)
  source = PhysicsVideoSource(cfg, "train")
  a = source.clip(3, np.random.default_rng(5))
  np.testing.assert_array_equal(a, source.clip(3, np.random.default_rng(5)))
  assert a.shape == (4, 32, 32, 3) and a.dtype == np.uint8
  np.testing.assert_array_equal(source.leading_frames(2, source.strides[0], source.num_frames), source[2][0:4])
  assert "physics" in source.describe() and "train" in source.describe()
  assert set(VALID_SOURCES) >= {"physics", "video_files"}
