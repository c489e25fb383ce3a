"""Roll a checkpoint out on held-out videos and score it against two baselines.

  python -m vgpt_jax.evaluate --checkpoint=WORKDIR [--videos=DIR] [--num_videos=64]
      [--context_frames=4 --frames=4 --clip_frames=0 --steps=0 --guidance=1 --output=DIR --nofvd]

Videos: the run's held-out set (the physics world's eval split by default) or
the files of --videos, each cut to context_frames + frames frames at the run's
stride and frame size (shorter videos are skipped: the truth is needed). A run
trained with data.buckets rolls each video out at its bucket's size (the one
nearest its aspect); the metrics are computed per size and averaged, weighted
by the videos of each, and FVD pools the I3D features of every size.

Methods, all given the same context frames:
  model         the KV-cached sampler (vgpt_jax/sampler.py)
  copy_last     every predicted frame is the last context frame
  linear        x_{m-1} + k (x_{m-1} - x_{m-2}): linear extrapolation of the last two

Metrics on the predicted frames: MSE, PSNR and SSIM per frame (pixels in
[0, 1]); Physics-IQ's spatiotemporal, spatial and weighted spatial IoU of
motion masks and its MSE (vgpt_jax/metrics/physics_iq.py; the masks of each
video start at its last context frame, so the first prediction's motion
counts; frames smaller than 128 pixels are upscaled by nearest neighbour so
the 5x5 mask filters do not erase small objects); FVD (I3D) of the whole
videos (context + prediction) against the true ones. There is no second take
of a held-out video, so the Physics-IQ score's physical-variance
normalisation does not apply: the raw metrics are reported.

Written to DIR (default WORKDIR/eval): metrics.json, a table (table.md, also
printed), per_frame_mse.png / per_frame_psnr.png / per_frame_ssim.png (error
over the rollout horizon), rollouts.gif (truth | model | copy_last | linear).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from absl import app, flags, logging

from vgpt_jax import checkpoint, media
from vgpt_jax.data.pipeline import to_uint8
from vgpt_jax.data.sources import NoUsableVideo
from vgpt_jax.metrics import physics_iq, video
from vgpt_jax.rollouts import RolloutRequest, define_flags, open_request, request_from_flags
from vgpt_jax.sampler import continue_videos

METHODS = ("model", "copy_last", "linear")
MASK_SIZE = 128  # frames are upscaled to at least this many pixels before motion masks


def copy_last(context: np.ndarray, frames: int) -> np.ndarray:
  """[B, frames, H, W, 3]: the last context frame repeated. context: [B, m, H, W, 3]."""
  return np.repeat(context[:, -1:], frames, axis=1)


def linear_extrapolation(context: np.ndarray, frames: int) -> np.ndarray:
  """[B, frames, H, W, 3]: the last two context frames' difference continued, clipped to [-1, 1]."""
  if context.shape[1] < 2:
    return copy_last(context, frames)
  last, step = context[:, -1:], context[:, -1:] - context[:, -2:-1]
  k = np.arange(1, frames + 1, dtype=np.float32)[None, :, None, None, None]
  return np.clip(last + k * step, -1.0, 1.0)


def _unit(x: np.ndarray) -> np.ndarray:
  """[-1, 1] -> [0, 1] (the metrics' pixel range)."""
  return (np.asarray(x, np.float32) + 1.0) / 2.0


