"""Physics-IQ scoring (SPEC section 9): motion masks, per-video metrics, physical variance, final score.

Per video (generated vs take 1 of the real video, and take 1 vs take 2 for the
physical variance), on frames resized to a common size with pixels in [0, 1]:
  * spatiotemporal IoU: mean over frames of the per-frame IoU of the motion masks
    (a frame where both masks are empty counts 1);
  * spatial IoU: IoU of the masks OR-ed over time (empty union counts 1);
  * weighted spatial IoU: sum(min) / sum(max) of the time-averaged masks over the
    pixels where either is non-zero (none such counts 1);
  * MSE: per frame the mean of (a - b)^2 over H, W and the 3 channels; the row
    value is the mean of those per-frame values.

Score (the benchmark's original score, not its per-scenario clipped "stable"
variant), from dataset means of each metric and of its physical variance (the
ratios are formed from those means, not per scenario; `original_score` averages
and rounds exactly as the official scorer does, `aggregate` plainly per scenario
then over scenarios):

  score = 100 * clip(mean(ST/ST_var, S/S_var, WS/WS_var) - (MSE - MSE_var), 0, 1)

A mean variance of 0 leaves its ratio undefined: the score is then NaN.

Two ways in:
  * `evaluate_directory` (and the CLI) scores files as the official Original workflow does, step for step
    (`original_view`, `original_score`): OpenCV decoding, the first 5 s at the generated videos' frame rate,
    take 1's size // 4, motion masks written as mp4v videos and read back (the official's lossy round trip,
    which moves IoUs by up to about 0.05 on small videos; `exact_masks=True` keeps them in memory instead),
    the dataset's shipped real masks where given, real videos resampled to the generated frame rate with the
    official blend, per-frame values rounded to 4 decimals and the score to 2, as its scorer parses them.
    tests/test_physics_iq.py checks the per-video metrics (within 1e-6) and the score (within 0.01) against
    numbers the official code computed on the tests' fixture. Not reproduced: the official re-encodes
    resampled real videos with H.264 (pip's OpenCV has no H.264 encoder), so with differing frame rates the
    real frames here are the resampled ones before that lossy step.
  * `score_arrays` scores in-memory videos (the evaluate CLI's rollouts): the same mask detector and metrics
    on exact masks, averaged per scenario then over scenarios (`aggregate`), without file round trips or
    rounding.
`variant="verified"` scores the same per-view metrics as the official Physics-IQ Verified does (physiq/:
IQTable's view-level score, `verified_score`); point it at the Verified dataset (its revised real masks).

Directory layout (the benchmark's `split-videos/testing/<fps>FPS` folder):
  real:      <id>_testing-videos_<fps>FPS_<view>_take-<1|2>_<scenario>.mp4
  generated: <id>_<anything>.mp4, <id> the id of the take-1 video it continues
             (the benchmark renames its submissions to <id>_<view>_<scenario>.mp4)

  python -m vgpt_jax.metrics.physics_iq --real=DIR --generated=DIR --output=CSV
"""

from __future__ import annotations

import csv
import logging
import math
import os
import re
from typing import Any, Iterable, Mapping, Sequence

import av
import cv2
import numpy as np

MASK_THRESHOLD = 10  # grey levels above the running average that count as motion
RUNNING_AVERAGE_ALPHA = 0.3  # weight of the new frame in cv2.accumulateWeighted
_BLUR_SIZE = (5, 5)
_MORPH_KERNEL = np.ones((5, 5), np.uint8)

METRICS: tuple[str, ...] = ("spatiotemporal_iou", "spatial_iou", "weighted_spatial_iou", "mse")
VARIANCES: tuple[str, ...] = tuple(f"variance_{m}" for m in METRICS)
_IOU_METRICS = METRICS[:3]
_INFO_COLUMNS: tuple[str, ...] = ("scenario", "view", "take1", "take2", "generated", "num_frames")

SECONDS_SCORED = 5  # the official scores the first 5 s, at the generated videos' frame rate
_REAL_NAME = re.compile(
  r"^(?P<id>[^_]+)_(?P<kind>[^_]+)_(?P<fps>[^_]+)_(?P<view>[^_]+)_take-(?P<take>\d+)_(?P<scenario>.+)\.mp4$", re.I
)


# --------------------------------------------------------------------------- inputs


def _check_video(video: Any, name: str) -> np.ndarray:
  """The array of a [T, H, W, 3] video (T >= 1), or a ValueError naming `name`."""
  video = np.asarray(video)
  if video.ndim != 4 or video.shape[-1] != 3 or video.shape[0] < 1:
    raise ValueError(f"{name}: expected one RGB video [T, H, W, 3] with T >= 1, got shape {video.shape}")
  if video.dtype != np.uint8 and not np.issubdtype(video.dtype, np.floating):
    raise ValueError(f"{name}: expected uint8 in [0, 255] or float in [0, 1], got dtype {video.dtype}")
  if np.issubdtype(video.dtype, np.floating) and video.size:
    low, high = float(np.min(video)), float(np.max(video))
    if not (low >= -0.5 and high <= 1.5):
      raise ValueError(
        f"{name}: float pixels must be in [0, 1] (got min {low:.3g}, max {high:.3g}); "
        "pass uint8 frames or rescale (x / 255 for [0, 255], (x + 1) / 2 for [-1, 1])"
      )
  return video


