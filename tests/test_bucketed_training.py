"""Aspect buckets end to end on real files (issue 17): each video at its nearest bucket, every batch one shape,
the same global batches for any host count, one compiled step per bucket and none after, exact resume, and
sampling at a video's own bucket.

The corpus: landscape 2:1, portrait 1:2 and square videos, and a 5:1 one the reference's aspect filter drops.
Buckets of the test config (tokenizer 4x down, patch 2: sides multiples of 8): 16x32 (clips of 8 frames, so
runs compile a step of another length too), 32x16 and 24x24 (data.num_frames = 5).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import small_config
from tests.test_video_files import encode, flat_video, take
from vgpt_jax import config as config_lib
from vgpt_jax.data.pipeline import HostSlice, make_source, train_dataset, train_index_dataset
from vgpt_jax.data.sources import SKIP_REASONS

BUCKETS = ((16, 32, 8), (32, 16), (24, 24))  # (height, width[, frames]): landscape, portrait, square
SHAPES = {0: (16, 32), 1: (32, 16), 2: (24, 24)}
FRAMES = {0: 8, 1: 5, 2: 5}  # the landscape bucket has its own clip length; the others data.num_frames
CORPUS = {  # file -> (video id, height, width): ids say which bucket a clip must come from
  **{f"land{i}.mp4": (i, 32, 64) for i in range(4)},  # 2:1 -> 16x32
  **{f"port{i}.mp4": (4 + i, 64, 32) for i in range(3)},  # 1:2 -> 32x16
  **{f"sq{i}.mp4": (7 + i, 48, 48) for i in range(2)},  # 1:1 -> 24x24
  "pano.mp4": (0, 24, 120),  # 5:1, over data.max_aspect = 4: dropped, counted
}
BUCKET_OF_ID = {**dict.fromkeys(range(4), 0), **dict.fromkeys(range(4, 7), 1), **dict.fromkeys(range(7, 9), 2)}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
  root = tmp_path_factory.mktemp("aspects")
  for name, (video_id, height, width) in CORPUS.items():
    encode(root / "train" / name, flat_video(video_id, height=height, width=width))
  encode(root / "eval" / "held_sq.mp4", flat_video(7, height=48, width=48))
  encode(root / "eval" / "held_land.mp4", flat_video(1, height=32, width=64))
  return root


def video_of(clip: np.ndarray) -> int:
  """The id of the video a [-1, 1] clip was cut from (its red level, flat_video's code; the codec keeps it to
  about 2 levels of 25)."""
  red = (clip[..., 0].mean(axis=(1, 2)) + 1.0) * 127.5
  ids = np.round((red - 40) / 25)
  assert (ids == ids[0]).all(), f"frames of different videos in one clip: {red}"
  return int(ids[0])


def bucket_config(corpus: Path, **overrides):
  """The test model on the corpus: base shape 24x24 (a bucket), clips of 5 frames, batches of 2."""
  fields = {
    "data.source": "video_files",
    "data.path": str(corpus / "train"),
    "data.eval_path": str(corpus / "eval"),
    "data.height": 24,
    "data.width": 24,
    "data.min_size": 16,
    "data.buckets": BUCKETS,
    "train.batch_size": 2,
    "train.num_samples": 1,
    "train.log_every": 1,
    "train.tensorboard": False,
    **overrides,
  }
  return small_config(**fields)


def test_videos_are_assigned_to_their_aspect_and_the_extreme_one_is_dropped(corpus):
  source = make_source(bucket_config(corpus).data, "train")
  assert source.excluded["bad_aspect"] == 1 and len(source) == 9
  for index in range(len(source)):
    video_id = CORPUS[Path(source.name(index)).name][0]
    assert source.bucket(index) == BUCKET_OF_ID[video_id]
  assert source.shapes() == ((8, 16, 32, 3), (5, 32, 16, 3), (5, 24, 24, 3))


def test_every_batch_is_one_bucket_in_its_shape_with_its_own_videos(corpus):
  cfg = bucket_config(corpus)
  batches = take(iter(train_dataset(cfg.data, 0, HostSlice(2))), 24)
  seen = set()
  for batch in batches:
    bucket = int(batch["bucket"][0])
    assert (batch["bucket"] == bucket).all()
    assert batch["video"].shape == (2, FRAMES[bucket], *SHAPES[bucket], 3)
    for clip in batch["video"]:
      assert BUCKET_OF_ID[video_of(clip)] == bucket
      assert (np.diff(clip[..., 1].mean(axis=(1, 2))) > 0).all()  # green rises: the frames come in order
    seen.add(bucket)
  assert seen == {0, 1, 2}
  # In proportion to the videos (4, 3, 2 of 9), and each bucket's videos in turn: a bucket's first epoch holds
  # each of its videos once.
  order = [int(b["bucket"][0]) for b in batches]
  landscape = [video_of(c) for b in batches if int(b["bucket"][0]) == 0 for c in b["video"]]
  assert sorted(landscape[:4]) == [0, 1, 2, 3] and order.count(0) >= order.count(2)


def test_buckets_with_their_own_frame_count_give_longer_clips_to_videos_that_have_them(corpus):
  """(16, 32, 8): landscape clips of 8 frames; every video has 40 frames, so none falls back to the 5-frame one.
  Too long for every landscape video (60 frames at stride 1 needs 60 > 40): the 5-frame bucket takes them."""
  cfg = bucket_config(corpus, **{"data.buckets": ((16, 32, 8), (16, 32), (32, 16), (24, 24))})
  source = make_source(cfg.data, "train")
  assert {source.bucket(i) for i in range(len(source)) if CORPUS[Path(source.name(i)).name][0] < 4} == {0}
  batches = take(iter(train_dataset(cfg.data, 0, HostSlice(2))), 12)
  assert {b["video"].shape for b in batches if int(b["bucket"][0]) == 0} == {(2, 8, 16, 32, 3)}
  long = bucket_config(corpus, **{"data.buckets": ((16, 32, 60), (16, 32), (32, 16), (24, 24))})
  source = make_source(long.data, "train")
  assert {source.bucket(i) for i in range(len(source)) if CORPUS[Path(source.name(i)).name][0] < 4} == {1}


def test_global_batches_are_the_same_for_one_or_two_hosts(corpus):
  cfg = bucket_config(corpus)
  one = take(iter(train_dataset(cfg.data, 3, HostSlice(4))), 8)
  halves = [take(iter(train_dataset(cfg.data, 3, HostSlice(2, k, 2))), 8) for k in range(2)]
  for whole, a, b in zip(one, *halves):
    for key in ("video", "skipped", "bucket"):
      np.testing.assert_array_equal(whole[key], np.concatenate([a[key], b[key]]))


def test_bucket_weights_and_bad_bucket_configs_are_refused_before_compiling(corpus):
  cfg = bucket_config(corpus, **{"data.bucket_weights": (0.0, 1.0, 0.0)})
  assert {int(b["bucket"][0]) for b in take(iter(train_dataset(cfg.data, 0, HostSlice(2))), 6)} == {1}
  bad = [  # (field, value, what the message must say)
    ("data.buckets", ((16, 30), (24, 24)), "sides must be multiples of 8"),
    ("data.buckets", ((16, 32, 1), (24, 24)), "bucket 16x32x1: data.num_frames=1 must be >= 2"),
    ("data.bucket_weights", (1.0, 2.0), "2 entries for 3 buckets"),
    ("data.height", 32, "32x24 (5 frames) is not one of data.buckets"),
  ]
  for field, value, message in bad:
    with pytest.raises(config_lib.ConfigError, match=re.escape(message)):
      config_lib.validate(bucket_config(corpus, **{field: value}))
  # Weight for a bucket no training video is in: refused before anything compiles, not when the batches start.
  empty = bucket_config(corpus, **{"data.buckets": BUCKETS + ((40, 8),), "data.bucket_weights": (1.0, 1.0, 1.0, 1.0)})
  with pytest.raises(config_lib.ConfigError, match=re.escape("gives weight to buckets [3], which hold no usable")):
    config_lib.preflight(empty)
  physics = small_config(**{"data.buckets": ((16, 16),)})
  with pytest.raises(config_lib.ConfigError, match="data.buckets needs data.source"):
    config_lib.validate(physics)


def test_index_stream_of_one_bucket_is_the_plain_shuffle():
  """Without buckets the stream is what it always was: one shuffled stream, position = the sample's number."""
  plain = train_index_dataset(10, 4, HostSlice(3))
  one = train_index_dataset(np.zeros(10, np.int64), 4, HostSlice(3), p=[1.0])
  assert [plain[i] for i in range(40)] == [one[i] for i in range(40)]
  assert [plain[i][0] for i in range(6)] == list(range(6))