class FvdReference:
  """I3D statistics of the true videos (context + truth), computed once and shared by every method.

  context, truth: [B, m, H, W, 3] and [B, g, H, W, 3], or lists of such arrays (videos of several sizes:
  I3D resizes each, and the features of all of them make one distribution).
  """

  def __init__(self, context: np.ndarray | list[np.ndarray], truth: np.ndarray | list[np.ndarray]):
    from vgpt_jax.metrics import fvd

    self.fvd = fvd
    self.stats = fvd.feature_statistics(self._features(context, truth))

  def _features(self, context, rest) -> np.ndarray:
    pairs = zip(context, rest) if isinstance(context, list) else [(context, rest)]
    return np.concatenate([self.fvd.i3d_features(np.concatenate([c, r], axis=1)) for c, r in pairs])

  def distance(self, context: np.ndarray | list[np.ndarray], prediction: np.ndarray | list[np.ndarray]) -> float:
    features = self._features(context, prediction)
    return float(self.fvd.frechet_distance(*self.stats, *self.fvd.feature_statistics(features)))


def score(
  context: np.ndarray, truth: np.ndarray, prediction: np.ndarray, fvd_reference: FvdReference | None = None
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """(summary metrics, per-frame curves) of one method; float [-1, 1] context [B, m, ...], others [B, g, ...].

  FVD is included when `fvd_reference` (the true videos' I3D statistics) is given.
  """
  p, t = _unit(prediction), _unit(truth)
  curves = {
    "mse": video.mse_per_frame(p, t).mean(axis=0),
    "psnr": video.psnr(p, t, 1.0).mean(axis=0),
    "ssim": video.ssim(p, t, 1.0).mean(axis=0),
  }
  scale = max(1, MASK_SIZE // min(truth.shape[2:4]))
  with_start = lambda x: media.upscale(to_uint8(np.concatenate([context[:, -1:], x], axis=1)), scale)  # noqa: E731
  _, piq = physics_iq.score_arrays(with_start(prediction), with_start(truth))
  out: dict[str, Any] = {name: float(np.mean(curve)) for name, curve in curves.items()}
  out.update({f"physics_iq_{k}": float(piq[k]) for k in physics_iq.METRICS})
  if fvd_reference is not None:
    out["fvd"] = fvd_reference.distance(context, prediction)
  return out, curves


def evaluate(
  request: RolloutRequest, output: str | Path, *, videos_dir: str = "", with_fvd: bool = True
) -> dict[str, Any]:
  """The CLI's work (`videos_dir`: held-out files; empty: the run's held-out set); returns metrics.json."""
  opened = open_request(request, videos_dir)
  m, g, sampling, num_videos = opened.context_frames, opened.frames, opened.sampling, request.num_videos
  videos = [(name, v) for name, v in opened.videos if len(v) == m + g]
  if not videos:
    raise ValueError(
      f"no video with {m + g} frames (context {m} + {g} to predict) in {videos_dir or 'the held-out set'}"
    )
  if len(videos) < num_videos:
    logging.warning("only %d of the %d videos asked for have %d frames", len(videos), num_videos, m + g)
  model = continue_videos(
    opened.run, opened.params, videos, sampling, m, g, request.seed, batch_size=request.batch_size
  )
  # Videos of several sizes (data.buckets) are scored per size, and the means weighted by their numbers.
  sizes = sorted({v.shape[1:3] for _, v in videos})
  groups = [[i for i, (_, v) in enumerate(videos) if v.shape[1:3] == size] for size in sizes]
  contexts = [np.stack([videos[i][1][:m] for i in group]) for group in groups]
  truths = [np.stack([videos[i][1][m:] for i in group]) for group in groups]
  predictions = {
    "model": [np.stack([model[i] for i in group]) for group in groups],
    "copy_last": [copy_last(c, g) for c in contexts],
    "linear": [linear_extrapolation(c, g) for c in contexts],
  }
  fvd_reference, fvd_note = None, "off (--nofvd)"
  if with_fvd:
    from vgpt_jax.metrics.fvd import MIN_FRAMES

    if m + g < MIN_FRAMES or len(videos) < 2:
      fvd_note = f"skipped: I3D needs >= {MIN_FRAMES} frames (context + predicted) and >= 2 videos"
      logging.warning("FVD %s; use --frames=%d or more", fvd_note, max(MIN_FRAMES - m, 1))
    else:
      fvd_reference, fvd_note = FvdReference(contexts, truths), "I3D Kinetics-400 logits of context + prediction"
  results, curves = {}, {}
  weights = np.array([len(group) for group in groups], np.float64) / len(videos)
  for method in METHODS:
    logging.info("scoring %s", method)
    scored = [score(c, t, p) for c, t, p in zip(contexts, truths, predictions[method])]
    results[method] = {k: float(sum(w * r[k] for w, (r, _) in zip(weights, scored))) for k in scored[0][0]}
    curves[method] = {k: sum(w * c[k] for w, (_, c) in zip(weights, scored)) for k in scored[0][1]}
    if fvd_reference is not None:
      results[method]["fvd"] = fvd_reference.distance(contexts, predictions[method])
  directory = Path(output)
  directory.mkdir(parents=True, exist_ok=True)
  report = {
    "checkpoint": str(request.checkpoint),
    "step": opened.step,
    "videos": len(videos),
    "source": videos_dir or "held-out set",
    "context_frames": m,
    "predicted_frames": g,
    "sampling": {k: getattr(sampling, k) for k in ("steps", "shift", "guidance", "clip_frames", "window")},
    "metrics": results,
    "fvd": fvd_note,
    "per_frame": {method: {k: v.tolist() for k, v in c.items()} for method, c in curves.items()},
  }
  (directory / "metrics.json").write_text(json.dumps(report, indent=2))
  table = format_table(results)
  (directory / "table.md").write_text(table + "\n")
  horizon = np.arange(1, g + 1)
  for name, label in (("mse", "MSE"), ("psnr", "PSNR (dB)"), ("ssim", "SSIM")):
    series = {method: curves[method][name] for method in METHODS}
    path = directory / f"per_frame_{name}.png"
    media.save_lines(path, horizon, series, "predicted frame", label, f"{label} over the rollout horizon")
  shown = int(np.argmax(weights))  # the gif shows videos of the most common size
  context = contexts[shown]
  full = [to_uint8(np.concatenate([context, x[shown]], axis=1)) for x in (truths, *predictions.values())]
  rows = [np.concatenate([f[i] for f in full], axis=2) for i in range(min(4, len(context)))]  # truth | methods
  media.save_gif(directory / "rollouts.gif", np.concatenate(rows, axis=1), scale=max(1, 96 // context.shape[2]))
  print(table)
  return report


def format_table(results: dict[str, dict[str, float]]) -> str:
  """Markdown table: one row per method, one column per metric (arrows say which way is better)."""
  better = {"mse": "↓", "psnr": "↑", "ssim": "↑", "fvd": "↓", "physics_iq_mse": "↓"}
  columns = list(next(iter(results.values())))
  head = "| method | " + " | ".join(f"{c} {better.get(c, '↑')}" for c in columns) + " |"
  rule = "|---|" + "---|" * len(columns)
  body = [f"| {method} | " + " | ".join(f"{r[c]:.4g}" for c in columns) + " |" for method, r in results.items()]
  return "\n".join([head, rule, *body])


def _define_flags() -> None:
  define_flags(num_videos=64, batch_size=16)
  flags.adopt_module_key_flags(sys.modules[define_flags.__module__])  # listed by --helpshort too
  flags.DEFINE_string("videos", "", "A directory of held-out video files; empty: the run's held-out set.")
  flags.DEFINE_string("output", "", "Where to write; default CHECKPOINT/eval.")
  flags.DEFINE_bool("fvd", True, "Also compute FVD with I3D (slow on CPU).")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  try:
    evaluate(request_from_flags(), f.output or str(Path(f.checkpoint) / "eval"), videos_dir=f.videos, with_fvd=f.fvd)
  except (ValueError, NoUsableVideo, checkpoint.CheckpointError) as e:
    raise SystemExit(f"evaluate: {e}") from None


if __name__ == "__main__":
  _define_flags()
  app.run(main)
