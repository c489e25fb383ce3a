"""Clips from any prepared TFDS video dataset, read by random access, with no TensorFlow.

Why: TFDS can prepare many video datasets (ucf101, bair_robot_pushing_small,
moving_mnist, ... and the built-in physics world, `tfds_physics`), and a copy
prepared as ArrayRecord can be read by index, so Grain can shuffle, shard and
checkpoint positions over it as over the physics world. `TfdsVideoSource`
implements `sources.VideoSource`; it is the only thing the pipeline needs.

Config fields read (config.data):
  tfds_name: the dataset as TFDS names it, optionally "name/config:version"
    ("vgpt_physics", "ucf101/ucf101_1_256", "bair_robot_pushing_small", "moving_mnist").
  tfds_data_dir: the directory it was prepared in; "" or None = TFDS's default
    (TFDS_DATA_DIR, else ~/tensorflow_datasets).
  tfds_video_key: the feature that holds the video (default "video"; "image_main"
    for bair_robot_pushing_small, "image_sequence" for moving_mnist); "a/b" reaches
    into nested feature dicts.
  tfds_train_split: TFDS split read for the pipeline's "train" (default "train").
  tfds_eval_split: TFDS split read for the pipeline's "eval" (default "test", which
    vgpt_physics and most TFDS video datasets have). Any TFDS split spec works,
    e.g. "train[90%:]".
  height, width: size of a clip's frames. A frame of another size is fitted by
    `sources.fit_frames` (bicubic cover, then centre crop).
  num_frames: frames per clip.
  frame_stride, frame_stride_max: a clip's stride is drawn from
    [frame_stride, max(frame_stride, frame_stride_max)], capped at what the video's
    length allows; a video shorter than num_frames * frame_stride is skipped
    (BadVideo "too_short").

The source only reads: it never downloads or prepares (it loads the builder
from the prepared files, not the dataset's code), and says how to prepare a
dataset that is missing. Video features stored one encoded image per frame
(`tfds.features.Video`, `Sequence(Image)`) decode only the frames a clip takes;
tensor videos decode whole. Grey videos (T, H, W, 1) become RGB.

Without TensorFlow: tensorflow-datasets 4.9.10 reads ArrayRecord records and
decodes PNG/JPEG frames with numpy and PIL, but its `Video` feature asks
TensorFlow to normalise its dtype when features.json is loaded. When TensorFlow
is not installed, that one call is answered with numpy (see
`_allow_video_features_without_tensorflow`); with TensorFlow installed nothing is
changed. Importing this module imports neither TensorFlow nor TFDS.
"""

from __future__ import annotations

import importlib.util
import os
import types
from typing import Any

import numpy as np

from vgpt_jax.data.sources import BadVideo, VideoSource, Window, fit_frames, stride_range

BUILTIN_NAME = "vgpt_physics"  # tfds_physics.NAME, kept here so reading needs no builder import


class TfdsNotPreparedError(FileNotFoundError):
  """The TFDS dataset is not in data_dir; the message says how to prepare it."""


def _import_tfds() -> Any:
  """tensorflow_datasets, imported on first use so the physics-only path does not need it."""
  import tensorflow_datasets as tfds

  return tfds


class _NumpyDtypesTf:
  """Stands in for the `tf` module inside TFDS's video_feature: `tf.dtypes.as_dtype` -> numpy dtype."""

  def __init__(self, tf: Any):
    self._tf = tf
    self.dtypes = types.SimpleNamespace(as_dtype=np.dtype)

  def __getattr__(self, name: str) -> Any:
    return getattr(self._tf, name)  # anything else still needs (and imports) TensorFlow


def _allow_video_features_without_tensorflow() -> None:
  """Lets TFDS build `Video` features (so load a video dataset's features.json) with no TensorFlow.

  In tensorflow-datasets 4.9.10, `Video.__init__` converts its dtype with
  `tf.dtypes.as_dtype`, the only TensorFlow call on the read path; the frames
  themselves are `Image` features, which decode with PIL. A no-op when
  TensorFlow is installed or the patch is already in place.
  """
  if importlib.util.find_spec("tensorflow") is not None:
    return
  from tensorflow_datasets.core.features import video_feature

  if not isinstance(video_feature.tf, _NumpyDtypesTf):
    video_feature.tf = _NumpyDtypesTf(video_feature.tf)


