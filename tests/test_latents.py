"""Pre-encoded latents: the encode CLI, resuming it, the latents source, and training on latents (fast, CPU)."""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter

from tests.conftest import cpu_env, small_config, train_command
from tests.test_video_files import encode as write_video
from tests.test_video_files import flat_video, identify
from vgpt_jax import config as config_lib
from vgpt_jax import encode, train_step
from vgpt_jax.data import latents, pipeline
from vgpt_jax.data.latents import LatentSource
from vgpt_jax.data.sources import SKIP_REASONS, BadVideo
from vgpt_jax.model.tokenizer import PixelTokenizer
from vgpt_jax.run import init_params, make_run

TRAIN, EVAL = 10, 3  # physics videos per split


def physics_config(**overrides):
  """The small test config over a 10 + 3 video physics world, strides 1..2."""
  base = {"data.num_train_videos": TRAIN, "data.num_eval_videos": EVAL, "data.frame_stride_max": 2}
  return small_config(**{**base, **overrides})


def latents_config(directory, **overrides):
  return physics_config(**{"data.source": "latents", "data.latents_path": str(directory), **overrides})


@pytest.fixture(scope="module")
def encoded(tmp_path_factory) -> Path:
  """The physics world encoded with the pixel tokenizer in float32 (exact), 4 videos per shard."""
  directory = tmp_path_factory.mktemp("latents")
  encode.encode(physics_config(), directory, shard_size=4, dtype="float32")
  return directory


def records(directory: Path, split: str) -> list[dict]:
  source = LatentSource(latents_config(directory).data, split)
  return [source.record(i) for i in range(len(source))]


def test_records_hold_the_tokenizer_latents_of_whole_videos(encoded):
  cfg = physics_config()
  pixels = {split: pipeline.make_source(cfg.data, split) for split in ("train", "eval")}
  index = latents.load_index(str(encoded))
  assert {s: index["splits"][s]["videos"] for s in ("train", "eval")} == {"train": TRAIN, "eval": EVAL}
  assert index["splits"]["train"]["shards"] == [f"train-0000{j}-of-00003" for j in range(3)]
  assert index["settings"]["tokenizer"] == {"kind": "pixel", "downsample": 4, "latent_shape": [4, 4, 48]}
  tokenizer = PixelTokenizer(4)
  for split in ("train", "eval"):
    for i, record in enumerate(records(encoded, split)):
      video = pixels[split][i]  # all 32 frames
      assert record["index"] == i and record["latents"].dtype == np.float32
      np.testing.assert_array_equal(record["latents"], tokenizer.encode(pipeline.to_float(video)))


def test_latent_clip_is_the_encoded_pixel_clip_for_the_same_draw(encoded):
  """Same rng -> same stride and start as the pixel source, so stage 3-4 stride ranges carry over exactly."""
  cfg = physics_config()
  pixels, lat = pipeline.make_source(cfg.data, "train"), LatentSource(latents_config(encoded).data, "train")
  tokenizer, strides = PixelTokenizer(4), set()
  for i in range(TRAIN):
    for draw in range(3):
      want = tokenizer.encode(pipeline.to_float(pixels.clip(i, np.random.default_rng([i, draw]))))
      got = lat.clip(i, np.random.default_rng([i, draw]))
      assert got.shape == (5, 4, 4, 48) and got.dtype == np.float32
      np.testing.assert_array_equal(got, want)
      strides.add(int(np.random.default_rng([i, draw]).integers(1, 3)))
  assert strides == {1, 2}

  def held_out_clip(source):
    return source.leading_frames(0, source.strides[0], source.num_frames)

  np.testing.assert_array_equal(held_out_clip(lat), tokenizer.encode(pipeline.to_float(held_out_clip(pixels))))


