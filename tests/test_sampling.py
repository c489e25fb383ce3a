"""KV-cached sampling: equal to recomputing everything, equal to the teacher-forced model, and the sample CLI."""

from __future__ import annotations

import functools
import json
import subprocess
import sys

import av
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import cpu_env, small_config
from tests.test_video_files import encode as write_video
from tests.test_video_files import flat_video
from vgpt_jax import checkpoint
from vgpt_jax.layout import fixed_split, training_layout
from vgpt_jax.run import init_params, make_run
from vgpt_jax.sampler import (
  Sampler,
  SamplingConfig,
  cached_denoise,
  check_sampling,
  extend_cache,
  with_run_defaults,
)


@pytest.fixture(scope="module")
def model():
  """The small test model with every parameter perturbed (zero-initialised layers would hide bugs)."""
  setup = make_run(small_config())  # 5 frames of 4 tokens
  params = nn.unbox(jax.jit(lambda key: init_params(setup, key))(jax.random.key(0)))
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
  return setup, params


def latents(setup, key, batch, frames):
  return jax.random.normal(jax.random.key(key), (batch, frames, *setup.latent_shape))


@pytest.mark.parametrize(
  "context_frames, clip_frames, guidance, frames",
  [(2, 2, 1.5, 7), (1, 3, 1.0, 4)],  # both slide the 5-frame window; the first appends to its cache
)
def test_cached_rollout_equals_recomputing_everything(model, context_frames, clip_frames, guidance, frames):
  setup, params = model
  sampler = Sampler(setup, SamplingConfig(steps=3, clip_frames=clip_frames, guidance=guidance))
  context = latents(setup, 2, 2, context_frames)
  keys = jax.random.split(jax.random.key(3), 2)
  cached = sampler.rollout(params, context, keys, frames, cached=True)
  recomputed = sampler.rollout(params, context, keys, frames, cached=False)
  assert cached.shape == (2, frames, *setup.latent_shape)
  assert float(jnp.max(jnp.abs(cached))) > 0.1  # not a trivially small output
  np.testing.assert_allclose(cached, recomputed, rtol=1e-5, atol=2e-5)


def test_context_noise_noises_what_the_model_reads_not_what_it_returns(model):
  """With context_noise the context (given and generated) is fed noised as training feeds it: the clips change,
  the cached and recomputed paths still agree (each frame is noised once, when it joins), and the run's
  train.sample_context_noise is the default when the flag is unset."""
  setup, params = model
  context = latents(setup, 2, 2, 2)
  keys = jax.random.split(jax.random.key(3), 2)
  noised = Sampler(setup, SamplingConfig(steps=2, clip_frames=2, context_noise=True))
  clean = Sampler(setup, SamplingConfig(steps=2, clip_frames=2))
  a, b = (noised.rollout(params, context, keys, 5, cached=c) for c in (True, False))
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-5)
  assert float(jnp.max(jnp.abs(a - clean.rollout(params, context, keys, 5)))) > 1e-3
  cfg = small_config(**{"train.sample_context_noise": True})
  assert with_run_defaults(cfg, 0, 0, None)[2].context_noise is True
  assert with_run_defaults(cfg, 0, 0, SamplingConfig(context_noise=False))[2].context_noise is False


def test_a_denoising_step_is_the_teacher_forced_prediction(model):
  """The cached step's output for clip (m | g) equals the training layout's output for the same inputs."""
  setup, params = model
  n, m, g, b = 5, 2, 2, 3
  video = latents(setup, 4, b, n)
  x_t = latents(setup, 5, b, g)
  t = jnp.float32(0.37)
  extend = jax.jit(functools.partial(extend_cache, setup, n), static_argnames="first")
  cache = extend(params, None, video[:, :1], first=0)
  cache = extend(params, cache, video[:, 1:m], first=1)  # appended in two parts
  got = jax.jit(functools.partial(cached_denoise, setup, n), static_argnames="m")(params, cache, m=m, x=x_t, t=t)
  noisy = jnp.concatenate([video[:, :m], x_t, video[:, m + g :]], axis=1)
  times = jnp.concatenate([jnp.ones((b, m)), jnp.full((b, g), t), jnp.full((b, n - m - g), 0.5)], axis=1)
  split = jnp.broadcast_to(jnp.asarray(fixed_split((m, g, n - m - g))), (b, n))
  apply = jax.jit(lambda p, *a: setup.model.apply({"params": p}, *a, training_layout(n, 4)))
  want = apply(params, video, noisy, times, split)[:, m : m + g]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_a_video_sample_does_not_depend_on_its_batch(model):
  setup, params = model
  sampler = Sampler(setup, SamplingConfig(steps=2, clip_frames=2))
  context = latents(setup, 6, 3, 2)
  keys = jax.random.split(jax.random.key(7), 3)
  together = sampler.rollout(params, context, keys, 4)
  alone = sampler.rollout(params, context[1:2], keys[1:2], 4)
  np.testing.assert_allclose(together[1:2], alone, rtol=1e-5, atol=1e-5)
  assert not np.allclose(together[0], together[1])


