"""A tiny Physics-IQ-shaped dataset the tests make deterministically (OpenCV's mp4v writer, no randomness that
depends on the machine): 2 scenarios x 3 views, takes 1 and 2 at 8 FPS (5 s, 40 frames, 64x96), and generated
videos named as the benchmark's submissions, some at another size or aspect, or longer than 5 s.

The official code's numbers on these files (tests/physics_iq_official.json) were computed once by running
google-deepmind/physics-IQ-benchmark (code/: generate_binary_masks, process_videos, calculate_iq_score; the
Original workflow) on them; the official code is not part of this repository.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from vgpt_jax.metrics.physics_iq import write_mp4v

FPS = 8
FRAMES = 40  # 5 s
HEIGHT, WIDTH = 64, 96
SCENARIOS = ("trimmed-ball-drop.mp4", "trimmed-domino-push.mp4")
VIEWS = ("perspective-left", "perspective-center", "perspective-right")


def _frames(seed: int, frames: int, height: int, width: int, speed: float, start: float) -> np.ndarray:
  """uint8 BGR [T, H, W, 3]: a textured still background and a bright square that moves from `start`."""
  rng = np.random.default_rng(seed)
  background = (rng.integers(40, 90, size=(8, 12, 3))).astype(np.uint8)
  background = cv2.resize(background, (width, height), interpolation=cv2.INTER_LINEAR)
  out = np.repeat(background[None], frames, axis=0).copy()
  side = max(4, height // 6)
  for t in range(frames):
    x = int(start * width + speed * width * t / frames) % (width - side)
    y = int(height / 2 + height / 4 * np.sin(t / 6.0 + seed)) - side // 2
    out[t, y : y + side, x : x + side] = (230, 220, 200)
  return out


def _write(path: Path, frames: np.ndarray, fps: int) -> None:
  write_mp4v(str(path), frames, fps)


def make_benchmark(root: Path) -> tuple[Path, Path]:
  """(real testing folder, generated folder) under root."""
  real = root / "split-videos" / "testing" / f"{FPS}FPS"
  generated = root / "generated"
  real.mkdir(parents=True)
  generated.mkdir(parents=True)
  file_id = 0
  for s, scenario in enumerate(SCENARIOS):
    for v, view in enumerate(VIEWS):
      seed = 10 * s + v
      for take in (1, 2):
        file_id += 1
        frames = _frames(seed, FRAMES, HEIGHT, WIDTH, speed=0.5, start=0.1 + 0.03 * (take - 1))
        _write(real / f"{file_id:04d}_testing-videos_{FPS}FPS_{view}_take-{take}_{scenario}", frames, FPS)
        if take == 1:
          take1_id = file_id
      # Generated: the same size; a square one; a smaller one of another aspect; one 60 frames long.
      kind = (s * 3 + v) % 4
      size = {0: (HEIGHT, WIDTH), 1: (48, 48), 2: (40, 80), 3: (HEIGHT, WIDTH)}[kind]
      length = 60 if kind == 3 else FRAMES
      frames = _frames(seed + 100, length, *size, speed=0.4 + 0.1 * v, start=0.12)
      _write(generated / f"{take1_id:04d}_{view}_{scenario}", frames, FPS)
  return real, generated