def test_training_on_latents_equals_training_on_frames(encoded):
  """The loss (and so the step) on stored latents equals the loss on the frames they encode."""
  pixel_setup = make_run(physics_config())
  latent_setup = make_run(latents_config(encoded))
  assert (pixel_setup.inputs, latent_setup.inputs) == ("video", "latents")
  assert latent_setup.input_shape(2) == (2, 5, 4, 4, 48)
  video = next(iter(pipeline.train_dataset(physics_config().data, 3, pipeline.HostSlice(2))))["video"]
  stored = next(iter(pipeline.train_dataset(latents_config(encoded).data, 3, pipeline.HostSlice(2))))["latents"]
  np.testing.assert_array_equal(stored, PixelTokenizer(4).encode(video))  # same global positions, same draws
  params = init_params(pixel_setup, jax.random.key(0))
  keys = jax.random.split(jax.random.key(1), 2)
  loss = functools.partial(train_step.loss_fn, params, keys=keys)
  np.testing.assert_allclose(loss(run=latent_setup, inputs=jnp.asarray(stored)), loss(run=pixel_setup, inputs=video))


def test_latent_pipeline_shards_orders_and_resumes(encoded):
  data = latents_config(encoded).data
  single = iter(pipeline.train_dataset(data, 7, pipeline.HostSlice(4)))
  hosts = [iter(pipeline.train_dataset(data, 7, pipeline.HostSlice(2, k, 2))) for k in range(2)]
  for _ in range(3):
    want = next(single)["latents"]
    np.testing.assert_array_equal(np.concatenate([next(h)["latents"] for h in hosts]), want)
  again = [next(iter(pipeline.train_dataset(data, 7, pipeline.HostSlice(4))))["latents"] for _ in range(2)]
  np.testing.assert_array_equal(again[0], again[1])
  other = next(iter(pipeline.train_dataset(data, 8, pipeline.HostSlice(4))))["latents"]
  assert not np.array_equal(other, again[0])
  it = iter(pipeline.train_dataset(data, 7, pipeline.HostSlice(4)))
  next(it)
  state = it.get_state()
  expected = [next(it)["latents"] for _ in range(3)]
  resumed = iter(pipeline.train_dataset(data, 7, pipeline.HostSlice(4)))
  resumed.set_state(state)
  for want in expected:
    np.testing.assert_array_equal(next(resumed)["latents"], want)


def test_interrupted_encoding_resumes_without_redoing_shards(tmp_path, encoded):
  out = tmp_path / "latents"
  assert encode.encode(physics_config(), out, shard_size=4, dtype="float32", stop_after_shards=2) is None
  assert not (out / latents.INDEX_FILE).exists()
  with pytest.raises(config_lib.ConfigError, match="unfinished encoding"):
    config_lib.validate(latents_config(out))
  finished = {p.name: p.stat().st_mtime_ns for p in out.glob("train-*")}
  assert len(finished) == 4  # 2 shards: records + their .json
  (out / "train-00002-of-00003.array_record.tmp").write_bytes(b"left by a killed run")
  with pytest.raises(ValueError, match="other settings .*dtype"):
    encode.encode(physics_config(), out, shard_size=4, dtype="float16")
  index = encode.encode(physics_config(), out, shard_size=4, dtype="float32")
  assert index["splits"] == latents.load_index(str(encoded))["splits"]
  assert {name: (out / name).stat().st_mtime_ns for name in finished} == finished  # not rewritten
  for split in ("train", "eval"):
    for got, want in zip(records(out, split), records(encoded, split), strict=True):
      np.testing.assert_array_equal(got["latents"], want["latents"])


def test_parallel_workers_split_the_shards(tmp_path, encoded):
  out = tmp_path / "latents"
  assert encode.encode(physics_config(), out, shard_size=4, dtype="float32", worker_index=1, num_workers=2) is None
  assert sorted(p.name for p in out.glob("*.json") if p.name.startswith("train")) == ["train-00001-of-00003.json"]
  index = encode.encode(physics_config(), out, shard_size=4, dtype="float32", worker_index=0, num_workers=2)
  assert index["splits"] == latents.load_index(str(encoded))["splits"]


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory) -> Path:
  """3 good mp4s (ids 0..2) and one of several kinds of bad file."""
  root = tmp_path_factory.mktemp("videos")
  for i in range(3):
    write_video(root / f"good{i}.mp4", flat_video(i))
  (root / "zero.mp4").write_bytes(b"")
  (root / "text.mp4").write_text("not a video\n" * 40)
  write_video(root / "short.mp4", flat_video(5, frames=6))
  write_video(root / "small.mp4", flat_video(6, height=24, width=32))
  write_video(root / "zz_held.mp4", flat_video(4))  # sorted last: the eval split
  return root


