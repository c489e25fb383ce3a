"""Video-file source and its pipeline: listing, decoding, sampling, sharding, resumption, bad files (fast, CPU).

Every video is made here with PyAV: 64x48 flat frames whose red level names the
video (40 + 25*v) and whose green level names the frame (10 + 6*i), so a
decoded clip tells which video and which frames it came from.
"""

from __future__ import annotations

import json
import os
import pickle
from collections import Counter
from pathlib import Path

import av
import numpy as np
import pytest

from tests.conftest import data_config
from vgpt_jax.data import video_files
from vgpt_jax.data.held_out import held_out_clips
from vgpt_jax.data.pipeline import (
  HostSlice,
  make_source,
  train_dataset,
  train_index_dataset,
  validate_data_config,
)
from vgpt_jax.data.sources import SKIP_REASONS, BadVideo, NoUsableVideo, cover_crop
from vgpt_jax.data.video_files import VideoFileSource, find_videos, read_clip, read_manifest

FRAMES = 40  # frames of every good video


def encode(path: Path, frames: np.ndarray, codec: str = "libx264", gop: int = 8, faststart: bool = False) -> Path:
  """Writes uint8 [T, H, W, 3] frames as a video file at 24 fps, a keyframe every `gop` frames."""
  path.parent.mkdir(parents=True, exist_ok=True)
  # Near-lossless, so a flat frame's level survives to within the RGB<->YUV rounding (about 2).
  options = {"libx264": {"qp": "2"}, "libvpx": {"qmin": "0", "qmax": "4"}}.get(codec, {})
  with av.open(str(path), "w", options={"movflags": "faststart"} if faststart else {}) as container:
    stream = container.add_stream(codec, rate=24, options=options)
    stream.height, stream.width = frames.shape[1:3]
    stream.pix_fmt = "yuv420p"
    stream.bit_rate = 4_000_000
    stream.codec_context.gop_size = gop
    for frame in frames:
      container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
    container.mux(stream.encode())
  return path


def audio_only(path: Path) -> Path:
  """An mp4 holding one AAC audio stream and no pictures."""
  path.parent.mkdir(parents=True, exist_ok=True)
  with av.open(str(path), "w") as container:
    stream = container.add_stream("aac", rate=16000)
    for i in range(8):
      frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
      frame.sample_rate, frame.pts = 16000, i * 1024
      container.mux(stream.encode(frame))
    container.mux(stream.encode())
  return path


def flat_video(video_id: int, frames: int = FRAMES, height: int = 48, width: int = 64) -> np.ndarray:
  """uint8 [T, H, W, 3]: red = 40 + 25 * video_id, green = 10 + 6 * frame, blue = 128."""
  out = np.empty((frames, height, width, 3), np.uint8)
  out[..., 0] = 40 + 25 * video_id
  out[..., 1] = (10 + 6 * np.arange(frames))[:, None, None]
  out[..., 2] = 128
  return out


def identify(clip: np.ndarray) -> tuple[int, np.ndarray]:
  """(video id, frame indices [F]) of a decoded uint8 or [-1, 1] float clip [F, H, W, 3]."""
  clip = np.asarray(clip, np.float64)
  if clip.max() <= 1.0:
    clip = (clip + 1.0) * 127.5
  mean = clip.mean(axis=(1, 2))  # [F, 3]
  video = np.round((mean[:, 0] - 40) / 25)
  frames = (mean[:, 1] - 10) / 6
  assert np.all(video == video[0]), f"frames of different videos in one clip: {mean[:, 0]}"
  assert np.abs(frames - np.round(frames)).max() < 0.45, f"green levels off the frame grid: {mean[:, 1]}"
  return int(video[0]), np.round(frames).astype(int)


def video_config(directory, **overrides):
  """Data config over a video directory: 16x16 clips of 4 frames, stride 2..3, min_size 40."""
  fields = dict(source="video_files", path=str(directory), height=16, width=16, num_frames=4, frame_stride=2)
  fields.update(frame_stride_max=3, min_size=40, num_eval_videos=1)
  return data_config(**{**fields, **overrides})


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory) -> Path:
  """8 good videos (ids 0..7) in nested folders and four containers, plus files to ignore."""
  root = tmp_path_factory.mktemp("good")
  names = ["a/v0.mp4", "a/v1.MOV", "a/b/v2.mkv", "v3.webm", "v4.avi", "v5.m4v", "z/v6.mp4", "z/v7.mp4"]
  codecs = {".mp4": "libx264", ".mov": "libx264", ".mkv": "libx264", ".webm": "libvpx", ".avi": "mpeg4"}
  for i, name in enumerate(names):
    encode(root / name, flat_video(i), codecs.get(Path(name).suffix.lower(), "libx264"))
  (root / "notes.txt").write_text("not a video")
  (root / "a" / "v0.mp4.part").write_bytes(b"partial download")
  return root


