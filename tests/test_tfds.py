"""TFDS: the physics world as a prepared TFDS dataset, and TfdsVideoSource over prepared datasets."""

import io
import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from tensorflow_datasets.core import registered

from vgpt_jax.data import tfds_physics
from vgpt_jax.data.held_out import held_out_clips
from vgpt_jax.data.physics import PhysicsWorld, render_video, video_seed
from vgpt_jax.data.pipeline import default_data_config
from vgpt_jax.data.sources import BadVideo, choose_window, fit_frames
from vgpt_jax.data.tfds_source import BUILTIN_NAME, TfdsNotPreparedError, TfdsVideoSource

REPO = Path(__file__).resolve().parents[1]
WORLD = PhysicsWorld(height=16, width=16, num_frames=12)
NUM_TRAIN, NUM_EVAL, BASE_SEED = 6, 3, 5
GREY_KEY = "image_sequence"  # moving_mnist's name for its video feature
GREY_SHAPE = (10, 14)  # not square, so resizing has an aspect to keep
GREY_LENGTHS = (9, 12, 6)  # video 2 is too short for some windows
GREY_BROKEN = 3  # this video's frames are not images


@pytest.fixture(scope="module")
def physics_dir(tmp_path_factory) -> str:
  data_dir = tmp_path_factory.mktemp("tfds_physics")
  tfds_physics.prepare(data_dir, world=WORLD, num_train=NUM_TRAIN, num_eval=NUM_EVAL, base_seed=BASE_SEED)
  return str(data_dir)


def _grey_frames(index: int) -> np.ndarray:
  return np.random.default_rng(index).integers(0, 256, (GREY_LENGTHS[index], *GREY_SHAPE, 1), dtype=np.uint8)


def _png(frame: np.ndarray) -> bytes:
  out = io.BytesIO()
  Image.fromarray(frame[:, :, 0]).save(out, format="png")
  return out.getvalue()


@pytest.fixture(scope="module")
def grey_video_dir(tmp_path_factory) -> str:
  """A moving_mnist-like dataset: grey videos stored as a TFDS `Video` feature (one PNG per frame).

  Written as Sequence(Image), the same records as Video, because writing a Video feature's features.json needs
  TensorFlow; features.json is then switched to Video, the form real TFDS video datasets have on disk.
  """
  data_dir = tmp_path_factory.mktemp("tfds_grey")

  with registered.skip_registration():

    class GreyVideos(tfds.core.GeneratorBasedBuilder):
      name = "grey_videos"
      VERSION = tfds.core.Version("1.0.0")

      def _info(self):
        frame = tfds.features.Image(shape=(*GREY_SHAPE, 1))
        features = tfds.features.FeaturesDict({GREY_KEY: tfds.features.Sequence(frame)})
        return tfds.core.DatasetInfo(builder=self, features=features, disable_shuffling=True)

      def _split_generators(self, dl_manager):
        return {"test": self._generate_examples()}

      def _generate_examples(self):
        for i in range(len(GREY_LENGTHS)):
          yield i, {GREY_KEY: [_png(f) for f in _grey_frames(i)]}
        yield GREY_BROKEN, {GREY_KEY: [b"not an image"] * 9}

  builder = GreyVideos(data_dir=str(data_dir), file_format="array_record")
  builder.download_and_prepare()
  features_json = Path(builder.data_dir) / "features.json"
  spec = json.loads(features_json.read_text())
  sequence = spec["featuresDict"]["features"][GREY_KEY]["sequence"]
  image = sequence["feature"]["image"]
  spec["featuresDict"]["features"][GREY_KEY] = {
    "pythonClassName": "tensorflow_datasets.core.features.video_feature.Video",
    "video": {
      "shape": {"dimensions": [sequence["length"], *image["shape"]["dimensions"]]},
      "dtype": image["dtype"],
      "encodingFormat": "png",
    },
  }
  features_json.write_text(json.dumps(spec))
  return str(data_dir)