def video_config(directory, **overrides):
  base = {
    "data.source": "video_files",
    "data.path": str(directory),
    "data.num_eval_videos": 1,
    "data.min_size": 40,
    "data.frame_stride": 2,
  }
  return small_config(**{**base, **overrides})


def test_encoding_video_files_skips_and_counts_bad_files(tmp_path, video_dir):
  out = tmp_path / "latents"
  index = encode.encode(video_config(video_dir), out, shard_size=3, max_frames=12, dtype="float16")
  train = index["splits"]["train"]
  assert train["videos"] == 3 and train["frames"] == 3 * 12
  assert train["skipped"] == {**dict.fromkeys(SKIP_REASONS, 0), "unreadable": 2, "too_short": 1, "too_small": 1}
  stored = records(out, "train")
  assert [Path(r["name"]).name for r in stored] == ["good0.mp4", "good1.mp4", "good2.mp4"]
  tokenizer = PixelTokenizer(4)
  for video_id, record in enumerate(stored):
    assert record["latents"].dtype == np.float16 and record["latents"].shape == (12, 4, 4, 48)
    video, frames = identify(tokenizer.decode(record["latents"].astype(np.float32)))
    assert video == video_id and list(frames) == list(range(0, 24, 2))  # frames 0, s, 2s, ... at s = 2
  (held,) = records(out, "eval")
  assert Path(held["name"]).name == "zz_held.mp4" and len(held["latents"]) == 12
  cfg = video_config(video_dir, **{"data.source": "latents", "data.latents_path": str(out), "data.frame_stride": 3})
  with pytest.raises(config_lib.ConfigError, match="multiples of the encoding stride 2"):
    config_lib.validate(cfg)


def test_damaged_record_is_skipped_and_counted(tmp_path, encoded):
  out = tmp_path / "latents"
  shutil.copytree(encoded, out)
  shard = out / "train-00000-of-00003.array_record"
  reader = grain.sources.ArrayRecordDataSource([str(shard)])
  kept = [reader[i] for i in range(len(reader))]
  shard.unlink()
  writer = ArrayRecordWriter(str(shard), latents.WRITER_OPTIONS)
  for i, record in enumerate(kept):
    writer.write(b"\x00 not msgpack" if i == 3 else record)
  writer.close()
  source = LatentSource(latents_config(out).data, "train")
  with pytest.raises(BadVideo, match="unreadable: record 3"):
    source.clip(3, np.random.default_rng(0))
  element = pipeline._ClipOrSkip(source, 0, 4, pipeline.video_buckets(source))((0, 3, 0))  # noqa: SLF001
  assert element["skipped"][SKIP_REASONS.index("unreadable")] == 1 and element["latents"].shape == (5, 4, 4, 48)


def test_bad_latent_configs_are_refused_with_the_fix(tmp_path, encoded):
  with pytest.raises(config_lib.ConfigError, match="holds no encoded latents: make it with python -m vgpt_jax.encode"):
    config_lib.validate(latents_config(tmp_path / "missing"))
  with pytest.raises(config_lib.ConfigError, match=r"data.height=32 .* set data.height=16"):
    config_lib.validate(latents_config(encoded, **{"data.height": 32}))
  with pytest.raises(config_lib.ConfigError, match="tokenizer.downsample=2 .* made with 4"):
    config_lib.validate(latents_config(encoded, **{"tokenizer.downsample": 2}))
  with pytest.raises(ValueError, match="not at latents"):
    encode.encode(latents_config(encoded), tmp_path / "again")


def test_encode_cli_then_train_on_latents(tmp_path):
  out, workdir = tmp_path / "latents", tmp_path / "run"
  size = ["--config.data.num_train_videos=6", "--config.data.num_eval_videos=2"]
  cli = [sys.executable, "-m", "vgpt_jax.encode", "--config=tests/small_config.py", f"--output={out}", *size]
  proc = subprocess.run(cli + ["--shard_size=4"], env=cpu_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "train: 6 videos" in proc.stdout and "encode train" in proc.stderr  # the summary and the progress bar
  args = ["--config.data.source=latents", f"--config.data.latents_path={out}", "--config.train.steps=3", *size]
  proc = subprocess.run(train_command(workdir, *args), env=cpu_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["end_step"] == 3 and np.isfinite(summary["loss_last"]) and (workdir / "sample.gif").exists()
