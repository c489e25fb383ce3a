"""The model learns motion, not only copying: on a world with one ball at constant velocity, a thousand
steps of training (about 30 s) predict the held-out next frame better than repeating the last context frame; the
diagnosis script reads the same run and shows the prediction depends on the context, and the learning
curve scores each of its checkpoints against training time."""

import pytest

from tests.conftest import small_config
from vgpt_jax.benchmarks import diagnose, learning_curve
from vgpt_jax.rollouts import RolloutRequest
from vgpt_jax.sampler import SamplingConfig
from vgpt_jax.train import train

# About a minute on 2 cores: run with -m slow (recorded in BENCHMARKS.md when an issue is resolved). The tools'
# mechanics run in the default suite (tests/test_evaluate.py).
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def one_ball_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("one_ball")
  cfg = small_config(
    **{
      "data.min_balls": 1,
      "data.max_balls": 1,
      "data.gravity": 0.0,
      "data.occluder_prob": 0.0,
      "data.min_radius": 0.15,
      "data.max_radius": 0.2,
      "data.min_speed": 0.1,
      "data.max_speed": 0.15,
      # 16 tokens of 48 values per frame (patch 1) for a 64-wide model: no token wider than the model.
      "model.patch_size": 1,
      "model.hidden": 64,
      "model.mlp_dim": 192,
      "model.pos_embed_base_size": 192,
      # The recipe measured in BENCHMARKS.md (issue 12): every frame a clip, the unconditional first clip
      # down-weighted, timesteps shifted towards noise.
      "layout.split": "per_frame",
      "diffusion.first_clip_weight": 0.1,
      "diffusion.timestep_shift": 3.0,
      "optim.lr": 2e-3,
      "optim.warmup_steps": 100,
      "train.steps": 1000,
      "train.tensorboard": False,
      "train.log_every": 50,
      "train.num_samples": 32,
      "train.sample_context_frames": 4,
      "train.sample_clip_frames": 1,
      "train.sample_steps": 4,
      "checkpoint.every_steps": 500,  # two points on the learning curve
    }
  )
  return workdir, train(cfg, workdir)


def test_one_ball_at_constant_velocity_is_predicted_better_than_copying(one_ball_run):
  _, summary = one_ball_run
  model, copy = summary["first_frame_mse"], summary["copy_last_first_frame_mse"]
  assert model < 0.75 * copy, f"first predicted frame MSE {model:.5f} vs copying the last frame {copy:.5f}"


def test_diagnose_shows_the_prediction_beats_copying_and_moves_with_the_context(one_ball_run):
  workdir, _ = one_ball_run
  report = diagnose.diagnose(str(workdir), videos=16, context_frames=4)
  rows = report["rows"]
  # 5 frames: only a clip of 1 fits after 4 context frames; one row per flow time.
  assert [(r["clip"], r["t"]) for r in rows] == [(1, t) for t in diagnose.TIMES]
  for r in rows:
    assert r["model"] < r["copy_last"], r
    assert r["change_shuffled"] > 0 and r["change_blanked"] > 0, r  # another video's context, another prediction
  assert 0 < report["splits"]["clip_starts_at_4"] <= 1 and report["splits"]["first_clip_frames"] > 0
  table = diagnose.format_rows(rows).splitlines()
  assert len(table) == 2 + len(rows) and table[2].startswith("| 1 | 0.0 |")


def test_learning_curve_scores_every_checkpoint_against_training_time(one_ball_run, tmp_path):
  workdir, _ = one_ball_run
  sampling = SamplingConfig(steps=4, clip_frames=1)  # as the run's own end-of-run sample
  request = RolloutRequest(str(workdir), num_videos=8, context_frames=4, sampling=sampling, batch_size=16)
  curve = learning_curve.learning_curve(request, tmp_path)
  rows = curve["rows"]
  assert [r["step"] for r in rows] == [500, 1000]
  assert 0 < rows[0]["train_seconds"] < rows[1]["train_seconds"]  # from the run's metrics.jsonl
  assert rows[1]["first_frame_vs_copy"] < 1, rows  # the trained model beats copying on these videos too
  for r in rows:
    assert r["first_frame_vs_copy"] == r["first_frame_mse"] / curve["baselines"]["copy_last"]["first_frame_mse"]
  for name in ("curve.json", "curve.md", "curve.png", "step_500/metrics.json", "step_1000/metrics.json"):
    assert (tmp_path / name).exists(), name
  assert len((tmp_path / "curve.md").read_text().splitlines()) == 2 + len(rows) + 2  # and the two baselines
