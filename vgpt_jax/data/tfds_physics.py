"""The built-in synthetic physics world as a TFDS dataset, "vgpt_physics", written as ArrayRecord.

Why: a prepared TFDS copy of the physics world goes through the same reader
(`tfds_source.TfdsVideoSource`) as real TFDS video datasets (ucf101,
bair_robot_pushing_small, moving_mnist, ...), so that path is exercised end to
end with data made here. Its videos are bit-identical to the on-the-fly
renderer: record i of a split is `physics.render_video(video_seed(s, i, base_seed), world)`.

  python -m vgpt_jax.data.tfds_physics --data_dir=DIR [--num_train=512 --num_eval=64
      --height=32 --width=32 --frames=32 --seed=0 --overwrite]

On disk (the TFDS layout; `tfds.data_source("vgpt_physics", data_dir=DIR)` reads it):
  DIR/vgpt_physics/1.0.0/dataset_info.json, features.json, metadata.json,
  vgpt_physics-train.array_record-*, vgpt_physics-test.array_record-*

Splits: "train" holds physics.py's "train" videos and "test" holds its "eval"
videos (TFDS's usual held-out name, so data.tfds_eval_split="test" fits this and
most TFDS video datasets).

Features: `video`, uint8 [T, H, W, 3], a zlib-compressed tensor whose shape is
stored per record (so one reader handles any size, and TFDS needs neither
TensorFlow nor ffmpeg to encode it), and `index`, int64, the video's number in
its split. Records keep generation order (shuffling disabled). metadata.json
records the world, the counts and the base seed.

Preparing needs no TensorFlow: tensorflow-datasets 4.9.10 writes ArrayRecord
with numpy only. Nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds
from absl import app, flags

from vgpt_jax.data.physics import PhysicsWorld, render_video, video_seed

NAME = "vgpt_physics"
# TFDS split -> physics.py split whose seeds it holds.
PHYSICS_SPLITS: dict[str, str] = {"train": "train", "test": "eval"}
DEFAULT_NUM_TRAIN = 512
DEFAULT_NUM_EVAL = 64


# Run as a program (`python -m`), this file is `__main__`; that copy of the class stays unregistered and the program
# uses the importable module's, so TFDS's one-name-one-class registry holds and dataset_info.json names the real module.
class VgptPhysics(tfds.core.GeneratorBasedBuilder, skip_registration=__name__ == "__main__"):
  """TFDS builder of the physics world; sizes and world knobs are builder kwargs, not configs.

  The features do not depend on the kwargs (the video shape is stored per
  record), so `tfds.builder("vgpt_physics", data_dir=...)` reads a copy made
  with any sizes.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "physics.py world; zlib-compressed uint8 video tensors; splits train and test."}

  def __init__(
    self,
    *,
    world: PhysicsWorld | None = None,
    num_train: int = DEFAULT_NUM_TRAIN,
    num_eval: int = DEFAULT_NUM_EVAL,
    base_seed: int = 0,
    **kwargs: Any,
  ):
    if num_train < 1 or num_eval < 1:
      raise ValueError(f"num_train and num_eval must be >= 1, got {num_train=}, {num_eval=}.")
    if base_seed < 0:
      raise ValueError(f"base_seed must be >= 0, got {base_seed}.")
    self.world = world or PhysicsWorld()
    self.num_videos = {"train": int(num_train), "test": int(num_eval)}
    self.base_seed = int(base_seed)
    kwargs.setdefault("file_format", "array_record")  # random access with no TensorFlow
    super().__init__(**kwargs)

  def expected_metadata(self) -> dict[str, Any]:
    """What metadata.json says for these kwargs; compared before reusing a prepared copy."""
    return {
      "world": dataclasses.asdict(self.world),
      "num_videos": dict(self.num_videos),
      "base_seed": self.base_seed,
      "physics_splits": dict(PHYSICS_SPLITS),
    }

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=(
        "Synthetic physics world of vgpt_jax (balls under gravity, elastic collisions, occlusion), "
        "rendered by vgpt_jax.data.physics.render_video from per-(split, index) seeds."
      ),
      features=tfds.features.FeaturesDict(
        {
          "video": tfds.features.Tensor(
            shape=(None, None, None, 3),
            dtype=np.uint8,
            encoding=tfds.features.Encoding.ZLIB,
            doc="uint8 frames [T, H, W, 3].",
          ),
          "index": tfds.features.Scalar(dtype=np.int64, doc="Video number within its split."),
        }
      ),
      disable_shuffling=True,
      metadata=tfds.core.MetadataDict(self.expected_metadata()),
    )

  def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[tuple[int, dict[str, Any]]]]:
    del dl_manager  # nothing to download
    return {split: self._generate_examples(split) for split in PHYSICS_SPLITS}

  def _generate_examples(self, split: str) -> Iterator[tuple[int, dict[str, Any]]]:
    physics_split = PHYSICS_SPLITS[split]
    for index in range(self.num_videos[split]):
      seed = video_seed(physics_split, index, self.base_seed)
      yield index, {"video": render_video(seed, self.world), "index": index}