@pytest.fixture(scope="module")
def mixed_dir(tmp_path_factory, good_dir) -> Path:
  """5 good videos (ids 0..4) and one of each kind of bad file; a separate eval folder beside it."""
  root = tmp_path_factory.mktemp("mixed")
  train = root / "train"
  for i in range(5):
    encode(train / f"good{i}.mp4", flat_video(i))
  (train / "zero.mp4").write_bytes(b"")
  noise = np.random.default_rng(0).integers(0, 256, (FRAMES, 48, 64, 3), dtype=np.uint8)
  data = encode(root / "noise.mp4", noise, faststart=True).read_bytes()  # index first, then the frames
  (train / "truncated.mp4").write_bytes(data[: len(data) // 2])
  (train / "random.mp4").write_bytes(np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8).tobytes())
  (train / "text.mp4").write_text("this is a text file\n" * 50)
  encode(train / "short.mp4", flat_video(5, frames=20))
  encode(train / "small.mp4", flat_video(6, height=24, width=32))
  encode(train / "wide.mp4", flat_video(7, height=48, width=240))
  encode(train / "thin.mp4", flat_video(7, height=24, width=200))  # too small and too elongated: aspect first
  encode(train / "small_short.mp4", flat_video(6, frames=20, height=24, width=32))  # size is met before length
  audio_only(train / "audio.mp4")
  encode(root / "eval" / "held.mp4", flat_video(8))
  encode(root / "eval" / "held2.mp4", flat_video(7))
  return root


MIXED_KINDS = {
  **{f"good{i}.mp4": "good" for i in range(5)},
  "zero.mp4": "unreadable",
  "truncated.mp4": "truncated",
  "random.mp4": "unreadable",
  "text.mp4": "unreadable",
  "short.mp4": "too_short",
  "small.mp4": "too_small",
  "wide.mp4": "bad_aspect",
  "thin.mp4": "bad_aspect",
  "small_short.mp4": "too_small",
  "audio.mp4": "no_video_stream",
}
BAD_COUNTS = Counter(kind for kind in MIXED_KINDS.values() if kind != "good")


def mixed_config(mixed_dir, **overrides):
  """The window is always frames 0, 10, 20, 30 (40 frames, stride 10), so every bad file fails the same way."""
  base = dict(path=str(mixed_dir / "train"), eval_path=str(mixed_dir / "eval"), frame_stride=10, frame_stride_max=0)
  return video_config(mixed_dir, **{**base, **overrides})


# ------------------------------------------------------------------------ listing


def test_directory_listing_is_recursive_sorted_and_filtered(good_dir):
  found = [os.path.relpath(p, good_dir) for p in find_videos(str(good_dir))]
  expected = ["a/b/v2.mkv", "a/v0.mp4", "a/v1.MOV", "v3.webm", "v4.avi", "v5.m4v", "z/v6.mp4", "z/v7.mp4"]
  assert found == expected
  only = [os.path.relpath(p, good_dir) for p in find_videos(str(good_dir), (".MP4", "mov"))]
  assert only == ["a/v0.mp4", "a/v1.MOV", "z/v6.mp4", "z/v7.mp4"]
  source = VideoFileSource(video_config(good_dir, num_eval_videos=2))
  assert len(source) == 6 and [os.path.basename(source.name(i)) for i in range(2)] == ["v2.mkv", "v0.mp4"]
  assert str(good_dir) in source.describe() and "train" in source.describe()


def test_manifest_with_and_without_counts(good_dir, tmp_path):
  manifest = tmp_path / "lists" / "videos.tsv"
  manifest.parent.mkdir()
  manifest.write_text(
    "# my videos\n\n"
    f"{os.path.relpath(good_dir / 'a' / 'v0.mp4', manifest.parent)}\t12\n"  # relative, with a (short) count
    f"{good_dir / 'v3.webm'}\n"  # absolute, count unknown
    f"  {good_dir / 'z' / 'v6.mp4'}\t0\n"
    f"{good_dir / 'z' / 'v7.mp4'}\n"
  )
  paths, counts, clips = read_manifest(str(manifest))
  assert clips == [None] * 4
  assert [os.path.realpath(p) for p in paths[:2]] == [str(good_dir / "a" / "v0.mp4"), str(good_dir / "v3.webm")]
  assert counts == [12, 0, 0, 0]
  cfg = video_config(good_dir, path="", manifest=str(manifest), frame_stride=1, frame_stride_max=3)
  validate_data_config(cfg)
  source = VideoFileSource(cfg)
  assert len(source) == 3 and "videos.tsv" in source.describe()
  for seed in range(10):  # the manifest's count (12 of 40 frames) bounds every window
    video, frames = identify(source.clip(0, np.random.default_rng(seed)))
    assert video == 0 and frames.max() < 12
  assert identify(source.clip(1, np.random.default_rng(0)))[0] == 3  # webm: counted by demuxing
  manifest.write_text("a.mp4\tmany\n")
  with pytest.raises(ValueError, match="line 1.*'many'"):
    read_manifest(str(manifest))


def test_write_manifest_lists_counts(good_dir, tmp_path):
  out = tmp_path / "m.tsv"
  assert video_files.write_manifest(str(good_dir), str(out)) == 8
  paths, counts, _ = read_manifest(str(out))
  assert counts == [FRAMES] * 8 and os.path.realpath(paths[1]) == str(good_dir / "a" / "v0.mp4")


def test_clip_manifests_give_the_clips_frames(tmp_path, monkeypatch):
  """Clips of a long video (`path,start,end`, tab or comma, seconds or H:MM:SS.fff, and Panda-70M's CSV) are read
  by seeking: a clip's frames are the file's frames from round(start * fps) on, its count bounds the window, and
  a clip shorter than the sample is skipped and counted as too_short."""
  long_video = encode(tmp_path / "long.mp4", flat_video(2, frames=40))  # 1.67 s at 24 fps
  manifest = tmp_path / "clips.csv"
  manifest.write_text(
    "long.mp4,0.5,1.0\n"  # frames 12..23
    "long.mp4\t0:00:01.000\t0:00:01.500\n"  # frames 24..35
    "long.mp4,1.6,1.65\n"  # 1 frame: too short for 4 at stride 1
    f"{tmp_path / 'odd,name.mp4'}\n"  # commas in a plain path
  )
  paths, counts, clips = read_manifest(str(manifest))
  assert clips == [(0.5, 1.0), (1.0, 1.5), (1.6, 1.65), None] and paths[3].endswith("odd,name.mp4")
  manifest.write_text("long.mp4,0.5,1.0\nlong.mp4\t0:00:01.000\t0:00:01.500\nlong.mp4,1.6,1.65\n")
  inspected, real = [], video_files.inspect_file
  monkeypatch.setattr(video_files, "inspect_file", lambda p: inspected.append(p) or real(p))
  source = VideoFileSource(video_config(tmp_path, path="", manifest=str(manifest), frame_stride=1,
                                        frame_stride_max=1, num_eval_videos=0))  # fmt: skip
  assert len(source) == 2 and source.excluded["too_short"] == 1 and len(inspected) == 1  # one file, probed once
  assert list(source.files.frames) == [12, 12] and list(source.files.starts) == [12, 24]
  for index, first in ((0, 12), (1, 24)):
    video, frames = identify(source.read(index, lambda n: (n - 4, 1, 4)))  # the clip's last 4 frames
    assert video == 2 and list(frames) == [first + 8, first + 9, first + 10, first + 11]
  panda = tmp_path / "panda.csv"
  panda.write_text('videoID,url,timestamp,caption\nlong,https://x,"[[\'0:00:01.000\', \'0:00:02.000\'], '
                   '[\'0:00:02.500\', \'0:00:03.500\']]","a caption"\n')  # fmt: skip
  paths, _, clips = read_manifest(str(panda))
  assert clips == [(1.0, 2.0), (2.5, 3.5)] and paths == [str(long_video)] * 2
  manifest.write_text("long.mp4,2.0,1.0\n")
  with pytest.raises(ValueError, match="line 1: the clip ends"):
    read_manifest(str(manifest))


# ----------------------------------------------------------------------- decoding


@pytest.mark.parametrize("name", ["a/v0.mp4", "a/b/v2.mkv", "v3.webm", "v4.avi"])
def test_clip_has_the_chosen_frames_and_seeking_matches_full_decode(good_dir, name):
  path = str(good_dir / name)
  vid = int(Path(name).stem[1:])
  for start, stride in [(0, 1), (1, 2), (9, 3), (17, 5), (23, 4), (36, 1)]:
    clip, count = read_clip(path, lambda n: (start, stride, 4), height=24, width=32)
    assert count == FRAMES and clip.shape == (4, 24, 32, 3) and clip.dtype == np.uint8
    video, frames = identify(clip)
    assert video == vid
    np.testing.assert_array_equal(frames, start + stride * np.arange(4))
    full, _ = read_clip(path, lambda n: (start, stride, 4), height=24, width=32, seek=False)
    np.testing.assert_array_equal(clip, full)


def test_source_draws_stride_and_start_from_rng(good_dir):
  source = VideoFileSource(video_config(good_dir, frame_stride=2, frame_stride_max=5))
  strides = set()
  for seed in range(30):
    clip = source.clip(3, np.random.default_rng(seed))
    _, frames = identify(clip)
    step = np.diff(frames)
    assert np.all(step == step[0]) and 2 <= step[0] <= 5 and frames[-1] < FRAMES
    strides.add(int(step[0]))
    np.testing.assert_array_equal(clip, source.clip(3, np.random.default_rng(seed)))
  assert strides == {2, 3, 4, 5}
  _, frames = identify(source.leading_frames(3, source.strides[0], source.num_frames))
  np.testing.assert_array_equal(frames, [0, 2, 4, 6])


def test_frames_are_scaled_to_cover_then_centre_cropped(tmp_path):
  """96x48 to 32x32: scaled to 64x32, then columns 16..47 kept (original columns 24..71)."""
  frames = np.full((12, 48, 96, 3), 30, np.uint8)  # dark
  frames[:, :, 24:36] = 120  # grey band: scaled columns 16..23, cropped 0..7
  frames[:, :, 48:] = 220  # bright right half: cropped 16..31
  path = encode(tmp_path / "halves.mp4", frames)
  clip, _ = read_clip(str(path), lambda n: (0, 1, 2), height=32, width=32)
  assert clip.shape == (2, 32, 32, 3) and clip.dtype == np.uint8
  row = clip[1, 16, :, 0].astype(int)
  assert np.abs(row[:6] - 120).max() < 10
  assert np.abs(row[9:14] - 30).max() < 10
  assert np.abs(row[18:] - 220).max() < 10


def test_cover_crop_keeps_the_aspect_and_centres_the_crop():
  assert cover_crop(360, 640, 176, 320) == (180, 320, 2, 0)
  assert cover_crop(640, 360, 176, 320) == (569, 320, 196, 0)
  assert cover_crop(48, 64, 16, 16) == (16, 21, 0, 2)


# ------------------------------------------------------------------------- pipeline


def test_pipeline_batches_shape_range_and_content(good_dir):
  cfg = video_config(good_dir)
  batch = next(iter(train_dataset(cfg, 0, HostSlice(3))))
  assert batch["video"].shape == (3, 4, 16, 16, 3) and batch["video"].dtype == np.float32
  assert -1.0 <= batch["video"].min() and batch["video"].max() <= 1.0
  np.testing.assert_array_equal(batch["skipped"], np.zeros((3, len(SKIP_REASONS))))
  source = make_source(cfg, "train")
  indices = [index for _, index, _ in train_index_dataset(len(source), 0, HostSlice(3))[:3]]
  for clip, index in zip(batch["video"], indices):
    video, frames = identify(clip)
    assert int(Path(source.name(index)).stem[1:]) == video
    assert np.diff(frames)[0] in (2, 3)


def test_shards_are_disjoint_and_cover_the_videos(good_dir):
  cfg = video_config(good_dir, num_eval_videos=2)  # 6 train videos
  seen = []
  for shard in range(2):
    ds = train_index_dataset(len(make_source(cfg, "train")), 3, HostSlice(3, shard, 2))
    seen.append({index for _, index, _ in ds[:3]})
  assert len(seen[0]) == len(seen[1]) == 3 and not seen[0] & seen[1] and seen[0] | seen[1] == set(range(6))


def test_global_batches_do_not_depend_on_the_number_of_hosts(mixed_dir, tmp_path):
  """With files failing at run time: two hosts' slices, concatenated, equal the one-host batches, skips included."""
  cfg, source = vanishing(mixed_dir, tmp_path, frame_stride=3, frame_stride_max=10)
  single = take(iter(train_dataset(cfg, 7, HostSlice(4), source=source)), 4)
  hosts = [take(iter(train_dataset(cfg, 7, HostSlice(2, k, 2), source=source)), 4) for k in range(2)]
  for step in range(4):
    for key in ("video", "skipped"):
      np.testing.assert_array_equal(np.concatenate([h[step][key] for h in hosts]), single[step][key])
  assert sum(b["skipped"].sum() for b in single) > 0


def test_order_is_deterministic_per_seed(good_dir):
  cfg = video_config(good_dir)
  a, b, c = (take(iter(train_dataset(cfg, s, HostSlice(2))), 3) for s in (1, 1, 2))
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["video"], y["video"])
  assert any(not np.array_equal(x["video"], z["video"]) for x, z in zip(a, c))