STEPS = 8


def _train(config, workdir: Path) -> dict:
  from vgpt_jax.train import train

  return train(config, workdir)


def _losses(workdir: Path) -> dict[int, tuple[float, int]]:
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  return {r["step"]: (r["loss"], int(r["bucket"])) for r in map(json.loads, lines)}


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory) -> tuple[Path, dict]:
  workdir = tmp_path_factory.mktemp("buckets_run")
  summary = _train(bucket_config(corpus, **{"train.steps": STEPS, "checkpoint.every_steps": 3}), workdir)
  return workdir, summary


def test_one_compiled_step_per_bucket_and_no_compilation_in_the_loop(uninterrupted):
  workdir, summary = uninterrupted
  buckets = {b for _, b in _losses(workdir).values()}
  assert len(buckets) >= 2  # the run met several shapes ...
  assert summary["compiles_in_loop"] == 0  # ... and compiled nothing once training started
  assert sorted(summary["buckets"]) == [0, 1, 2]  # every bucket compiled before the first step, its memory known
  for b, report in summary["buckets"].items():
    assert report["shape"] == [2, FRAMES[b], *SHAPES[b], 3] and report["compile_seconds"] > 0
  assert summary["skipped_videos"] == dict.fromkeys(SKIP_REASONS, 0)
  assert np.isfinite(summary["first_frame_mse"])  # the end-of-run sample, at the base shape 24x24