def _to_uint8(video: np.ndarray) -> np.ndarray:
  """uint8 [T, H, W, 3]: float [0, 1] is clipped, scaled by 255 and rounded, as writing a video file would."""
  if video.dtype == np.uint8:
    return np.ascontiguousarray(video)
  return np.round(np.clip(video, 0.0, 1.0) * 255.0).astype(np.uint8)


def _to_unit(video: np.ndarray) -> np.ndarray:
  """float32 [T, H, W, 3] in [0, 1] (uint8 / 255, float clipped)."""
  if video.dtype == np.uint8:
    return video.astype(np.float32) / np.float32(255.0)
  return np.clip(video, 0.0, 1.0).astype(np.float32)


# --------------------------------------------------------------------------- masks


def motion_masks(video: Any) -> np.ndarray:
  """Motion masks bool [T, H, W] of an RGB video [T, H, W, 3] (uint8 [0, 255], or float [0, 1] -> round(255 x)).

  The benchmark's detector: grey, 5x5 Gaussian blur, running average
  (accumulateWeighted, alpha 0.3), |grey - average| > 10, morphological open then
  close with a 5x5 kernel. The first frame only seeds the average: its mask is empty.
  """
  frames = _to_uint8(_check_video(video, "motion_masks video"))
  masks = np.zeros(frames.shape[:3], dtype=bool)
  average = None
  for t, frame in enumerate(frames):
    grey = cv2.GaussianBlur(cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY), _BLUR_SIZE, 0)
    if average is None:
      average = grey.astype(np.float64)
      continue
    cv2.accumulateWeighted(grey, average, RUNNING_AVERAGE_ALPHA)
    difference = cv2.absdiff(grey, cv2.convertScaleAbs(average))
    _, binary = cv2.threshold(difference, MASK_THRESHOLD, 255, cv2.THRESH_BINARY)
    binary = cv2.morphologyEx(binary, cv2.MORPH_OPEN, _MORPH_KERNEL)
    binary = cv2.morphologyEx(binary, cv2.MORPH_CLOSE, _MORPH_KERNEL)
    masks[t] = binary > 0
  return masks