def test_iterator_state_restores_exactly(mixed_dir, tmp_path):
  cfg, source = vanishing(mixed_dir, tmp_path, frame_stride=3, frame_stride_max=10)
  iterator = iter(train_dataset(cfg, 3, HostSlice(2), source=source))
  take(iterator, 3)
  state = iterator.get_state()
  expected = take(iterator, 3)
  fresh = iter(train_dataset(cfg, 3, HostSlice(2), source=source))
  fresh.set_state(state)
  for x, y in zip(expected, take(fresh, 3)):
    np.testing.assert_array_equal(x["video"], y["video"])
    np.testing.assert_array_equal(x["skipped"], y["skipped"])


def test_worker_processes_match_in_process(mixed_dir):
  cfg = mixed_config(mixed_dir)
  iterator = iter(train_dataset(mixed_config(mixed_dir, worker_count=1), 4, HostSlice(2)))
  try:
    with_workers = take(iterator, 3)
  finally:
    iterator.close()
  for x, y in zip(with_workers, take(iter(train_dataset(cfg, 4, HostSlice(2))), 3)):
    np.testing.assert_array_equal(x["video"], y["video"])
    np.testing.assert_array_equal(x["skipped"], y["skipped"])


def test_source_pickles_without_its_memo(good_dir):
  source = VideoFileSource(video_config(good_dir))
  source.clip(0, np.random.default_rng(0))
  copy = pickle.loads(pickle.dumps(source))
  assert copy._memo == {} and len(copy) == len(source) and copy.name(2) == source.name(2)