def test_impossible_sampling_is_refused(model):
  setup, _ = model
  with pytest.raises(ValueError, match="clip_frames=5 leaves no room for context"):
    check_sampling(setup, SamplingConfig(clip_frames=5), 2)
  with pytest.raises(ValueError, match="window=6 exceeds the trained length"):
    check_sampling(setup, SamplingConfig(clip_frames=1, window=6), 2)


def frame_count(path) -> int:
  with av.open(str(path)) as container:
    return sum(1 for _ in container.decode(video=0))


def test_unset_sampling_choices_default_to_the_runs_end_of_run_sample():
  cfg = small_config(**{"train.sample_steps": 3, "train.sample_clip_frames": 0})  # 5 frames, 2 of context
  assert with_run_defaults(cfg, 0, 0, None) == (2, 3, SamplingConfig(steps=3, clip_frames=3))
  cfg.train.sample_clip_frames = 1
  assert with_run_defaults(cfg, 0, 0, SamplingConfig(steps=0, clip_frames=0, shift=2.0)) == (
    2,
    3,
    SamplingConfig(steps=3, clip_frames=1, shift=2.0),
  )
  asked = SamplingConfig(steps=7, clip_frames=2)
  assert with_run_defaults(cfg, 3, 6, asked) == (3, 6, asked)  # what is given is kept
  del cfg.train.sample_clip_frames  # a run saved before the field (read back by checkpoint.saved_config): one clip
  assert with_run_defaults(checkpoint.with_fields_added_since(cfg), 1, 0, None)[2].clip_frames == 4


def test_sample_cli_writes_videos_frames_and_truth(trained_run, tmp_path):
  out = tmp_path / "samples"
  args = [
    f"--checkpoint={trained_run}",
    f"--output={out}",
    "--num_videos=2",
    "--frames=5",
    "--clip_frames=2",
    "--steps=2",
  ]
  proc = subprocess.run(
    [sys.executable, "-m", "vgpt_jax.sample", *args], env=cpu_env(), capture_output=True, text=True, timeout=300
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "sample: 100%" in proc.stderr  # the progress bar
  report = json.loads((out / "samples.json").read_text())
  assert sorted(report["videos"]) == ["heldout_0000", "heldout_0001"]
  entry = report["videos"]["heldout_0000"]
  # The physics videos have 32 frames: all 5 generated frames have a truth.
  assert entry == {**entry, "context_frames": 2, "generated_frames": 5, "truth_frames": 5}
  assert np.isfinite(entry["mse_vs_truth"])
  for suffix in ("", "_vs_truth"):
    assert frame_count(out / f"heldout_0000{suffix}.mp4") == 7
    assert (out / f"heldout_0000{suffix}.gif").stat().st_size > 0
  assert len(list((out / "heldout_0000_frames").glob("frame_*.png"))) == 7


def test_sample_cli_continues_a_video_file(trained_run, tmp_path):
  video = write_video(tmp_path / "in" / "clip.mp4", flat_video(1, frames=3, height=48, width=64))
  out = tmp_path / "samples"
  args = [f"--checkpoint={trained_run}", f"--context={video}", f"--output={out}", "--frames=2", "--steps=2"]
  proc = subprocess.run(
    [sys.executable, "-m", "vgpt_jax.sample", *args], env=cpu_env(), capture_output=True, text=True, timeout=300
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  entry = json.loads((out / "samples.json").read_text())["videos"]["clip"]
  assert entry["truth_frames"] == 1  # 3 frames: 2 of context, 1 to compare
  assert frame_count(out / "clip.mp4") == 4 and frame_count(out / "clip_vs_truth.mp4") == 3
