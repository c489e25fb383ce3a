"""Physics-IQ end to end: continue the benchmark's conditioning videos with a checkpoint, then score them.

  python -m vgpt_jax.physics_iq --checkpoint=RUN --benchmark=physics-IQ-benchmark --output=DIR \
      [--fps=8] [--runs=4] [--variant=original] [--context_frames=0 --clip_frames=0 --steps=0 --guidance=0 ...]

BENCHMARK is the official dataset folder (its download is the user's step; nothing downloads here):
  split-videos/conditioning/<fps>FPS/<id>_conditioning-videos_<fps>FPS_<view>_take-1_<scenario>.mp4
  split-videos/testing/<fps>FPS/<id>_testing-videos_<fps>FPS_<view>_take-<1|2>_<scenario>.mp4
  video-masks/real/<fps>FPS/<id>_video-masks_<fps>FPS_<view>_take-<1|2>_<scenario>.mp4   (used where present)
  descriptions.csv (optional; the official descriptions file, for the per-category scores)
The <fps>FPS folders at --fps are used when present, else the 30FPS ones, resampled to --fps with the
official blend (metrics/physics_iq.py: resample_fps).

The v2v protocol: each take-1 conditioning video (the part before the switch frame) is resampled to --fps,
scaled and cropped to the model's frame size, and its last context frames are the context; the KV-cached
sampler generates the next 5 s (what the metric scores) at the sampling defaults of the checkpoint (or the
flags). Each continuation is written as DIR/run-<k>/<take-1 id>_<view>_<scenario>.mp4 at --fps, the names
the official scorer expects; a run's videos are generated in batches and written as each batch finishes,
so a rerun skips those already written. Each run (seed + k) is then scored as the official Original
workflow (--variant=original) or Physics-IQ Verified (--variant=verified, on the Verified dataset) does
(metrics/physics_iq.py), and DIR gets:
  run-<k>/scores.csv   per video: the metrics and their physical variances
  run-<k>/official.csv the same in the official per-scenario format (its own scorers read it)
  physics_iq.json      per run and category, the score of the variant; mean and std over runs
  physics_iq.md        the same as a table
  categories.png       the score per physical category (mean over runs)
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import app, flags, logging

from vgpt_jax import checkpoint, media
from vgpt_jax.data.buckets import frame_size
from vgpt_jax.data.pipeline import to_float, to_uint8
from vgpt_jax.data.sources import fit_frames
from vgpt_jax.metrics import physics_iq as piq
from vgpt_jax.rollouts import define_flags, request_from_flags
from vgpt_jax.sampler import continue_videos, with_run_defaults

BASE_FPS = 30  # the benchmark's full-rate folders
_CONDITIONING = re.compile(
  r"^(?P<id>[^_]+)_conditioning-videos_(?P<fps>[^_]+)_(?P<view>[^_]+)_take-1_(?P<scenario>.+\.mp4)$"
)


def _folder(benchmark: Path, kind: str, fps: int) -> Path:
  """benchmark/kind/<fps>FPS when it exists, else the 30FPS one (resampled by the caller)."""
  at_fps = benchmark / kind / f"{fps}FPS"
  return at_fps if at_fps.is_dir() else benchmark / kind / f"{BASE_FPS}FPS"


def conditioning_entries(benchmark: Path, fps: int) -> list[dict[str, str]]:
  """One entry per take-1 conditioning video: {path, name}, name = the generated video's official file name."""
  folder = _folder(benchmark, "split-videos/conditioning", fps)
  if not folder.is_dir():
    raise FileNotFoundError(f"{benchmark}: no split-videos/conditioning/{fps}FPS or {BASE_FPS}FPS folder")
  entries = []
  for name in sorted(os.listdir(folder)):
    match = _CONDITIONING.match(name)
    if match is None:
      continue
    entries.append({"path": str(folder / name), "name": f"{match['id']}_{match['view']}_{match['scenario']}"})
  if not entries:
    raise FileNotFoundError(f"{folder}: no <id>_conditioning-videos_<fps>FPS_<view>_take-1_<scenario>.mp4 files")
  return entries


def read_conditioning(path: str, fps: int, data_cfg) -> np.ndarray:
  """float32 [T, H, W, 3] in [-1, 1]: the whole conditioning video at `fps`, fitted to the model's frame size
  (with data.buckets, its nearest bucket's)."""
  frames = np.ascontiguousarray(piq.read_frames_cv2(path)[..., ::-1])  # RGB
  source_fps = piq.video_fps(path)
  if round(source_fps) != fps:
    frames = piq.resample_fps(frames, source_fps, fps, seconds=None)
  return to_float(fit_frames(frames, *frame_size(data_cfg, frames.shape[2], frames.shape[1])))