# ---------------------------------------------------------------------- bad files


@pytest.mark.parametrize("name,kind", sorted(MIXED_KINDS.items()))
def test_each_bad_file_is_judged_with_its_reason_and_good_ones_decode(mixed_dir, name, kind):
  cfg = mixed_config(mixed_dir)
  path = str(mixed_dir / "train" / name)
  bad = video_files.judge(video_files.inspect_file(path), path, cfg.num_frames * cfg.frame_stride, cfg.min_size, 4.0)
  if kind == "good":
    assert bad is None
    source = VideoFileSource(cfg)
    index = [os.path.basename(source.name(i)) for i in range(len(source))].index(name)
    assert identify(source.clip(index, np.random.default_rng(0)))[0] == int(name[4])
    return
  assert bad is not None and bad.reason == kind and name in str(bad)


def test_source_excludes_bad_files_up_front_counting_each_reason(mixed_dir, caplog):
  with caplog.at_level("WARNING"):
    source = VideoFileSource(mixed_config(mixed_dir))
  assert sorted(os.path.basename(source.name(i)) for i in range(len(source))) == [f"good{i}.mp4" for i in range(5)]
  assert source.excluded == {reason: BAD_COUNTS[reason] for reason in SKIP_REASONS}
  assert all(BAD_COUNTS[reason] for reason in SKIP_REASONS)  # every reason has a test file
  assert f"{sum(BAD_COUNTS.values())} of {len(MIXED_KINDS)} videos are unusable" in caplog.text


