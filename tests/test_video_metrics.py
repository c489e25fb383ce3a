"""Per-frame PSNR / SSIM / MSE of vgpt_jax.metrics.video against direct definitions."""

import numpy as np
import pytest

from vgpt_jax.metrics import video


def _noisy(rng: np.random.Generator, clean: np.ndarray, scale: float) -> np.ndarray:
  return np.clip(clean + scale * rng.standard_normal(clean.shape), 0.0, 1.0)


def _reference_ssim_frame(x: np.ndarray, y: np.ndarray, data_range: float) -> float:
  """SSIM of one [H, W, C] frame window by window: 2-D Gaussian weights, valid positions, mean over channels."""
  radius = 5
  offsets = np.arange(-radius, radius + 1)
  weights = np.exp(-(offsets[:, None] ** 2 + offsets[None, :] ** 2) / (2 * 1.5**2))
  weights /= weights.sum()
  c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
  values = []
  for c in range(x.shape[2]):
    for i in range(radius, x.shape[0] - radius):
      for j in range(radius, x.shape[1] - radius):
        a = x[i - radius : i + radius + 1, j - radius : j + radius + 1, c]
        b = y[i - radius : i + radius + 1, j - radius : j + radius + 1, c]
        mu_a, mu_b = np.sum(weights * a), np.sum(weights * b)
        var_a = np.sum(weights * (a - mu_a) ** 2)
        var_b = np.sum(weights * (b - mu_b) ** 2)
        cov = np.sum(weights * (a - mu_a) * (b - mu_b))
        values.append(((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)))
  return float(np.mean(values))


def test_mse_per_frame_shape_and_values():
  rng = np.random.default_rng(0)
  pred, truth = rng.random((2, 3, 4, 5, 3)), rng.random((2, 3, 4, 5, 3))
  mse = video.mse_per_frame(pred, truth)
  assert mse.shape == (2, 3)
  np.testing.assert_allclose(mse[1, 2], np.mean((pred[1, 2] - truth[1, 2]) ** 2))


def test_psnr_identical_is_inf():
  frames = np.random.default_rng(1).random((4, 8, 8, 3))
  assert np.all(np.isposinf(video.psnr(frames, frames, 1.0)))


def test_psnr_matches_definition_per_frame():
  rng = np.random.default_rng(2)
  truth = rng.integers(0, 256, (2, 5, 16, 16, 3)).astype(np.uint8)
  pred = rng.integers(0, 256, truth.shape).astype(np.uint8)
  values = video.psnr(pred, truth, 255)
  assert values.shape == (2, 5)
  mse = np.mean((pred.astype(np.float64) - truth.astype(np.float64)) ** 2, axis=(-3, -2, -1))
  np.testing.assert_allclose(values, 10 * np.log10(255.0**2 / mse), rtol=1e-12)
  # The same frames on a [0, 1] scale give the same PSNR.
  np.testing.assert_allclose(video.psnr(pred / 255.0, truth / 255.0, 1.0), values, rtol=1e-10)


def test_ssim_identical_is_one():
  frames = np.random.default_rng(3).random((2, 3, 16, 16, 3))
  np.testing.assert_allclose(video.ssim(frames, frames, 1.0), np.ones((2, 3)), atol=1e-12)


def test_ssim_drops_with_noise():
  rng = np.random.default_rng(4)
  clean = np.repeat(np.linspace(0, 1, 24)[None, :, None], 24, axis=0)[None] * np.ones((1, 1, 1, 3))
  low, high = video.ssim(_noisy(rng, clean, 0.05), clean, 1.0), video.ssim(_noisy(rng, clean, 0.3), clean, 1.0)
  assert 1.0 > low[0] > high[0] > 0.0


def test_ssim_matches_direct_window_reference():
  rng = np.random.default_rng(5)
  truth = rng.random((2, 14, 15, 2))
  pred = _noisy(rng, truth, 0.1)
  values = video.ssim(pred, truth, 1.0)
  assert values.shape == (2,)
  for t in range(2):
    np.testing.assert_allclose(values[t], _reference_ssim_frame(pred[t], truth[t], 1.0), rtol=1e-10)


def test_ssim_matches_skimage():
  metrics = pytest.importorskip("skimage.metrics")
  rng = np.random.default_rng(6)
  truth = rng.random((3, 20, 24, 3))
  pred = _noisy(rng, truth, 0.1)
  expected = [
    metrics.structural_similarity(
      pred[t], truth[t], gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0, channel_axis=-1
    )
    for t in range(3)
  ]
  np.testing.assert_allclose(video.ssim(pred, truth, 1.0), expected, rtol=1e-10)


def test_bad_inputs_name_the_problem():
  a = np.zeros((2, 16, 16, 3))
  with pytest.raises(ValueError, match="shape"):
    video.psnr(a, np.zeros((3, 16, 16, 3)), 1.0)
  with pytest.raises(ValueError, match="data_range"):
    video.ssim(a, a, 0.0)
  with pytest.raises(ValueError, match="window"):
    video.ssim(np.zeros((2, 8, 8, 3)), np.zeros((2, 8, 8, 3)), 1.0)