def test_resume_mid_epoch_gives_the_uninterrupted_losses(corpus, uninterrupted, tmp_path):
  """The uninterrupted run as it stood after step 3 (its checkpoint of step 3, its log up to there), resumed."""
  import shutil

  reference = _losses(uninterrupted[0])
  shutil.copytree(uninterrupted[0], tmp_path, dirs_exist_ok=True)
  for checkpoint in (tmp_path / "checkpoints").iterdir():
    if checkpoint.name.isdigit() and int(checkpoint.name) > 3:
      shutil.rmtree(checkpoint)
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines(keepends=True)
  (tmp_path / "metrics.jsonl").write_text("".join(line for line in lines if json.loads(line)["step"] <= 3))
  resumed = _train(bucket_config(corpus, **{"train.steps": STEPS, "checkpoint.every_steps": 3}), tmp_path)
  assert resumed["start_step"] == 3
  # The portrait bucket's first epoch (3 videos, batches of 2) spans the stop: its batches are steps 1 and 7.
  assert [step for step, (_, bucket) in sorted(reference.items()) if bucket == 1][:2] == [1, 7]
  assert _losses(tmp_path) == reference  # same loss bits and the same bucket at every step


def test_videos_roll_out_and_are_scored_at_their_own_bucket(corpus, uninterrupted, tmp_path):
  from vgpt_jax.evaluate import evaluate
  from vgpt_jax.rollouts import RolloutRequest
  from vgpt_jax.sample import write_samples

  request = RolloutRequest(checkpoint=str(uninterrupted[0]), num_videos=2, context_frames=2, frames=3)
  report = write_samples(request, tmp_path, context=str(corpus / "train" / "port0.mp4"))
  assert report["videos"]["port0"]["truth_frames"] == 3
  from PIL import Image

  first = np.asarray(Image.open(tmp_path / "port0_frames" / "frame_000.png"))
  assert first.shape[0] == 2 * first.shape[1]  # portrait 32x16, scaled up for viewing
  held = write_samples(request, tmp_path / "held")  # the held-out videos: one square, one landscape
  assert len(held["videos"]) == 2
  report = evaluate(request, tmp_path / "eval", with_fvd=False)  # scored per size, means weighted
  assert report["videos"] == 2 and report["metrics"]["copy_last"]["mse"] > 0
  assert all(np.isfinite(v) for metrics in report["metrics"].values() for v in metrics.values())


