"""Per-frame PSNR, SSIM and MSE for video prediction.

Each function takes `pred` and `truth` of the same shape [..., T, H, W, C] and
returns float64 [..., T]: one value per frame, so a caller can plot the error
over the rollout horizon (or average it). Pure numpy; jax arrays are accepted
(converted with np.asarray).

  * `data_range`: the span of the pixel scale, 1.0 for [0, 1] and 255 for uint8.
  * PSNR of identical frames is +inf (MSE 0), not capped: average finite
    values only, or clip before averaging if a bound is needed.
  * SSIM (Wang et al. 2004): 11x11 Gaussian window, sigma 1.5, K1 = 0.01,
    K2 = 0.03, population (not sample) statistics, averaged over the window
    positions fully inside the frame ("valid") and over channels. This equals
    skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=..., channel_axis=-1). Frames must
    be at least 11x11.
"""

from __future__ import annotations

from typing import Any

import numpy as np

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03
_CHUNK_FRAMES = 64  # frames filtered at once: bounds the float64 temporaries of SSIM


def _pair(pred: Any, truth: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
  """float64 arrays of the same shape [..., T, H, W, C], or a ValueError saying what is wrong."""
  pred, truth = np.asarray(pred), np.asarray(truth)
  if pred.shape != truth.shape:
    raise ValueError(f"{what}: pred shape {pred.shape} != truth shape {truth.shape}; compare videos of the same shape")
  if pred.ndim < 4:
    raise ValueError(f"{what}: expected videos [..., T, H, W, C], got shape {pred.shape}")
  return pred.astype(np.float64), truth.astype(np.float64)


def _check_range(data_range: float, what: str) -> float:
  data_range = float(data_range)
  if not data_range > 0:
    raise ValueError(f"{what}: data_range must be > 0 (1.0 for [0, 1] pixels, 255 for uint8), got {data_range}")
  return data_range


def mse_per_frame(pred: Any, truth: Any) -> np.ndarray:
  """float64 [..., T]: mean over H, W, C of (pred - truth)^2 for videos [..., T, H, W, C]."""
  pred, truth = _pair(pred, truth, "mse_per_frame")
  return np.mean(np.square(pred - truth), axis=(-3, -2, -1))


def psnr(pred: Any, truth: Any, data_range: float) -> np.ndarray:
  """float64 [..., T]: 10 log10(data_range^2 / MSE) per frame; +inf where the frames are identical."""
  data_range = _check_range(data_range, "psnr")
  mse = mse_per_frame(pred, truth)
  with np.errstate(divide="ignore"):
    return 10.0 * np.log10(data_range**2 / mse)


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
  """float64 [size]: normalised 1-D Gaussian; the SSIM window is its outer product (separable)."""
  x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
  g = np.exp(-(x**2) / (2.0 * sigma**2))
  return g / g.sum()


def _filter_valid(x: np.ndarray, g: np.ndarray) -> np.ndarray:
  """[N, H, W, C] -> [N, H - k + 1, W - k + 1, C]: separable Gaussian weighted mean over every full window."""
  k = g.shape[0]
  h, w = x.shape[1] - k + 1, x.shape[2] - k + 1
  rows = sum(g[i] * x[:, i : i + h] for i in range(k))
  return sum(g[j] * rows[:, :, j : j + w] for j in range(k))


def ssim(pred: Any, truth: Any, data_range: float) -> np.ndarray:
  """float64 [..., T]: mean SSIM per frame (over valid window positions and channels) of videos [..., T, H, W, C]."""
  data_range = _check_range(data_range, "ssim")
  pred, truth = _pair(pred, truth, "ssim")
  height, width, channels = pred.shape[-3:]
  if min(height, width) < SSIM_WINDOW:
    raise ValueError(
      f"ssim: frames are {height}x{width}, smaller than the {SSIM_WINDOW}x{SSIM_WINDOW} window; "
      "use frames of at least that size (resize before scoring)"
    )
  lead = pred.shape[:-3]
  x = pred.reshape(-1, height, width, channels)
  y = truth.reshape(-1, height, width, channels)
  c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
  g = gaussian_window()
  out = np.empty(x.shape[0], np.float64)
  for start in range(0, x.shape[0], _CHUNK_FRAMES):
    xs, ys = x[start : start + _CHUNK_FRAMES], y[start : start + _CHUNK_FRAMES]
    mu_x, mu_y = _filter_valid(xs, g), _filter_valid(ys, g)
    var_x = _filter_valid(xs * xs, g) - mu_x**2
    var_y = _filter_valid(ys * ys, g) - mu_y**2
    cov = _filter_valid(xs * ys, g) - mu_x * mu_y
    numerator = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
    denominator = (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    out[start : start + xs.shape[0]] = np.mean(numerator / denominator, axis=(1, 2, 3))
  return out.reshape(lead)