def test_probe_is_cached_and_redone_for_changed_files(mixed_dir, tmp_path, monkeypatch):
  for name in ("good0.mp4", "good1.mp4", "short.mp4"):
    os.link(mixed_dir / "train" / name, tmp_path / name)
  cfg = mixed_config(mixed_dir, path=str(tmp_path))
  assert len(VideoFileSource(cfg)) == 2 and (tmp_path / ".vgpt_file_facts.json").exists()
  inspected = []
  real = video_files.inspect_file
  monkeypatch.setattr(video_files, "inspect_file", lambda p: inspected.append(os.path.basename(p)) or real(p))
  assert len(VideoFileSource(cfg)) == 2 and inspected == []  # all from the cache
  (tmp_path / "good1.mp4").unlink()
  encode(tmp_path / "good1.mp4", flat_video(1, frames=20))  # replaced by a too-short video
  source = VideoFileSource(cfg)
  assert inspected == ["good1.mp4"] and len(source) == 1 and source.excluded["too_short"] == 2


def test_half_of_an_mp4_with_its_index_at_the_end_is_unreadable(mixed_dir, tmp_path):
  data = encode(tmp_path / "whole.mp4", flat_video(0)).read_bytes()
  (tmp_path / "half.mp4").write_bytes(data[: len(data) // 2])
  with pytest.raises(BadVideo, match="unreadable"):
    read_clip(str(tmp_path / "half.mp4"), lambda n: (0, 1, 4), height=16, width=16)
  with pytest.raises(BadVideo, match="unreadable.*no such file"):
    read_clip(str(tmp_path / "missing.mp4"), lambda n: (0, 1, 4), height=16, width=16)


def replay(source, kinds: dict[str, str], seed: int, position: int, index: int, tries: int) -> tuple[int, Counter]:
  """The pipeline's candidate rule, replayed from the files' known kinds: (good index, skips by reason)."""
  skipped: Counter = Counter()
  for attempt in range(tries):
    if attempt:
      index = int(np.random.default_rng([seed, position, attempt]).integers(len(source)))
    kind = kinds[os.path.basename(source.name(index))]
    if kind == "good":
      return index, skipped
    skipped[kind] += 1
  raise AssertionError("no good candidate")


def vanishing(mixed_dir, tmp_path, **overrides):
  """(config, source) over the mixed files, where good3 and good4 vanish after the probe: the source lists them,
  reading them fails at run time (a file deleted or unmounted mid-run), and the pipeline must replace them."""
  for name in MIXED_KINDS:
    os.link(mixed_dir / "train" / name, tmp_path / name)
  cfg = mixed_config(mixed_dir, path=str(tmp_path), **overrides)
  source = make_source(cfg, "train")
  (tmp_path / "good3.mp4").unlink()
  (tmp_path / "good4.mp4").unlink()
  return cfg, source


VANISHED = {**{f"good{i}.mp4": "good" for i in range(3)}, "good3.mp4": "unreadable", "good4.mp4": "unreadable"}


def test_files_failing_after_the_probe_are_replaced_and_counted_per_sample(mixed_dir, tmp_path):
  cfg, source = vanishing(mixed_dir, tmp_path)
  assert len(source) == 5  # only the good files are numbered
  batch_size, steps, seed = 4, 6, 11  # 24 samples: about five epochs of the 5 files
  batches = take(iter(train_dataset(cfg, seed, HostSlice(batch_size), source=source)), steps)
  elements = train_index_dataset(len(source), seed, HostSlice(batch_size))
  total: Counter = Counter()
  for step, batch in enumerate(batches):
    assert batch["skipped"].shape == (batch_size, len(SKIP_REASONS))
    for j, clip in enumerate(batch["video"]):
      position, index, _ = elements[step * batch_size + j]
      good, skipped = replay(source, VANISHED, seed, position, index, int(cfg.max_skip_tries))
      video, frames = identify(clip)
      assert video == int(os.path.basename(source.name(good))[4]) and video < 3
      np.testing.assert_array_equal(frames, [0, 10, 20, 30])
      assert dict(zip(SKIP_REASONS, batch["skipped"][j].tolist())) == {r: skipped[r] for r in SKIP_REASONS}
      total += skipped
  assert total["unreadable"] > 0


def test_only_bad_files_raise_a_clear_error_naming_each_reason(mixed_dir, tmp_path):
  for name in ["zero.mp4", "random.mp4", "short.mp4", "small.mp4", "audio.mp4"]:
    os.link(mixed_dir / "train" / name, tmp_path / name)
  cfg = mixed_config(mixed_dir, path=str(tmp_path))
  with pytest.raises(NoUsableVideo) as err:
    train_dataset(cfg, 0, HostSlice(2))
  message = str(err.value)
  assert str(tmp_path) in message and "none of the 5 videos" in message
  assert "unreadable=2, no_video_stream=1, too_small=1, too_short=1" in message


def test_a_single_usable_file_among_many_bad_ones_is_enough(mixed_dir, tmp_path):
  bad = [name for name, kind in MIXED_KINDS.items() if kind != "good"]
  for name in bad + ["good2.mp4"]:
    os.link(mixed_dir / "train" / name, tmp_path / name)
  cfg = mixed_config(mixed_dir, path=str(tmp_path))
  batches = take(iter(train_dataset(cfg, 0, HostSlice(4))), 3)
  assert all(identify(clip)[0] == 2 for batch in batches for clip in batch["video"])
  assert not any(batch["skipped"].any() for batch in batches)


def test_empty_directory_raises_a_clear_error(tmp_path):
  (tmp_path / "sub").mkdir()
  (tmp_path / "sub" / "readme.txt").write_text("no videos here")
  cfg = video_config(tmp_path)
  with pytest.raises(ValueError, match=rf"data.path='{tmp_path}' holds no video files with extensions.*mp4"):
    validate_data_config(cfg)
  with pytest.raises(ValueError, match=rf"no video files in directory {tmp_path}.*mp4"):
    VideoFileSource(cfg)
  with pytest.raises(ValueError, match="holds no video files"):
    train_dataset(cfg, 0, HostSlice(2))


@pytest.mark.parametrize(
  "overrides,message",
  [
    (dict(path=""), "needs data.path .* or data.manifest"),
    (dict(path="/no/such/dir"), "data.path='/no/such/dir' is not an existing directory"),
    (dict(manifest="/no/such.txt"), "both set"),
    (dict(path="", manifest="/no/such.txt"), "data.manifest='/no/such.txt' is not an existing file"),
    (dict(eval_path="/no/eval"), "data.eval_path='/no/eval' is not an existing directory"),
    (dict(extensions=()), "data.extensions=.* is empty"),
    (dict(min_size=0), "data.min_size=0 must be >= 1"),
    (dict(max_aspect=0.5), "data.max_aspect=0.5 must be >= 1"),
    (dict(max_skip_tries=0), "data.max_skip_tries=0 must be >= 1"),
    (dict(num_eval_videos=0), "data.num_eval_videos=0 must be >= 1 .* or give held-out videos with data.eval_path"),
  ],
)
def test_config_validation_names_the_field(good_dir, overrides, message):
  with pytest.raises(ValueError, match=message):
    validate_data_config(video_config(good_dir, **overrides))


def test_path_to_a_file_suggests_the_manifest(good_dir):
  with pytest.raises(ValueError, match="not an existing directory .for a file listing videos use data.manifest"):
    validate_data_config(video_config(good_dir / "v3.webm"))


# --------------------------------------------------------------------------- eval


def test_eval_holds_out_the_last_files_and_never_overlaps_train(good_dir):
  cfg = video_config(good_dir, num_eval_videos=3)
  train, held = make_source(cfg, "train"), make_source(cfg, "eval")
  train_paths = {train.name(i) for i in range(len(train))}
  eval_paths = [held.name(i) for i in range(len(held))]
  assert len(train_paths) == 5 and not train_paths & set(eval_paths)
  assert train_paths | set(eval_paths) == set(find_videos(str(good_dir)))
  assert [os.path.basename(p) for p in eval_paths] == ["v5.m4v", "v6.mp4", "v7.mp4"]
  videos = held_out_clips(cfg, 2)
  assert videos.shape == (2, 4, 16, 16, 3)
  assert [identify(v) for v in videos][1][0] == 6
  np.testing.assert_array_equal(identify(videos[0])[1], [0, 2, 4, 6])
  with pytest.raises(ValueError, match="num_eval_videos"):
    held_out_clips(cfg, 4)
  with pytest.raises(ValueError, match="would hold out all 8 videos"):
    make_source(video_config(good_dir, num_eval_videos=8), "train")


def test_eval_path_is_excluded_from_train_and_bad_eval_videos_are_left_out(mixed_dir, good_dir):
  cfg = mixed_config(mixed_dir)
  assert identify(held_out_clips(cfg, 1)[0])[0] == 8
  inside = video_config(mixed_dir / "train", eval_path=str(mixed_dir / "train"))  # eval set = the train folder
  with pytest.raises(ValueError, match="nothing is left to train on"):
    make_source(inside, "train")
  first_good = mixed_config(mixed_dir, eval_path=str(mixed_dir / "train"), path=str(good_dir))
  videos = held_out_clips(first_good, 5)  # the held-out folder sorted: good0..good4 come first anyway
  assert [identify(v)[0] for v in videos] == [0, 1, 2, 3, 4]
  assert len(make_source(first_good, "eval")) == 5  # the bad files of the held-out folder are not numbered
  with pytest.raises(ValueError, match=r"count must lie in \[0, 5\]"):
    held_out_clips(first_good, 6)


# ----------------------------------------------------------------- the train job


def video_run_config(mixed_dir, train_dir, **overrides):
  """The test config on the videos of `train_dir` (eval: the mixed folder's eval set), window 0, 8, ..., 32."""
  from tests.conftest import small_config

  data = mixed_config(mixed_dir, path=str(train_dir), num_frames=5, frame_stride=8)
  cfg = small_config(**{"train.steps": 3, "train.log_every": 1, "train.tensorboard": False, **overrides})
  for key in ("source", "path", "eval_path", "num_frames", "frame_stride", "frame_stride_max", "min_size"):
    cfg.data[key] = data[key]
  return cfg


def test_one_good_file_among_15_bad_ones_trains_to_the_end_and_reports_exclusions(mixed_dir, tmp_path, caplog):
  from vgpt_jax.train import train

  bad = [name for name, kind in MIXED_KINDS.items() if kind != "good"]
  names = bad + [f"copy_{name}" for name in bad[: 15 - len(bad)]]
  for name in names:
    os.link(mixed_dir / "train" / name.removeprefix("copy_"), tmp_path / name)
  os.link(mixed_dir / "train" / "good3.mp4", tmp_path / "good3.mp4")
  with caplog.at_level("INFO"):
    summary = train(video_run_config(mixed_dir, tmp_path, **{"train.steps": 4}), tmp_path / "run")
  assert summary["end_step"] == 4 and not summary["preempted"]
  assert "15 of 16 videos are unusable and never drawn" in caplog.text
  expected = Counter(MIXED_KINDS[name.removeprefix("copy_")] for name in names)
  on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
  assert on_disk["excluded_videos"] == summary["excluded_videos"] == {r: expected[r] for r in SKIP_REASONS}
  assert on_disk["skipped_videos"] == dict.fromkeys(SKIP_REASONS, 0)
  records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert all(records[-1][f"skipped_{reason}"] == 0 for reason in SKIP_REASONS)


def test_files_vanishing_mid_run_are_replaced_and_their_count_survives_a_resume(mixed_dir, tmp_path):
  """A real run loses two of its three videos while it trains, is preempted, and resumes: the replacements
  are counted in the train state, so the totals carry over the restart."""
  import signal
  import subprocess
  import time

  from tests.conftest import cpu_env, train_command

  videos = tmp_path / "videos"
  videos.mkdir()
  for i in range(3):
    os.link(mixed_dir / "train" / f"good{i}.mp4", videos / f"good{i}.mp4")
  cfg = video_run_config(mixed_dir, videos)
  overrides = [f"--config.data.{key}={cfg.data[key]}" for key in ("source", "path", "eval_path", "num_frames")]
  overrides += [f"--config.data.{key}={cfg.data[key]}" for key in ("frame_stride", "min_size")]
  overrides += ["--config.train.log_every=1", "--config.checkpoint.every_steps=5", "--config.train.num_samples=1"]
  overrides += ["--config.train.tensorboard=false"]
  command = train_command(tmp_path / "run", *overrides)
  metrics = tmp_path / "run" / "metrics.jsonl"

  def records():
    return [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []

  proc = subprocess.Popen(
    command + ["--config.train.steps=100000"], env=cpu_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
  )
  try:
    deadline = time.time() + 240
    while len(records()) < 2:
      assert proc.poll() is None and time.time() < deadline
      time.sleep(0.02)
    (videos / "good1.mp4").unlink()
    (videos / "good2.mp4").unlink()
    while not records() or records()[-1]["skipped_unreadable"] < 3:
      assert proc.poll() is None and time.time() < deadline
      time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
  finally:
    proc.kill()
  stopped = records()[-1]
  assert stopped["skipped_unreadable"] >= 3 and stopped["skipped_unreadable"] == sum(
    stopped[f"skipped_{r}"] for r in SKIP_REASONS
  )

  steps = int(stopped["step"]) + 3
  done = subprocess.run(command + [f"--config.train.steps={steps}"], env=cpu_env(), capture_output=True, text=True)
  assert done.returncode == 0, done.stderr[-3000:]
  summary = json.loads((tmp_path / "run" / "summary.json").read_text())
  assert summary["start_step"] == stopped["step"] and summary["end_step"] == steps
  assert summary["skipped_videos"] == {r: int(stopped[f"skipped_{r}"]) for r in SKIP_REASONS}  # carried, not reset
  assert summary["excluded_videos"] == dict.fromkeys(SKIP_REASONS, 0)  # the restart lists only the file left


def test_facts_cache_goes_to_the_user_cache_when_the_data_directory_is_read_only(tmp_path, monkeypatch):
  from vgpt_jax.data import file_facts

  (tmp_path / "videos").mkdir()
  assert file_facts.default_cache(str(tmp_path / "videos")) == str(tmp_path / "videos" / ".vgpt_file_facts.json")
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  monkeypatch.setattr(os, "access", lambda path, mode: False)  # as a read-only mount answers (root ignores modes)
  cache = file_facts.default_cache(str(tmp_path / "videos"))
  assert cache.startswith(str(tmp_path / "home" / ".cache" / "vgpt_jax" / "file_facts" / ""))
  (tmp_path / "videos" / "x.mp4").write_text("not a video")
  facts = file_facts.collect([str(tmp_path / "videos" / "x.mp4")], video_files.inspect_file, cache, "1")
  assert facts[0]["fault"] == "unreadable" and str(tmp_path / "videos" / "x.mp4") in Path(cache).read_text()