def _cfg(data_dir: str, **overrides) -> ml_collections.ConfigDict:
  cfg = default_data_config()
  cfg.update(
    source="tfds",
    tfds_name="vgpt_physics",
    tfds_data_dir=data_dir,
    num_frames=4,
    height=16,
    width=16,
    frame_stride=1,
    frame_stride_max=3,
  )
  cfg.update(overrides)
  return cfg


def _with(cfg: ml_collections.ConfigDict, **overrides) -> ml_collections.ConfigDict:
  out = ml_collections.ConfigDict(cfg)
  out.update(overrides)
  return out


def test_prepared_videos_are_the_renderers(physics_dir):
  """Record i of train/test is render_video(video_seed(train/eval, i, base_seed)), bit for bit, in order."""
  assert BUILTIN_NAME == tfds_physics.NAME == "vgpt_physics"
  sources = tfds.data_source("vgpt_physics", data_dir=physics_dir, download=False)
  assert {name: len(source) for name, source in sources.items()} == {"train": NUM_TRAIN, "test": NUM_EVAL}
  for split, physics_split in tfds_physics.PHYSICS_SPLITS.items():
    for i in range(len(sources[split])):
      example = sources[split][i]
      assert example["index"] == i
      want = render_video(video_seed(physics_split, i, BASE_SEED), WORLD)
      assert example["video"].dtype == np.uint8 and example["video"].shape == want.shape
      np.testing.assert_array_equal(example["video"], want)


def test_prepare_reuses_refuses_or_overwrites(tmp_path):
  world = PhysicsWorld(height=8, width=8, num_frames=4)
  path = tfds_physics.prepare(tmp_path, world=world, num_train=2, num_eval=1)
  stamp = os.stat(Path(path) / "dataset_info.json").st_mtime_ns
  assert tfds_physics.prepare(tmp_path, world=world, num_train=2, num_eval=1) == path
  assert os.stat(Path(path) / "dataset_info.json").st_mtime_ns == stamp  # same settings: kept, not rewritten
  with pytest.raises(ValueError, match="num_videos.train: 2 there, 3 asked"):
    tfds_physics.prepare(tmp_path, world=world, num_train=3, num_eval=1)
  tfds_physics.prepare(tmp_path, world=world, num_train=3, num_eval=1, overwrite=True)
  assert len(tfds.data_source("vgpt_physics", split="train", data_dir=str(tmp_path), download=False)) == 3


def test_clip_takes_the_window_its_rng_chose(physics_dir):
  source = TfdsVideoSource(_cfg(physics_dir), "train")
  assert len(source) == NUM_TRAIN
  assert "vgpt_physics" in source.describe() and physics_dir in source.describe() and "'train'" in source.describe()
  strides = set()
  for seed in range(24):
    index = seed % NUM_TRAIN
    clip, start, stride = source.clip_with_window(index, np.random.default_rng(seed))
    assert (start, stride) == choose_window(WORLD.num_frames, 4, (1, 3), np.random.default_rng(seed))
    assert clip.shape == (4, 16, 16, 3) and clip.dtype == np.uint8
    video = render_video(video_seed("train", index, BASE_SEED), WORLD)
    np.testing.assert_array_equal(clip, video[start : start + 4 * stride : stride])
    np.testing.assert_array_equal(source.clip(index, np.random.default_rng(seed)), clip)
    strides.add(stride)
  assert strides == {1, 2, 3}


def test_clips_are_deterministic_and_survive_pickling(physics_dir):
  source = TfdsVideoSource(_cfg(physics_dir), "eval")
  assert source.split == "test" and len(source) == NUM_EVAL
  copy = pickle.loads(pickle.dumps(source))
  other = TfdsVideoSource(_cfg(physics_dir), "eval")
  for seed in range(6):
    clip = source.clip(1, np.random.default_rng(seed))
    np.testing.assert_array_equal(copy.clip(1, np.random.default_rng(seed)), clip)
    np.testing.assert_array_equal(other.clip(1, np.random.default_rng(seed)), clip)
  with pytest.raises(IndexError):
    source.clip(NUM_EVAL, np.random.default_rng(0))