def test_latents_are_stored_at_each_videos_bucket_and_batched_with_the_same_buckets(corpus, tmp_path):
  from vgpt_jax.encode import encode
  from vgpt_jax.run import bucket_runs, make_run

  videos = bucket_config(corpus)
  index = encode(videos, tmp_path / "latents", shard_size=4)
  assert index["settings"]["buckets"] == [[16, 32, 8], [32, 16, 0], [24, 24, 0]]
  cfg = bucket_config(corpus, **{"data.source": "latents", "data.latents_path": str(tmp_path / "latents")})
  source, by_file = make_source(cfg.data, "train"), make_source(videos.data, "train")
  assert list(source.bucket_of) == [by_file.bucket(i) for i in range(len(by_file))]
  for i in range(len(source)):  # pixel tokenizer: 4x down, 48 channels
    h, w = SHAPES[source.bucket(i)]
    assert source.record(i)["latents"].shape[1:] == (h // 4, w // 4, 48)
  config_lib.validate(cfg)
  runs = bucket_runs(make_run(cfg))  # the runs whose steps train.py compiles, one per bucket
  for batch in take(iter(train_dataset(cfg.data, 0, HostSlice(2))), 6):
    b = int(batch["bucket"][0])
    h, w = SHAPES[b]
    assert batch["latents"].shape == (2, FRAMES[b], h // 4, w // 4, 48) == runs[b].input_shape(2)
  mismatch = bucket_config(corpus, **{"data.source": "latents", "data.latents_path": str(tmp_path / "latents")})
  mismatch.data.buckets = ((24, 24),)
  with pytest.raises(config_lib.ConfigError, match="were encoded with buckets"):
    config_lib.validate(mismatch)


def test_the_readme_paper_buckets_pass_every_check_but_the_missing_vae(corpus):
  """README "Videos of any shape": the paper's 176x320 budget with portrait and square buckets is a sound config
  (each bucket's model, layout and sampling checks pass); only the VAE path the command names is missing here."""
  from configs import paper

  c = paper.get_config("stage=2")
  c.data.path = str(corpus / "train")
  c.data.buckets = ((176, 320), (320, 176), (240, 240))
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(c)
  assert str(e.value).count("\n  - ") == 1 and "tokenizer.vae_path" in str(e.value)


def test_two_processes_train_on_the_same_bucketed_batches_as_one(corpus, uninterrupted, tmp_path):
  """Two local processes (jax.distributed on 127.0.0.1), each reading its half of every global batch, give the
  one-process run's losses and buckets step for step."""
  from tests.conftest import train_processes

  overrides = [
    "--config.data.source=video_files",
    f"--config.data.path={corpus / 'train'}",
    f"--config.data.eval_path={corpus / 'eval'}",
    "--config.data.height=24",
    "--config.data.width=24",
    "--config.data.min_size=16",
    f"--config.data.buckets={BUCKETS}",
    "--config.train.batch_size=2",
    "--config.train.num_samples=1",
    "--config.train.log_every=1",
    "--config.train.tensorboard=false",
    f"--config.train.steps={STEPS}",
    "--config.checkpoint.every_steps=3",
    "--config.mesh.data=1",
    "--config.mesh.fsdp=2",
  ]
  done = train_processes(tmp_path, *overrides)
  assert all(status == 0 for status, _ in done), done[0][1][-3000:] + done[1][1][-3000:]
  one, two = _losses(uninterrupted[0]), _losses(tmp_path)
  assert sorted(two) == sorted(one) == list(range(1, STEPS + 1))
  for step, (loss, bucket) in one.items():
    assert two[step][1] == bucket and two[step][0] == pytest.approx(loss, rel=1e-5)