def prepare(
  data_dir: str | os.PathLike[str],
  *,
  world: PhysicsWorld | None = None,
  num_train: int = DEFAULT_NUM_TRAIN,
  num_eval: int = DEFAULT_NUM_EVAL,
  base_seed: int = 0,
  overwrite: bool = False,
) -> str:
  """Writes vgpt_physics into `data_dir` and returns its version directory.

  A copy already there with the same settings is kept (TFDS would otherwise
  keep any copy silently, whatever its sizes); one made with other settings is
  refused unless `overwrite`, which deletes and rewrites it.
  """
  kwargs = dict(world=world, num_train=num_train, num_eval=num_eval, base_seed=base_seed)
  builder = VgptPhysics(data_dir=os.fspath(data_dir), **kwargs)
  if builder.is_prepared():
    found = dict(builder.info.metadata or {})
    wanted = builder.expected_metadata()
    if found == wanted and not overwrite:
      return os.fspath(builder.data_dir)
    if not overwrite:
      diff = "\n  ".join(f"{k}: {v0!r} there, {v1!r} asked" for k, (v0, v1) in _differences(found, wanted).items())
      raise ValueError(
        f"{builder.data_dir} already holds {NAME} made with other settings:\n  {diff}\n"
        "Use another data_dir, or overwrite it (--overwrite / overwrite=True)."
      )
    shutil.rmtree(os.fspath(builder.data_dir))
    builder = VgptPhysics(data_dir=os.fspath(data_dir), **kwargs)
  builder.download_and_prepare()
  return os.fspath(builder.data_dir)


def _differences(found: Any, wanted: Any, prefix: str = "") -> dict[str, tuple[Any, Any]]:
  """{dotted key: (found, wanted)} where two nested dicts differ; names what blocks reuse."""
  if isinstance(found, dict) and isinstance(wanted, dict):
    out: dict[str, tuple[Any, Any]] = {}
    for key in sorted(set(found) | set(wanted)):
      out.update(_differences(found.get(key), wanted.get(key), f"{prefix}{key}."))
    return out
  return {} if found == wanted else {prefix.rstrip("."): (found, wanted)}


def main(argv: list[str]) -> None:
  del argv
  f = flags.FLAGS
  world = PhysicsWorld(height=f.height, width=f.width, num_frames=f.frames)
  path = prepare(
    f.data_dir,
    world=world,
    num_train=f.num_train,
    num_eval=f.num_eval,
    base_seed=f.seed,
    overwrite=f.overwrite,
  )
  print(
    f"{NAME} ready in {path}: {f.num_train} train / {f.num_eval} test videos, "
    f"{f.frames} frames of {f.height}x{f.width}. Read it with data.source='tfds', data.tfds_name='{NAME}', "
    f"data.tfds_data_dir='{f.data_dir}'."
  )


if __name__ == "__main__":
  # Defined only when run as a program, so importing this module defines no flags.
  flags.DEFINE_string("data_dir", None, "TFDS data directory to write into.")
  flags.DEFINE_integer("num_train", DEFAULT_NUM_TRAIN, "Videos in the train split.")
  flags.DEFINE_integer("num_eval", DEFAULT_NUM_EVAL, "Videos in the test split (physics.py's eval seeds).")
  flags.DEFINE_integer("height", PhysicsWorld.height, "Frame height in pixels.")
  flags.DEFINE_integer("width", PhysicsWorld.width, "Frame width in pixels.")
  flags.DEFINE_integer("frames", PhysicsWorld.num_frames, "Frames per video.")
  flags.DEFINE_integer("seed", 0, "Base seed of the world (physics.video_seed's base_seed = data.seed).")
  flags.DEFINE_bool("overwrite", False, "Replace a copy made with other settings.")
  flags.mark_flags_as_required(["data_dir"])
  from vgpt_jax.data import tfds_physics

  app.run(tfds_physics.main)