def test_short_videos_cap_the_stride_or_are_skipped(physics_dir):
  # 12 frames: 5 frames fit at stride <= 2 only, so strides drawn from [1, 4] are capped.
  source = TfdsVideoSource(_cfg(physics_dir, num_frames=5, frame_stride_max=4), "train")
  assert {source.clip_with_window(0, np.random.default_rng(s))[2] for s in range(16)} == {1, 2}
  too_long = TfdsVideoSource(_cfg(physics_dir, num_frames=7, frame_stride=2, frame_stride_max=0), "train")
  with pytest.raises(BadVideo) as caught:
    too_long.clip(0, np.random.default_rng(0))
  assert caught.value.reason == "too_short"


def test_fit_frames_covers_then_centre_crops():
  frames = np.random.default_rng(0).integers(0, 256, (2, 10, 20, 3), dtype=np.uint8)
  np.testing.assert_array_equal(fit_frames(frames, 10, 20), frames)  # right size: untouched
  np.testing.assert_array_equal(fit_frames(frames, 10, 10), frames[:, :, 5:15])  # covers at scale 1: crop only
  up = fit_frames(frames, 30, 30)  # scale 3: 30 x 60, keep columns 15..45
  want = np.asarray(Image.fromarray(frames[1]).resize((60, 30), Image.Resampling.BICUBIC))[:, 15:45]
  assert up.shape == (2, 30, 30, 3)
  np.testing.assert_array_equal(up[1], want)
  grey = fit_frames(frames[..., :1], 5, 5)
  assert grey.shape == (2, 5, 5, 3) and (grey == grey[..., :1]).all()


def test_clips_are_resized_to_the_config(physics_dir):
  source = TfdsVideoSource(_cfg(physics_dir, height=8, width=12), "train")
  clip, start, stride = source.clip_with_window(2, np.random.default_rng(3))
  video = render_video(video_seed("train", 2, BASE_SEED), WORLD)
  assert clip.shape == (4, 8, 12, 3)
  np.testing.assert_array_equal(clip, fit_frames(video[start : start + 4 * stride : stride], 8, 12))


def test_grey_video_feature_decodes_only_its_frames(grey_video_dir):
  """A `tfds.features.Video` dataset (how ucf101/moving_mnist are stored) reads without TensorFlow; grey -> RGB."""
  cfg = _cfg(
    grey_video_dir, tfds_name="grey_videos", tfds_video_key=GREY_KEY, height=GREY_SHAPE[0], width=GREY_SHAPE[1]
  )
  source = TfdsVideoSource(cfg, "eval")
  assert len(source) == len(GREY_LENGTHS) + 1
  for seed in range(8):
    index = seed % 2
    clip, start, stride = source.clip_with_window(index, np.random.default_rng(seed))
    want = _grey_frames(index)[start : start + 4 * stride : stride]
    assert clip.shape == (4, *GREY_SHAPE, 3) and clip.dtype == np.uint8
    np.testing.assert_array_equal(clip, np.repeat(want, 3, axis=-1))
  small = TfdsVideoSource(_with(cfg, height=8, width=8), "eval")
  assert small.clip(1, np.random.default_rng(0)).shape == (4, 8, 8, 3)
  with pytest.raises(BadVideo) as caught:
    TfdsVideoSource(_with(cfg, num_frames=7), "eval").clip(2, np.random.default_rng(0))  # 6 frames
  assert caught.value.reason == "too_short"
  with pytest.raises(BadVideo) as caught:
    source.clip(GREY_BROKEN, np.random.default_rng(0))
  assert caught.value.reason == "unreadable"