def generate_run(run, params, entries, out_dir: Path, sampling, context_frames: int, fps: int, seed: int,
                 batch_size: int) -> int:  # fmt: skip
  """Write each entry's continuation (5 s at `fps`) to out_dir/name unless it is there; returns how many were
  generated. Video i's noise comes from (seed, i) whatever the batch, so a resumed run gives the same videos."""
  out_dir.mkdir(parents=True, exist_ok=True)
  frames = math.ceil(piq.SECONDS_SCORED * fps)
  todo = [i for i, e in enumerate(entries) if not (out_dir / e["name"]).is_file()]
  data = run.config.data
  made = 0
  for start in range(0, len(todo), batch_size):
    batch = todo[start : start + batch_size]
    videos = [(entries[i]["name"], read_conditioning(entries[i]["path"], fps, data)) for i in batch]
    short = [name for name, v in videos if len(v) < context_frames]
    if short:
      raise ValueError(f"conditioning videos shorter than {context_frames} frames at {fps} fps: {short[:5]}")
    videos = [(name, v[-context_frames:]) for name, v in videos]  # the frames right before the switch
    generated = continue_videos(
      run, params, videos, sampling, context_frames, frames, seed, batch_size=batch_size, video_ids=batch
    )
    for (name, _), video in zip(videos, generated):
      if jax.process_index() == 0:
        partial = out_dir / f".{name}.partial.mp4"
        media.save_mp4(partial, to_uint8(video), fps=fps)
        partial.rename(out_dir / name)  # a killed run never leaves a half-written video that would be skipped
      made += 1
  return made


def categories(benchmark: Path, descriptions: str) -> dict[str, str]:
  """scenario file name -> physical category, from the official descriptions.csv (empty when there is none)."""
  path = Path(descriptions) if descriptions else benchmark / "descriptions.csv"
  if not path.is_file():
    return {}
  with open(path, newline="") as f:
    return {row["scenario"].split("_", 3)[-1]: row["category"] for row in csv.DictReader(f)}


def score_runs(benchmark: Path, output: Path, runs: int, fps: int, descriptions: str, variant: str) -> dict[str, Any]:
  """Score every run folder as the official workflow of `variant`; the summary (also written as JSON, MD, PNG)."""
  real = _folder(benchmark, "split-videos/testing", fps)
  masks = benchmark / "video-masks" / "real" / f"{fps}FPS"
  category_of = categories(benchmark, descriptions)
  per_run, by_category = [], {}
  for k in range(runs):
    run_dir = output / f"run-{k}"
    rows, score = piq.evaluate_directory(
      str(real),
      str(run_dir),
      str(run_dir / "scores.csv"),
      real_masks_dir=str(masks) if masks.is_dir() else None,
      variant=variant,
    )
    piq.write_official_csv(rows, str(run_dir / "official.csv"))
    per_run.append(score["physics_iq_score"])
    groups: dict[str, list] = {}
    for row in rows:
      groups.setdefault(category_of.get(f"{row['scenario']}.mp4", "all"), []).append(row)
    for name, group in groups.items():
      by_category.setdefault(name, []).append(piq.SCORERS[variant](group)["physics_iq_score"])
  summary = {
    "runs": per_run,
    "mean": float(np.mean(per_run)),
    "std": float(np.std(per_run)),
    "categories": {name: {"mean": float(np.mean(v)), "std": float(np.std(v))} for name, v in by_category.items()},
    "fps": fps,
    "variant": variant,
  }
  (output / "physics_iq.json").write_text(json.dumps(summary, indent=2))
  lines = [f"| | Physics-IQ ({variant}) |", "|---|---|", f"| mean ± std over {runs} runs | "
           f"{summary['mean']:.2f} ± {summary['std']:.2f} |"]  # fmt: skip
  lines += [f"| run {k} | {s:.2f} |" for k, s in enumerate(per_run)]
  lines += [f"| {name} | {c['mean']:.2f} ± {c['std']:.2f} |" for name, c in sorted(summary["categories"].items())]
  (output / "physics_iq.md").write_text("\n".join(lines) + "\n")
  names = sorted(summary["categories"])
  media.save_bars(output / "categories.png", names, {"Physics-IQ": [summary["categories"][n]["mean"] for n in names]},
                  "score", f"Physics-IQ per category ({runs} runs)")  # fmt: skip
  return summary


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  benchmark, output = Path(f.benchmark), Path(f.output)
  request = request_from_flags()
  run, params, step = checkpoint.load_model(request.checkpoint, request.step, request.weights)
  context_frames, _, sampling = with_run_defaults(run.config, request.context_frames, 1, request.sampling)
  entries = conditioning_entries(benchmark, f.fps)
  logging.info("%d conditioning videos, checkpoint step %d, %d context frames", len(entries), step, context_frames)
  for k in range(f.runs):
    made = generate_run(run, params, entries, output / f"run-{k}", sampling, context_frames, f.fps, f.seed + k,
                        request.batch_size)  # fmt: skip
    print(f"run {k}: generated {made}, kept {len(entries) - made} already written")
  summary = score_runs(benchmark, output, f.runs, f.fps, f.descriptions, f.variant)
  print(json.dumps({k: summary[k] for k in ("mean", "std", "runs")}, indent=2))


if __name__ == "__main__":
  define_flags(num_videos=0, batch_size=8)
  flags.DEFINE_string("benchmark", None, "The Physics-IQ dataset folder (split-videos/, video-masks/).")
  flags.DEFINE_string("output", None, "Where the continuations, CSVs, scores and plot go.")
  flags.DEFINE_integer("fps", 8, "Frame rate of the generated videos (the model's); the benchmark's 8/16/24/30.")
  flags.DEFINE_integer("runs", 4, "Runs (seeds seed..seed+runs-1); the score is their mean ± std.")
  flags.DEFINE_enum("variant", "original", ["original", "verified"], "Which Physics-IQ (the official workflow's).")
  flags.DEFINE_string("descriptions", "", "The official descriptions.csv (categories); default in BENCHMARK.")
  flags.mark_flags_as_required(["benchmark", "output"])
  app.run(main)
