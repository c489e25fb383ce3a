"""Physics-IQ on a synthetic benchmark in the official layout, made from the physics world; a model's score next
to the copy-last-frame and linear-extrapolation baselines, all scored by the official Original workflow.

  python -m vgpt_jax.benchmarks.physics_iq --output=/tmp/piq [--checkpoint=RUN] [--scenarios=16 --runs=2]

`make_benchmark` writes the dataset the official download would give (split-videos/conditioning and testing,
full-videos, switch-frames, video-masks/real, descriptions.csv) for `scenarios` physics-world scenes, each seen
from 3 views (three horizontal windows of one wider rendering) in 2 takes (take 2 starts one frame later: the
physical variance), 3 s of conditioning then 5 s of testing. The tests build a small one; BENCHMARKS.md records
the table this prints for 16 scenarios.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np

from vgpt_jax.data.physics import PhysicsWorld, render_video
from vgpt_jax.metrics import physics_iq as piq

VIEWS = ("perspective-left", "perspective-center", "perspective-right")
CATEGORIES = ("Solid Mechanics", "Collisions")
CONDITIONING_SECONDS = 3


def _write(path: Path, rgb: np.ndarray, fps: int) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  piq.write_mp4v(str(path), rgb[..., ::-1], fps)


def make_benchmark(root: str | Path, scenarios: int = 2, fps: int = 8, size: int = 32, seed: int = 0) -> Path:
  """Write the dataset under root (see the module docstring); returns root."""
  root = Path(root)
  conditioning, testing = CONDITIONING_SECONDS * fps, piq.SECONDS_SCORED * fps
  world = PhysicsWorld(height=size, width=size * 3 // 2, num_frames=conditioning + testing + 1)
  descriptions = []
  ids = {}
  for take in (1, 2):
    for s in range(scenarios):
      for view in VIEWS:
        ids[(take, s, view)] = len(ids) + 1
  for s in range(scenarios):
    scenario = f"trimmed-world-{s:03d}.mp4"
    wide = render_video(seed * 1000 + s, world)
    for take in (1, 2):
      for v, view in enumerate(VIEWS):
        left = v * (world.width - size) // 2
        full = wide[take - 1 : take - 1 + conditioning + testing, :, left : left + size]
        tag = f"{view}_take-{take}_{scenario}"
        file_id = f"{ids[(take, s, view)]:04d}"
        _write(root / f"full-videos/take-{take}/{fps}FPS/{file_id}_full-videos_{fps}FPS_{tag}", full, fps)
        split = root / "split-videos"
        _write(split / f"conditioning/{fps}FPS/{file_id}_conditioning-videos_{fps}FPS_{tag}", full[:conditioning], fps)
        _write(split / f"testing/{fps}FPS/{file_id}_testing-videos_{fps}FPS_{tag}", full[conditioning:], fps)
        (root / "switch-frames").mkdir(parents=True, exist_ok=True)
        switch = root / "switch-frames" / f"{file_id}_switch-frames_anyFPS_{tag[:-4]}.jpg"
        cv2.imwrite(str(switch), np.ascontiguousarray(full[conditioning - 1, :, :, ::-1]))
        masks = root / f"video-masks/real/{fps}FPS/{file_id}_video-masks_{fps}FPS_{tag}"
        masks.parent.mkdir(parents=True, exist_ok=True)
        piq.write_mask_video(piq.motion_masks(full[conditioning:]), fps, str(masks))
        if take == 1:
          descriptions.append({
            "scenario": f"{file_id}_{tag}", "description": f"physics world scene {s}, {view}",
            "category": CATEGORIES[s % len(CATEGORIES)], "generated_video_name": f"{file_id}_{view}_{scenario}",
          })  # fmt: skip
  with open(root / "descriptions.csv", "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(descriptions[0]))
    writer.writeheader()
    writer.writerows(descriptions)
  return root


def write_baseline(benchmark: Path, out_dir: Path, fps: int, kind: str) -> None:
  """Continuations of every take-1 conditioning video by copying its last frame or extrapolating its last two
  linearly, 5 s at `fps`, named as the official scorer expects."""
  from vgpt_jax.physics_iq import conditioning_entries

  for entry in conditioning_entries(benchmark, fps):
    frames = piq.read_frames_cv2(entry["path"])[..., ::-1].astype(np.float32)
    last, before = frames[-1], frames[-2]
    steps = np.arange(1, piq.SECONDS_SCORED * fps + 1, dtype=np.float32)[:, None, None, None]
    video = last[None] + steps * ((last - before)[None] if kind == "linear" else 0.0)
    _write(out_dir / entry["name"], np.clip(np.round(video), 0, 255).astype(np.uint8), fps)


def main() -> None:
  from absl import app, flags

  flags.DEFINE_string("output", None, "Folder for the benchmark, the continuations and the scores.")
  flags.DEFINE_string("checkpoint", "", "A run to score next to the baselines (python -m vgpt_jax.physics_iq).")
  flags.DEFINE_integer("scenarios", 16, "Physics-world scenes (3 views x 2 takes each).")
  flags.DEFINE_integer("runs", 2, "Seeds of the model's continuations.")
  flags.DEFINE_integer("fps", 8, "Frame rate of the dataset and of the continuations.")
  flags.mark_flags_as_required(["output"])

  def run(argv: list[str]) -> None:
    del argv
    f = flags.FLAGS
    output = Path(f.output)
    benchmark = output / "physics-IQ-benchmark"
    if not benchmark.exists():
      make_benchmark(benchmark, f.scenarios, f.fps)
    real = benchmark / f"split-videos/testing/{f.fps}FPS"
    masks = benchmark / f"video-masks/real/{f.fps}FPS"

    def scores(folder: Path) -> dict[str, float]:
      rows, _ = piq.evaluate_directory(str(real), str(folder), real_masks_dir=str(masks))
      return {name: score(rows)["physics_iq_score"] for name, score in piq.SCORERS.items()}

    table = {}
    for kind in ("copy", "linear"):
      folder = output / f"baseline-{kind}"
      if not folder.exists():
        write_baseline(benchmark, folder, f.fps, kind)
      table[f"{kind}-last-frame baseline" if kind == "copy" else "linear-extrapolation baseline"] = [scores(folder)]
    if f.checkpoint:
      command = [sys.executable, "-m", "vgpt_jax.physics_iq", f"--checkpoint={f.checkpoint}", f"--fps={f.fps}",
                 f"--benchmark={benchmark}", f"--output={output / 'model'}", f"--runs={f.runs}"]  # fmt: skip
      subprocess.run(command, check=True)
      table["model"] = [scores(output / "model" / f"run-{k}") for k in range(f.runs)]
    print(f"Physics-IQ on {f.scenarios} physics-world scenarios x 3 views x 2 takes, {f.fps} FPS, 5 s scored")
    print("| continuations | Original | Verified | runs |")
    print("|---|---|---|---|")
    for name, runs in table.items():
      cells = []
      for variant in piq.SCORERS:
        values = [r[variant] for r in runs]
        cells.append(f"{np.mean(values):.2f} ± {np.std(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}")
      print(f"| {name} | {' | '.join(cells)} | {len(runs)} |")
    (output / "table.json").write_text(json.dumps(table, indent=2))

  app.run(run)


if __name__ == "__main__":
  main()
