"""Write videos people can open: PNG grids, GIFs, MP4s and plots from uint8 frames."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def grid_image(rows: list[np.ndarray], pad: int = 2) -> np.ndarray:
  """Tile videos into one image: each row is uint8 [T, H, W, 3]; rows may differ in T."""
  t_max = max(r.shape[0] for r in rows)
  h, w = rows[0].shape[1:3]
  out = np.full((len(rows) * (h + pad) + pad, t_max * (w + pad) + pad, 3), 255, np.uint8)
  for i, row in enumerate(rows):
    for j, frame in enumerate(row):
      y, x = pad + i * (h + pad), pad + j * (w + pad)
      out[y : y + h, x : x + w] = frame
  return out


def save_png(path: str | Path, image: np.ndarray, scale: int = 1) -> Path:
  """Save uint8 [H, W, 3], nearest-neighbour upscaled so small frames are visible."""
  path = Path(path)
  img = Image.fromarray(image)
  if scale > 1:
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
  img.save(path)
  return path


def save_gif(path: str | Path, frames: np.ndarray, fps: int = 8, scale: int = 1) -> Path:
  """Save uint8 [T, H, W, 3] as a looping GIF."""
  path = Path(path)
  images = [Image.fromarray(f) for f in frames]
  if scale > 1:
    images = [im.resize((im.width * scale, im.height * scale), Image.NEAREST) for im in images]
  images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
  return path


def upscale(frames: np.ndarray, scale: int) -> np.ndarray:
  """Nearest-neighbour upscaling of uint8 [..., H, W, 3] by an integer factor."""
  return frames if scale <= 1 else np.repeat(np.repeat(frames, scale, axis=-3), scale, axis=-2)


def save_mp4(path: str | Path, frames: np.ndarray, fps: int = 8, scale: int = 1, crf: int = 18) -> Path:
  """Save uint8 [T, H, W, 3] as H.264 MP4 (yuv420p, so it plays everywhere; odd sizes are padded by one pixel).

  crf: x264's quality, 18 visually lossless, 0 lossless in luma (tests that read pixels back).
  """
  import av

  path = Path(path)
  frames = upscale(np.asarray(frames, np.uint8), scale)
  t, h, w, _ = frames.shape
  frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
  with av.open(str(path), "w") as container:
    stream = container.add_stream("libx264", rate=fps, options={"crf": str(crf)})
    stream.height, stream.width = frames.shape[1:3]
    stream.pix_fmt = "yuv420p"
    for frame in frames:
      container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
    container.mux(stream.encode())
  return path


def save_lines(
  path: str | Path, x: np.ndarray, series: dict[str, np.ndarray], xlabel: str, ylabel: str, title: str = ""
) -> Path:
  """Save several named lines on one plot as PNG, e.g. per-frame error of a model and its baselines."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  path = Path(path)
  fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
  for name, y in series.items():
    ax.plot(x, y, lw=1.5, marker="o", ms=3, label=name)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path


def save_bars(
  path: str | Path, labels: list[str], series: dict[str, list[float]], ylabel: str, title: str = ""
) -> Path:
  """Save grouped bars as PNG: one group per label, one bar per named series (e.g. a score per category)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  path = Path(path)
  fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(labels) * max(1, len(series)) ** 0.5), 3.5), dpi=100)
  width = 0.8 / max(1, len(series))
  for i, (name, values) in enumerate(series.items()):
    ax.bar(np.arange(len(labels)) + i * width, values, width, label=name)
  ax.set_xticks(np.arange(len(labels)) + width * (len(series) - 1) / 2, labels, rotation=20, ha="right")
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.grid(alpha=0.3, axis="y")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path


def save_curve(path: str | Path, x: np.ndarray, y: np.ndarray, xlabel: str, ylabel: str, title: str = "") -> Path:
  """Save a line plot (log y) as PNG, e.g. the training loss against the step."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  path = Path(path)
  fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
  ax.plot(x, y, lw=1)
  ax.set_yscale("log")
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path