def resize_masks(masks: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """bool [T, H, W] -> bool [T, h, w] for size (h, w): 0/255 bilinearly resized, kept where > 127 (as the benchmark)."""
  height, width = size
  if masks.shape[1:] == (height, width):
    return masks.astype(bool)
  scaled = masks.astype(np.uint8) * np.uint8(255)
  return np.stack([cv2.resize(m, (width, height), interpolation=cv2.INTER_LINEAR) > 127 for m in scaled])


def resize_frames(video: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """[T, H, W, 3] (uint8 or float [0, 1]) -> float32 [T, h, w, 3] in [0, 1]; bilinear, uint8 resized before / 255."""
  height, width = size
  if video.shape[1:3] != (height, width):
    source = video if video.dtype == np.uint8 else np.clip(video, 0.0, 1.0).astype(np.float32)
    video = np.stack(
      [cv2.resize(np.ascontiguousarray(f), (width, height), interpolation=cv2.INTER_LINEAR) for f in source]
    )
  return _to_unit(video)


# --------------------------------------------------------------------------- per-video metrics


def _check_pair(a: np.ndarray, b: np.ndarray, what: str) -> None:
  if a.shape != b.shape:
    raise ValueError(f"{what}: shapes differ, {a.shape} vs {b.shape}; resize and trim both to the same [T, H, W]")


def iou_per_frame(masks_a: np.ndarray, masks_b: np.ndarray) -> np.ndarray:
  """float64 [T]: IoU of bool masks [T, H, W] (or [T, H, W, C], counted over channels too, as the official does
  with its 3-channel mask videos) frame by frame; a frame where both are empty counts 1."""
  masks_a, masks_b = np.asarray(masks_a, bool), np.asarray(masks_b, bool)
  _check_pair(masks_a, masks_b, "iou_per_frame")
  intersection = np.logical_and(masks_a, masks_b).reshape(len(masks_a), -1).sum(axis=1)
  union = np.logical_or(masks_a, masks_b).reshape(len(masks_a), -1).sum(axis=1)
  return np.where(union == 0, 1.0, intersection / np.maximum(union, 1))


def spatiotemporal_iou(masks_a: np.ndarray, masks_b: np.ndarray) -> float:
  """Mean over frames of the per-frame mask IoU of bool [T, H, W] masks (empty union counts 1)."""
  return float(np.mean(iou_per_frame(masks_a, masks_b)))


def spatial_iou(masks_a: np.ndarray, masks_b: np.ndarray) -> float:
  """IoU of bool [T, H, W] masks OR-ed over time: where motion happened, ignoring when (empty union counts 1)."""
  masks_a, masks_b = np.asarray(masks_a, bool), np.asarray(masks_b, bool)
  _check_pair(masks_a, masks_b, "spatial_iou")
  return float(iou_per_frame(masks_a.any(axis=0)[None], masks_b.any(axis=0)[None])[0])


def weighted_spatial_iou(masks_a: np.ndarray, masks_b: np.ndarray) -> float:
  """sum(min) / sum(max) of the time-averaged bool [T, H, W] masks: where and how long; no motion at all counts 1."""
  masks_a, masks_b = np.asarray(masks_a, bool), np.asarray(masks_b, bool)
  _check_pair(masks_a, masks_b, "weighted_spatial_iou")
  average_a, average_b = masks_a.mean(axis=0), masks_b.mean(axis=0)
  # Pixels where both are zero add 0 to both sums, so summing over all pixels equals summing where either is non-zero.
  union = np.maximum(average_a, average_b).sum()
  if union == 0:
    return 1.0
  return float(np.minimum(average_a, average_b).sum() / union)


def mse_per_frame(frames_a: np.ndarray, frames_b: np.ndarray) -> np.ndarray:
  """float64 [T]: per frame, mean over H, W, C of the squared difference of [T, H, W, C] frames in [0, 1]."""
  frames_a, frames_b = np.asarray(frames_a), np.asarray(frames_b)
  _check_pair(frames_a, frames_b, "mse_per_frame")
  difference = frames_a.astype(np.float64) - frames_b.astype(np.float64)
  return np.mean(np.square(difference).reshape(difference.shape[0], -1), axis=1)


def mask_and_frame_metrics(
  masks_a: np.ndarray, masks_b: np.ndarray, frames_a: np.ndarray, frames_b: np.ndarray
) -> dict[str, float]:
  """The four metrics {spatiotemporal_iou, spatial_iou, weighted_spatial_iou, mse} of one pair of same-size videos.

  masks bool [T, H, W]; frames [T, H, W, 3] in [0, 1]; MSE is the mean of the per-frame MSEs.
  """
  return {
    "spatiotemporal_iou": spatiotemporal_iou(masks_a, masks_b),
    "spatial_iou": spatial_iou(masks_a, masks_b),
    "weighted_spatial_iou": weighted_spatial_iou(masks_a, masks_b),
    "mse": float(np.mean(mse_per_frame(frames_a, frames_b))),
  }


def compare_videos(
  generated: Any, take1: Any, take2: Any | None = None, *, size: tuple[int, int] | None = None
) -> dict[str, float]:
  """Metrics of generated vs take 1, plus `variance_*` metrics of take 1 vs take 2 when take 2 is given.

  Videos [T, H, W, 3] (uint8, or float in [0, 1]) with the same T; their H, W may
  differ when `size` (h, w) is given: masks are computed at each video's own
  resolution, then masks and frames are resized to `size`. Without `size` all
  must already share H, W.
  """
  named = {"generated": generated, "take1": take1}
  if take2 is not None:
    named["take2"] = take2
  videos = {name: _check_video(v, name) for name, v in named.items()}
  lengths = {name: v.shape[0] for name, v in videos.items()}
  if len(set(lengths.values())) != 1:
    raise ValueError(f"frame counts differ: {lengths}; trim the videos to the same number of frames")
  if size is None:
    sizes = {name: v.shape[1:3] for name, v in videos.items()}
    if len(set(sizes.values())) != 1:
      raise ValueError(f"frame sizes differ: {sizes}; pass size=(height, width) to resize them to a common size")
    size = videos["take1"].shape[1:3]
  size = (int(size[0]), int(size[1]))
  if min(size) < 1:
    raise ValueError(f"size {size} is empty; the common size needs height and width >= 1")
  masks = {name: resize_masks(motion_masks(v), size) for name, v in videos.items()}
  frames = {name: resize_frames(v, size) for name, v in videos.items()}
  row = mask_and_frame_metrics(masks["take1"], masks["generated"], frames["take1"], frames["generated"])
  if take2 is not None:
    variance = mask_and_frame_metrics(masks["take1"], masks["take2"], frames["take1"], frames["take2"])
    row.update({f"variance_{k}": v for k, v in variance.items()})
  return row


# --------------------------------------------------------------------------- score


def physics_iq_score(means: Mapping[str, float]) -> float:
  """100 * clip(mean(ST/ST_var, S/S_var, WS/WS_var) - (MSE - MSE_var), 0, 1) from dataset means.

  `means` holds METRICS and VARIANCES (e.g. `spatiotemporal_iou`,
  `variance_spatiotemporal_iou`). NaN when a variance IoU mean is 0.
  """
  missing = [k for k in METRICS + VARIANCES if k not in means]
  if missing:
    raise ValueError(f"physics_iq_score needs the means of {missing}; the variance ones need take-2 videos")
  raw = _raw_score(means)
  return float("nan") if math.isnan(raw) else 100.0 * float(np.clip(raw, 0.0, 1.0))


def _ratio(metric: float, variance: float) -> float:
  return float("nan") if variance == 0 else metric / variance


def _raw_score(means: Mapping[str, float]) -> float:
  ratios = [_ratio(means[m], means[f"variance_{m}"]) for m in _IOU_METRICS]
  return float(np.mean(ratios)) - (means["mse"] - means["variance_mse"])


def aggregate(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """Score dict from per-video rows (keys `scenario` and METRICS, VARIANCES when every row has them).

  Each metric is averaged over the rows (views) of a scenario, then over
  scenarios, as the benchmark does; the score uses those means. Without variance
  columns `physics_iq_score` is None and only the raw means are given.
  """
  if not rows:
    raise ValueError("no videos to score: the rows are empty")
  by_scenario: dict[str, list[Mapping[str, Any]]] = {}
  for row in rows:
    by_scenario.setdefault(str(row["scenario"]), []).append(row)
  has_variance = all(all(k in row for k in VARIANCES) for row in rows)
  keys = METRICS + (VARIANCES if has_variance else ())
  out: dict[str, Any] = {"num_scenarios": len(by_scenario), "num_videos": len(rows)}
  for key in keys:
    out[key] = float(np.mean([np.mean([float(r[key]) for r in group]) for group in by_scenario.values()]))
  if has_variance:
    for m in _IOU_METRICS:
      out[f"ratio_{m}"] = _ratio(out[m], out[f"variance_{m}"])
    out["mse_minus_variance"] = out["mse"] - out["variance_mse"]
    out["physics_iq_score_unclipped"] = 100.0 * _raw_score(out)
    out["physics_iq_score"] = physics_iq_score(out)
  else:
    out["physics_iq_score"] = None
  return out


def score_arrays(
  generated: Any,
  take1: Any,
  take2: Any | None = None,
  *,
  size: tuple[int, int] | None = None,
  scenario_ids: Sequence[str] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
  """(per-video rows, score dict) for in-memory videos: generated vs truth (take 1), each [B, T, H, W, 3].

  uint8 or float in [0, 1]. Each batch item is one scenario (one view). Without
  `take2` there is no physical variance to normalise by: the score dict has the
  raw metric means and `physics_iq_score` None.
  """
  arrays = {"generated": np.asarray(generated), "take1": np.asarray(take1)}
  if take2 is not None:
    arrays["take2"] = np.asarray(take2)
  for name, value in arrays.items():
    if value.ndim != 5:
      raise ValueError(f"score_arrays {name}: expected a batch of videos [B, T, H, W, 3], got shape {value.shape}")
  counts = {name: value.shape[0] for name, value in arrays.items()}
  if len(set(counts.values())) != 1:
    raise ValueError(f"score_arrays: batch sizes differ: {counts}; pass one video of each kind per scenario")
  batch = counts["take1"]
  if scenario_ids is None:
    scenario_ids = [f"{i:04d}" for i in range(batch)]
  if len(scenario_ids) != batch:
    raise ValueError(f"score_arrays: {len(scenario_ids)} scenario ids for {batch} videos")
  rows = []
  for i in range(batch):
    t2 = arrays["take2"][i] if take2 is not None else None
    metrics = compare_videos(arrays["generated"][i], arrays["take1"][i], t2, size=size)
    rows.append({"scenario": str(scenario_ids[i]), "num_frames": int(arrays["take1"].shape[1]), **metrics})
  return rows, aggregate(rows)


# --------------------------------------------------------------------------- files


def read_video(path: str, max_frames: int | None = None) -> tuple[np.ndarray, float]:
  """(uint8 [T, H, W, 3] RGB frames, frames per second) of the first video stream, at most `max_frames` frames."""
  frames = []
  try:
    with av.open(path, mode="r", metadata_errors="ignore") as container:
      if not container.streams.video:
        raise ValueError(f"{path}: no video stream")
      stream = container.streams.video[0]
      stream.thread_type = "AUTO"
      rate = stream.average_rate or stream.guessed_rate or stream.base_rate
      for frame in container.decode(stream):
        if max_frames is not None and len(frames) >= max_frames:
          break
        frames.append(frame.to_ndarray(format="rgb24"))
  except av.FFmpegError as e:
    raise ValueError(f"{path}: cannot decode video ({e})") from e
  if not frames:
    raise ValueError(f"{path}: no frames decoded")
  return np.stack(frames), float(rate) if rate else float("nan")


def parse_real_name(filename: str) -> dict[str, str] | None:
  """{id, view, take, scenario} of `<id>_testing-videos_<fps>FPS_<view>_take-<n>_<scenario>.mp4`, else None."""
  match = _REAL_NAME.match(os.path.basename(filename))
  if match is None:
    return None
  return {"id": match["id"], "view": match["view"], "take": match["take"], "scenario": match["scenario"]}


def _list_mp4(directory: str) -> list[str]:
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"not a directory: {directory}")
  return sorted(f for f in os.listdir(directory) if f.lower().endswith(".mp4"))


def match_files(real_dir: str, generated_dir: str) -> list[dict[str, str | None]]:
  """One entry per take-1 video: {scenario, view, take1, take2 (None when no take-2 exists at all), generated} paths.

  Generated videos are matched by their leading id (the take-1 video's id, as the
  benchmark names them); take 2 by (scenario, view).
  """
  takes: dict[str, dict[tuple[str, str], tuple[str, str]]] = {"1": {}, "2": {}}
  for name in _list_mp4(real_dir):
    parsed = parse_real_name(name)
    if parsed is None or parsed["take"] not in takes:
      logging.warning(
        "physics_iq: skipping %s (not <id>_testing-videos_<fps>FPS_<view>_take-<1|2>_<scenario>.mp4)", name
      )
      continue
    key = (parsed["scenario"], parsed["view"])
    if key in takes[parsed["take"]]:
      raise ValueError(f"{real_dir}: two take-{parsed['take']} videos for scenario {key[0]} view {key[1]}")
    takes[parsed["take"]][key] = (parsed["id"], name)
  if not takes["1"]:
    raise FileNotFoundError(
      f"{real_dir}: no take-1 videos named <id>_testing-videos_<fps>FPS_<view>_take-1_<scenario>.mp4"
    )
  generated: dict[str, str] = {}
  for name in _list_mp4(generated_dir):
    file_id = os.path.splitext(name)[0].split("_", 1)[0]
    if file_id in generated:
      raise ValueError(f"{generated_dir}: two generated videos with id {file_id}: {generated[file_id]}, {name}")
    generated[file_id] = name
  missing_take2 = [takes["1"][k][1] for k in takes["1"] if k not in takes["2"]]
  if takes["2"] and missing_take2:
    raise FileNotFoundError(
      f"{real_dir}: no take-2 video for {missing_take2[:10]} ({len(missing_take2)} in all); add "
      "<id>_testing-videos_<fps>FPS_<view>_take-2_<scenario>.mp4 files, or remove all take-2 files to get raw metrics"
    )
  missing = [name for file_id, name in takes["1"].values() if file_id not in generated]
  if missing:
    raise FileNotFoundError(
      f"{generated_dir}: no generated video for {missing[:10]} ({len(missing)} in all); name each "
      "<take-1 id>_<view>_<scenario>.mp4"
    )
  known = {file_id for file_id, _ in takes["1"].values()}
  extra = sorted(name for file_id, name in generated.items() if file_id not in known)
  if extra:
    logging.warning("physics_iq: %d generated videos match no take-1 id and are ignored: %s", len(extra), extra[:10])
  entries = []
  for (scenario, view), (file_id, name) in sorted(takes["1"].items(), key=lambda item: item[1][0]):
    take2 = takes["2"].get((scenario, view))
    entries.append(
      {
        "scenario": scenario[: -len(".mp4")] if scenario.lower().endswith(".mp4") else scenario,
        "view": view,
        "take1": os.path.join(real_dir, name),
        "take2": os.path.join(real_dir, take2[1]) if take2 else None,
        "generated": os.path.join(generated_dir, generated[file_id]),
      }
    )
  return entries


# --------------------------------------------------------------------------- the official Original workflow


def read_frames_cv2(path: str, end: float | None = None, size: tuple[int, int] | None = None) -> np.ndarray:
  """uint8 BGR [T, h, w, 3]: frames i < end of a video decoded by OpenCV, each cv2.resize-d (bilinear) to size
  (h, w) when given; the official `load_and_resize_video` (normalising is left to the caller)."""
  capture = cv2.VideoCapture(path)
  if not capture.isOpened():
    raise ValueError(f"{path}: OpenCV cannot open it")
  frames = []
  while end is None or len(frames) < end:
    ok, frame = capture.read()
    if not ok:
      break
    frames.append(frame if size is None else cv2.resize(frame, (size[1], size[0])))
  capture.release()
  if not frames:
    raise ValueError(f"{path}: no frames decoded")
  return np.stack(frames)


def video_fps(path: str) -> float:
  """Frame rate as OpenCV reports it (what the official code reads)."""
  capture = cv2.VideoCapture(path)
  fps = capture.get(cv2.CAP_PROP_FPS)
  capture.release()
  return float(fps)


def resample_fps(frames: np.ndarray, fps: float, new_fps: float, seconds: float | None = SECONDS_SCORED) -> np.ndarray:
  """The official fps_changer on frames [T, H, W, 3] (uint8): its first min(`seconds`, length) (None: all) at
  `new_fps`, each new frame a linear blend of its two neighbours, truncated to uint8. (The official then writes
  them as H.264 and reads them back; that lossy step is not reproduced: pip's OpenCV has no H.264 encoder.)"""
  duration = len(frames) / fps if seconds is None else min(seconds, len(frames) / fps)
  frames = frames[: int(duration * fps)]
  count = int(duration * new_fps)
  out = []
  for j in range(count):
    alpha = j * (len(frames) - 1) / (count - 1) if count > 1 else 0.0
    index = int(alpha)
    alpha -= index
    a = frames[index].astype(np.float32)
    b = frames[min(index + 1, len(frames) - 1)].astype(np.float32)
    out.append(((1 - alpha) * a + alpha * b).astype(np.uint8))
  return np.stack(out)


def write_mp4v(path: str, frames: np.ndarray, fps: float, size: tuple[int, int] | None = None) -> None:
  """uint8 frames, BGR [T, H, W, 3] or grey [T, H, W], through OpenCV's mp4v writer (the official's), the frame
  size declared as `size` (width, height; default the frames')."""
  height, width = frames.shape[1:3]
  writer = cv2.VideoWriter(
    path, cv2.VideoWriter_fourcc(*"mp4v"), fps, size or (width, height), isColor=frames.ndim == 4
  )
  for frame in frames:
    writer.write(np.ascontiguousarray(frame))
  writer.release()


def write_mask_video(masks: np.ndarray, fps: float, path: str) -> None:
  """Masks bool [T, H, W] as the official stores them: 0/255 grey frames at round(fps), the frame size declared
  rounded down to even (lossy: reading back gives 3-channel, not 0/255)."""
  height, width = masks.shape[1:]
  write_mp4v(path, masks.astype(np.uint8) * np.uint8(255), round(fps), (width - width % 2, height - height % 2))


def _masks(frames_bgr: np.ndarray, fps: float, end: float, size: tuple[int, int], store: str | None) -> np.ndarray:
  """Motion masks of a video's frames at the common size: bool [T, h, w, 3] read back from the mask video written
  to `store` (the official's lossy round trip), or bool [T, h, w] kept in memory when store is None."""
  masks = motion_masks(np.ascontiguousarray(frames_bgr[..., ::-1]))  # the detector takes RGB
  if store is None:
    return resize_masks(masks[: int(math.ceil(end))], size)
  write_mask_video(masks, fps, store)
  return read_mask_video(store, end, size)


def read_mask_video(path: str, end: float, size: tuple[int, int]) -> np.ndarray:
  """bool [T, h, w, 3]: a mask video's frames i < end, resized to size (h, w), kept where > 127 (the official's
  reading of its own and the dataset's mask videos)."""
  return read_frames_cv2(path, end, size) > 127


def original_view(
  take1: str, take2: str | None, generated: str, *, real_masks_dir: str | None = None,
  mask_dir: str | None = None, downscale: int = 4,
) -> dict[str, Any]:  # fmt: skip
  """One view as the official Original workflow scores it: the first 5 s at the generated video's frame rate
  (real videos resampled to it when theirs differs), take 1's size // downscale, motion masks through the mp4v
  round trip into `mask_dir` (None: exact in-memory masks), the real takes' shipped mask videos where
  `real_masks_dir` has them (`real_mask_path`).

  Returns the per-video means (METRICS, VARIANCES) and the per-frame lists the official score reads
  (`frames_spatiotemporal_iou`, `frames_mse`, `frames_variance_spatiotemporal_iou`, `frames_variance_mse`).
  """
  fps = video_fps(generated)
  end = fps * SECONDS_SCORED
  real = {"take1": take1, "take2": take2}
  frames = {}
  for name, path in real.items():
    if path is None:
      continue
    video = read_frames_cv2(path)
    real_fps = video_fps(path)
    frames[name] = video if round(real_fps) == round(fps) else resample_fps(video, real_fps, fps)
  first = frames["take1"][0]
  size = (max(1, first.shape[0] // downscale), max(1, first.shape[1] // downscale))
  frames["generated"] = read_frames_cv2(generated)
  shipped = {name: real_mask_path(real_masks_dir, path, fps) for name, path in real.items()}
  masks = {}
  for name, video in frames.items():
    if shipped.get(name) and os.path.isfile(shipped[name]):
      masks[name] = read_mask_video(shipped[name], end, size)
      continue
    store = (
      None if mask_dir is None else os.path.join(mask_dir, f"{name}_{os.path.basename(real.get(name) or generated)}")
    )
    masks[name] = _masks(video, fps, end, size, store)
  unit = {}
  for name, video in frames.items():
    small = np.stack([cv2.resize(f, (size[1], size[0])) for f in video[: int(math.ceil(end))]])
    unit[name] = small / 255.0
  count = {name: len(v) for name, v in unit.items()} | {f"{n} masks": len(m) for n, m in masks.items()}
  if len(set(count.values())) != 1:
    raise ValueError(f"{generated}: frame counts differ within the first {SECONDS_SCORED} s: {count}")
  row: dict[str, Any] = {"num_frames": len(unit["take1"]), "fps": fps}
  pairs = [("", "generated")] + ([("variance_", "take2")] if take2 else [])
  for prefix, other in pairs:
    ious = iou_per_frame(masks["take1"], masks[other])
    mses = _mse_float32(unit["take1"], unit[other])
    row[f"frames_{prefix}spatiotemporal_iou"] = [float(x) for x in ious]
    row[f"frames_{prefix}mse"] = [float(x) for x in mses]
    row[f"{prefix}spatiotemporal_iou"] = float(np.mean(ious))
    row[f"{prefix}spatial_iou"] = spatial_iou(masks["take1"], masks[other])
    row[f"{prefix}weighted_spatial_iou"] = weighted_spatial_iou(masks["take1"], masks[other])
    row[f"{prefix}mse"] = float(np.mean(mses))
  return row


def _mse_float32(a: np.ndarray, b: np.ndarray) -> list[float]:
  """The official per-frame MSE: frames cast to float32, the mean in float32."""
  return [float(np.mean((x.astype(np.float32) - y.astype(np.float32)) ** 2)) for x, y in zip(a, b)]


def _parsed(values: Sequence[float]) -> list[float]:
  """Per-frame values as the official scorers parse them from the CSV: rounded to 4 decimals."""
  return [round(float(v), 4) for v in values]


def original_score(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """The official Original score (calculate_iq_score) from per-view rows of `original_view` with `scenario` and
  `view`: per-frame values rounded to 4 decimals as it parses them; ST-IoU and MSE averaged over all frames of a
  scenario's views, then over scenarios; spatial IoUs over scenarios then views; each variance per view over all
  frames (or scenarios), then over views, rounded to 4 decimals (5 for spatial); the score clipped to [0, 100]
  and rounded to 2 decimals."""
  by_scenario: dict[str, list[Mapping[str, Any]]] = {}
  views: dict[str, list[Mapping[str, Any]]] = {}
  for row in rows:
    by_scenario.setdefault(str(row["scenario"]), []).append(row)
    views.setdefault(str(row["view"]), []).append(row)

  def over_frames(groups: dict[str, list[Mapping[str, Any]]], key: str) -> float:
    """Mean over the groups of the mean over all frames of the group's rows."""
    return float(np.mean([np.mean(np.concatenate([_parsed(r[key]) for r in group])) for group in groups.values()]))

  def per_view(key: str, frames: bool) -> float:
    if frames:
      return over_frames(views, key)
    return float(np.mean([np.mean([float(r[key]) for r in group]) for group in views.values()]))

  out: dict[str, Any] = {"num_scenarios": len(by_scenario), "num_videos": len(rows)}
  out["spatiotemporal_iou"] = over_frames(by_scenario, "frames_spatiotemporal_iou")
  out["mse"] = over_frames(by_scenario, "frames_mse")
  out["spatial_iou"] = per_view("spatial_iou", False)
  out["weighted_spatial_iou"] = per_view("weighted_spatial_iou", False)
  if not all("frames_variance_mse" in r for r in rows):
    out["physics_iq_score"] = None
    return out
  out["variance_mse"] = round(per_view("frames_variance_mse", True), 4)
  out["variance_spatiotemporal_iou"] = round(per_view("frames_variance_spatiotemporal_iou", True), 4)
  out["variance_spatial_iou"] = round(per_view("variance_spatial_iou", False), 5)
  out["variance_weighted_spatial_iou"] = round(per_view("variance_weighted_spatial_iou", False), 4)
  raw = _raw_score(out)
  out["physics_iq_score_unclipped"] = 100.0 * raw
  out["physics_iq_score"] = float("nan") if math.isnan(raw) else round(max(min(100.0 * raw, 100.0), 0.0), 2)
  return out


VERIFIED_EPS = 1e-8  # the official IQTable's ratio_eps


def verified_score(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """The official Physics-IQ Verified score (physiq/: IQTable's final_score_view) from per-view rows of
  `original_view`: per (scenario, view), each IoU over its physical variance (+1e-8) and the MSE's variance
  (+1e-8) over the MSE, per-frame values rounded to 4 decimals and averaged per view, each clipped to [0, 1];
  their mean per (scenario, view); the mean over all of them, as a percentage rounded to 2 decimals."""
  if not all("frames_variance_mse" in r for r in rows):
    raise ValueError("the Verified score needs take-2 videos (the physical variance) for every view")
  mean_rounded = lambda values: float(np.mean(_parsed(values)))  # noqa: E731
  components: dict[str, list[float]] = {"spatiotemporal_iou": [], "spatial_iou": [], "weighted_spatial_iou": [],
                                        "mse": []}  # fmt: skip
  finals = []
  for r in rows:
    st = mean_rounded(r["frames_spatiotemporal_iou"]) / (
      mean_rounded(r["frames_variance_spatiotemporal_iou"]) + VERIFIED_EPS
    )
    mse_ratio = mean_rounded(r["frames_mse"]) / (mean_rounded(r["frames_variance_mse"]) + VERIFIED_EPS)
    scores = {
      "spatiotemporal_iou": st,
      "spatial_iou": float(r["spatial_iou"]) / (float(r["variance_spatial_iou"]) + VERIFIED_EPS),
      "weighted_spatial_iou": float(r["weighted_spatial_iou"])
      / (float(r["variance_weighted_spatial_iou"]) + VERIFIED_EPS),
      "mse": math.inf if mse_ratio == 0 else 1.0 / mse_ratio,
    }
    clipped = {k: float(np.clip(v, 0.0, 1.0)) for k, v in scores.items()}
    for k, v in clipped.items():
      components[k].append(v)
    finals.append(float(np.mean(list(clipped.values()))))
  out: dict[str, Any] = {"num_videos": len(rows), "num_scenarios": len({r["scenario"] for r in rows})}
  out.update({f"score_{k}": float(np.mean(v)) for k, v in components.items()})
  out["physics_iq_score_unrounded"] = 100.0 * float(np.mean(finals))
  out["physics_iq_score"] = round(out["physics_iq_score_unrounded"], 2)
  return out


SCORERS = {"original": original_score, "verified": verified_score}


def real_mask_path(masks_dir: str | None, real_path: str | None, fps: float) -> str | None:
  """The shipped mask video of a real take (`<id>_video-masks_<fps>FPS_<view>_take-<n>_<scenario>.mp4` in
  masks_dir, the dataset's video-masks/real/<fps>FPS), or None."""
  if not masks_dir or not real_path:
    return None
  parts = os.path.basename(real_path).split("_")
  name = "_".join([parts[0], "video-masks", f"{round(fps)}FPS", *parts[3:]])
  path = os.path.join(masks_dir, name)
  return path if os.path.isfile(path) else None


def evaluate_directory(
  real_dir: str,
  generated_dir: str,
  output_csv: str | None = None,
  *,
  downscale: int = 4,
  exact_masks: bool = False,
  real_masks_dir: str | None = None,
  mask_dir: str | None = None,
  variant: str = "original",
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
  """(per-video rows, score dict) of a benchmark-style folder of real videos and a folder of generated ones, as
  the official Original workflow scores them (`original_view`, `original_score`).

  exact_masks: keep the motion masks in memory instead of the official's lossy mp4v round trip (the IoUs then
  differ from the official ones by up to about 0.05 on small videos). real_masks_dir: the dataset's shipped
  real masks (video-masks/real/<fps>FPS), used where present. mask_dir: where the round-trip mask videos go
  (a temporary folder by default). variant: "original" (`original_score`) or "verified" (`verified_score`).
  Writes the rows to `output_csv` when given.
  """
  import tempfile

  if downscale < 1:
    raise ValueError(f"downscale must be >= 1, got {downscale}")
  if variant not in SCORERS:
    raise ValueError(f"variant={variant!r}; choose one of {sorted(SCORERS)}")
  rows = []
  with tempfile.TemporaryDirectory() as scratch:
    store = None if exact_masks else (mask_dir or scratch)
    if store:
      os.makedirs(store, exist_ok=True)
    for entry in match_files(real_dir, generated_dir):
      metrics = original_view(
        entry["take1"], entry["take2"], entry["generated"], downscale=downscale, mask_dir=store,
        real_masks_dir=real_masks_dir,
      )  # fmt: skip
      files = {k: os.path.basename(entry[k]) if entry[k] else "" for k in ("take1", "take2", "generated")}
      rows.append({"scenario": entry["scenario"], "view": entry["view"], **files, **metrics})
  if output_csv:
    write_csv([{k: v for k, v in r.items() if not k.startswith("frames_")} for r in rows], output_csv)
  return rows, SCORERS[variant](rows)


_OFFICIAL_COLUMNS = {  # the official per-scenario CSV's column (per view) -> the row field it holds
  "v1_mse": "frames_mse",
  "spatiotemporal_iou_v1": "frames_spatiotemporal_iou",
  "spatial_iou_v1": "spatial_iou",
  "weighted_spatial_iou_v1": "weighted_spatial_iou",
  "variance_mse": "frames_variance_mse",
  "variance_spatiotemporal_iou": "frames_variance_spatiotemporal_iou",
  "variance_spatial": "variance_spatial_iou",
  "variance_weighted_spatial": "variance_weighted_spatial_iou",
}


def write_official_csv(rows: Sequence[Mapping[str, Any]], path: str) -> None:
  """The official per-scenario CSV (one line per scenario, `<column>_<view>` per view, per-frame lists as Python
  lists) from `original_view` rows, with the columns the official scorers read (calculate_iq_score, IQTable)."""
  by_scenario: dict[str, dict[str, Any]] = {}
  for row in rows:
    line = by_scenario.setdefault(f"{row['scenario']}.mp4", {"scenario": f"{row['scenario']}.mp4"})
    for column, field in _OFFICIAL_COLUMNS.items():
      if field in row:
        value = row[field]
        line[f"{column}_{row['view']}"] = str([float(v) for v in value]) if isinstance(value, list) else float(value)
  columns = sorted(set().union(*(line.keys() for line in by_scenario.values())) - {"scenario"})
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=["scenario", *columns])
    writer.writeheader()
    writer.writerows(by_scenario.values())


def write_csv(rows: Iterable[Mapping[str, Any]], path: str) -> None:
  """One line per video: the info columns present, then METRICS, then VARIANCES when present."""
  rows = list(rows)
  present = set().union(*(row.keys() for row in rows)) if rows else set()
  columns = [c for c in _INFO_COLUMNS + METRICS + VARIANCES if c in present]
  columns += sorted(present - set(columns))
  if os.path.dirname(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    for row in rows:
      # float(): numpy scalars would otherwise be written as "np.float64(...)"; str(float) round-trips exactly.
      writer.writerow({c: (float(v) if isinstance(v, (float, np.floating)) else v) for c, v in row.items()})


def _main(argv: Sequence[str]) -> None:
  import json

  from absl import flags

  del argv
  f = flags.FLAGS
  _, scores = evaluate_directory(
    f.real, f.generated, f.output, downscale=f.downscale, exact_masks=f.exact_masks,
    real_masks_dir=f.real_masks or None, mask_dir=f.mask_dir or None, variant=f.variant,
  )  # fmt: skip
  print(json.dumps(scores, indent=2))


if __name__ == "__main__":
  from absl import app, flags

  flags.DEFINE_string(
    "real", None, "Folder of real videos <id>_testing-videos_<fps>FPS_<view>_take-<1|2>_<scenario>.mp4."
  )
  flags.DEFINE_string("generated", None, "Folder of generated videos <take-1 id>_<view>_<scenario>.mp4.")
  flags.DEFINE_string("output", None, "Per-video CSV to write.")
  flags.DEFINE_enum("variant", "original", ["original", "verified"], "Which Physics-IQ (the official workflow's).")
  flags.DEFINE_integer("downscale", 4, "Compare at take 1's size divided by this (the benchmark uses 4).")
  flags.DEFINE_bool("exact_masks", False, "Keep motion masks in memory (not the official's lossy mp4v round trip).")
  flags.DEFINE_string("real_masks", "", "The dataset's shipped real masks (video-masks/real/<fps>FPS), if any.")
  flags.DEFINE_string("mask_dir", "", "Keep the round-trip mask videos here (default: a temporary folder).")
  flags.mark_flags_as_required(["real", "generated", "output"])
  app.run(_main)