def _keep_encoded_decoder() -> Any:
  """A TFDS decoder that hands the stored bytes through, so a clip decodes only its own frames.

  (tfds.decode.SkipDecoding has no numpy path for sequence features in 4.9.10.)
  """
  tfds = _import_tfds()

  class KeepEncoded(tfds.decode.Decoder):
    def decode_example(self, serialized_example: Any) -> Any:
      return serialized_example

    def decode_example_np(self, serialized_example: Any) -> Any:
      return serialized_example

    def decode_batch_example_np(self, serialized_example: Any) -> Any:
      return serialized_example

  return KeepEncoded()


def prepare_hint(name: str, data_dir: str | None) -> str:
  """The command that prepares `name` into `data_dir` (None: TFDS's default), for error messages."""
  if name.split("/")[0].split(":")[0] == BUILTIN_NAME:
    where = data_dir or "DIR (then set data.tfds_data_dir=DIR)"
    return f"python -m vgpt_jax.data.tfds_physics --data_dir={where}"
  where = f" --data_dir={data_dir}" if data_dir else ""
  return f"tfds build {name}{where} --file_format=array_record (TFDS's own builders need TensorFlow to prepare)"


class TfdsVideoSource(VideoSource):
  """VideoSource over a prepared TFDS dataset: video `index` of a split -> random uint8 clips.

  `split` is the pipeline's "train" or "eval" (mapped through
  data.tfds_train_split / data.tfds_eval_split); any other value is taken as a
  TFDS split spec as it is. Picklable: the TFDS reader is reopened after
  unpickling (Grain worker processes).
  """

  def __init__(self, data_cfg: Any, split: str):
    name = data_cfg.tfds_name
    if not name:
      raise ValueError("data.tfds_name is not set: name the prepared TFDS dataset (e.g. 'vgpt_physics').")
    self.name = str(name)
    self.data_dir = os.fspath(data_cfg.tfds_data_dir or "") or None
    self.video_key = str(data_cfg.tfds_video_key)
    splits = {
      "train": data_cfg.tfds_train_split,
      "eval": data_cfg.tfds_eval_split,
    }
    self.split = str(splits.get(split, split))
    self.num_frames = int(data_cfg.num_frames)
    self.height, self.width = int(data_cfg.height), int(data_cfg.width)
    self.clip_shape = (self.num_frames, self.height, self.width, 3)
    self.strides = stride_range(data_cfg)
    low = self.strides[0]
    if self.num_frames < 1 or low < 1 or self.height < 1 or self.width < 1:
      raise ValueError(
        f"data.num_frames ({self.num_frames}), data.frame_stride ({low}), data.height ({self.height}) and "
        f"data.width ({self.width}) must be >= 1."
      )
    self._source: Any = None
    self._frame_feature: Any = None  # the per-frame Image feature when frames are stored encoded one by one
    self._open()

  # ------------------------------------------------------------------ opening

  def _open(self) -> None:
    """Loads the builder from the prepared files and opens the split's ArrayRecord reader."""
    tfds = _import_tfds()
    from tensorflow_datasets.core import read_only_builder, registered

    _allow_video_features_without_tensorflow()
    try:
      builder = read_only_builder.builder_from_files(self.name, data_dir=self.data_dir)
    except registered.DatasetNotFoundError as e:
      raise TfdsNotPreparedError(
        f"TFDS dataset {self.name!r} is not prepared in {self._where()} (nothing is downloaded here). "
        f"Prepare it first: {prepare_hint(self.name, self.data_dir)}\nTFDS said: {e}"
      ) from None
    feature = builder.info.features
    path = self.video_key.split("/")
    for depth, part in enumerate(path):
      try:
        feature = feature[part]
      except (KeyError, TypeError):
        have = sorted(feature.keys()) if hasattr(feature, "keys") else []
        raise ValueError(
          f"{self.describe()}: no feature {'/'.join(path[: depth + 1])!r}; set data.tfds_video_key to one of {have}."
        ) from None
    shape, dtype = getattr(feature, "shape", None), getattr(feature, "np_dtype", None)
    if not isinstance(shape, tuple) or len(shape) not in (3, 4) or (len(shape) == 4 and shape[-1] not in (1, 3, None)):
      raise ValueError(f"{self.describe()}: feature {feature!r} is not a video [T, H, W] or [T, H, W, 1 or 3].")
    if dtype != np.uint8:
      raise ValueError(f"{self.describe()}: the video feature holds {dtype}, not uint8 frames.")
    per_frame = isinstance(feature, tfds.features.Sequence) and isinstance(feature.feature, tfds.features.Image)
    decoders = None
    if per_frame:
      decoders = _keep_encoded_decoder()
      for part in reversed(path):
        decoders = {part: decoders}
    try:
      self._source = builder.as_data_source(split=self.split, decoders=decoders)
    except NotImplementedError as e:
      raise ValueError(
        f"{self.describe()} was prepared as {builder.info.file_format}, which has no random access; prepare it "
        f"again with array_record: {prepare_hint(self.name, self.data_dir)}. TFDS said: {e}"
      ) from None
    except (KeyError, ValueError) as e:
      raise ValueError(
        f"{self.describe()}: cannot read split {self.split!r} (the dataset has {sorted(builder.info.splits)}): {e}"
      ) from None
    self._frame_feature = feature.feature if per_frame else None

  def _where(self) -> str:
    return (
      f"data_dir {self.data_dir}"
      if self.data_dir
      else "the default TFDS data_dir (TFDS_DATA_DIR or ~/tensorflow_datasets)"
    )

  def __getstate__(self) -> dict[str, Any]:
    state = dict(self.__dict__)
    state["_source"] = state["_frame_feature"] = None  # reopened on first use
    return state

  def _reader(self) -> Any:
    if self._source is None:
      self._open()
    return self._source

  # ------------------------------------------------------------------ VideoSource

  def __len__(self) -> int:
    return len(self._reader())

  def describe(self) -> str:
    return f"TFDS dataset {self.name!r}, split {self.split!r}, feature {self.video_key!r}, in {self._where()}"

  def read(self, index: int, window: Window) -> np.ndarray:
    """uint8 [count, height, width, 3]: the window's frames of video `index`, decoded if stored encoded, fitted."""
    video = self._video(index)
    start, stride, count = window(len(video))
    return self._frames(index, video, start + stride * np.arange(count))

  def _video(self, index: int) -> Any:
    """The stored frames of video `index` (an array, or a list of encoded frames); raises BadVideo."""
    reader = self._reader()
    index = int(index)
    if not 0 <= index < len(reader):
      raise IndexError(f"video index {index} out of range [0, {len(reader)}) in {self.describe()}")
    try:
      video = reader[index]
      for part in self.video_key.split("/"):
        video = video[part]
      if self._frame_feature is None:
        video = np.asarray(video)
        if video.ndim == 3:  # [T, H, W] grey
          video = video[..., None]
    except Exception as e:  # any failure to read or decode the record: skip this video
      raise BadVideo("unreadable", f"video {index} of {self.describe()}: {type(e).__name__}: {e}") from e
    return video

  def _frames(self, index: int, video: Any, picks: np.ndarray) -> np.ndarray:
    """uint8 [len(picks), height, width, 3]: the picked frames of `video`, decoded if stored encoded, fitted."""
    if self._frame_feature is None:
      frames = video[picks]
    else:
      try:
        frames = np.stack([np.asarray(self._frame_feature.decode_example_np(video[i])) for i in picks])
      except Exception as e:
        raise BadVideo("unreadable", f"video {index} of {self.describe()}: frame decode failed: {e}") from e
      if frames.ndim == 3:
        frames = frames[..., None]
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] not in (1, 3):
      raise BadVideo("unreadable", f"video {index} of {self.describe()}: frames {frames.dtype} {frames.shape}")
    return fit_frames(frames, self.height, self.width)

  def __repr__(self) -> str:
    return f"TfdsVideoSource({self.describe()})"