def test_unprepared_dataset_says_how_to_prepare_and_downloads_nothing(tmp_path):
  with pytest.raises(TfdsNotPreparedError, match="python -m vgpt_jax.data.tfds_physics --data_dir=") as caught:
    TfdsVideoSource(_cfg(str(tmp_path)), "train")
  assert str(tmp_path) in str(caught.value)
  with pytest.raises(TfdsNotPreparedError, match="tfds build ucf101/ucf101_1_256"):
    TfdsVideoSource(_cfg(str(tmp_path), tfds_name="ucf101/ucf101_1_256"), "train")
  assert os.listdir(tmp_path) == []


def test_bad_key_or_split_is_named(physics_dir):
  with pytest.raises(ValueError, match=r"one of \['index', 'video'\]"):
    TfdsVideoSource(_cfg(physics_dir, tfds_video_key="frames"), "train")
  with pytest.raises(ValueError, match="not a video"):
    TfdsVideoSource(_cfg(physics_dir, tfds_video_key="index"), "train")
  with pytest.raises(ValueError, match="cannot read split 'validation'"):
    TfdsVideoSource(_cfg(physics_dir, tfds_eval_split="validation"), "eval")
  with pytest.raises(ValueError, match="tfds_name"):
    TfdsVideoSource(_cfg(physics_dir, tfds_name=""), "train")


def test_cli_prepares_and_reading_never_imports_tensorflow(tmp_path):
  """The CLI writes the dataset; a fresh process reads clips from it with no TensorFlow module loaded."""
  env = dict(os.environ, PYTHONPATH=str(REPO))
  cli = [sys.executable, "-m", "vgpt_jax.data.tfds_physics", f"--data_dir={tmp_path}"]
  cli += ["--num_train=3", "--num_eval=2", "--height=8", "--width=12", "--frames=6", "--seed=1"]
  subprocess.run(cli, cwd=REPO, env=env, check=True, capture_output=True, timeout=120)
  script = textwrap.dedent(f"""
    import sys
    import numpy as np
    from vgpt_jax.data.tfds_source import TfdsVideoSource
    assert "tensorflow_datasets" not in sys.modules  # imported on first use only
    from vgpt_jax.data.pipeline import default_data_config
    cfg = default_data_config()
    cfg.update(dict(tfds_name="vgpt_physics", tfds_data_dir={str(tmp_path)!r}, num_frames=3, height=8, width=12))
    source = TfdsVideoSource(cfg, "train")
    clip = source.clip(2, np.random.default_rng(0))
    print(len(source), len(TfdsVideoSource(cfg, "eval")), clip.shape, "tensorflow" in sys.modules)
  """)
  out = subprocess.run(
    [sys.executable, "-c", script], cwd=REPO, env=env, check=True, capture_output=True, text=True, timeout=120
  )
  assert out.stdout.strip().splitlines()[-1] == "3 2 (3, 8, 12, 3) False"


def test_tfds_source_through_the_training_pipeline(tmp_path):
  """data.source='tfds' on the prepared built-in dataset: batches and held-out videos come out of the pipeline."""
  from vgpt_jax.data.pipeline import HostSlice, default_data_config, train_dataset, validate_data_config

  world = PhysicsWorld(num_frames=12)  # 32x32, the pipeline's default frame size
  tfds_physics.prepare(tmp_path, world=world, num_train=8, num_eval=4)
  cfg = default_data_config()
  cfg.update(dict(source="tfds", tfds_name="vgpt_physics", tfds_data_dir=str(tmp_path), num_frames=4, frame_stride=2))
  validate_data_config(cfg)
  batch = next(iter(train_dataset(cfg, 0, HostSlice(3))))
  assert batch["video"].shape == (3, 4, 32, 32, 3) and batch["video"].dtype == np.float32
  assert not batch["skipped"].any()
  held_out = held_out_clips(cfg, 2)
  video = render_video(video_seed("eval", 0, 0), world).astype(np.float32) * np.float32(2 / 255) - 1
  assert held_out.shape == (2, 4, 32, 32, 3)
  np.testing.assert_allclose(held_out[0], video[0:8:2], atol=1e-6)  # held-out clips start at frame 0
  cfg.tfds_name = ""
  with pytest.raises(ValueError, match="data.tfds_name"):
    validate_data_config(cfg)
