"""The evaluate CLI and its baselines (fast, CPU)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import cpu_env
from vgpt_jax import checkpoint, evaluate
from vgpt_jax.benchmarks import diagnose, learning_curve
from vgpt_jax.rollouts import RolloutRequest


def test_baselines_copy_and_extrapolate():
  rng = np.random.default_rng(0)
  context = rng.uniform(-0.2, 0.2, (2, 3, 4, 4, 3)).astype(np.float32)
  copied = evaluate.copy_last(context, 4)
  assert copied.shape == (2, 4, 4, 4, 3)
  np.testing.assert_array_equal(copied, np.repeat(context[:, 2:3], 4, axis=1))
  line = evaluate.linear_extrapolation(context, 2)
  np.testing.assert_allclose(line[:, 1], np.clip(3 * context[:, 2] - 2 * context[:, 1], -1, 1), atol=1e-6)
  ramp = np.linspace(-1, 1, 9, dtype=np.float32)[None, :, None, None, None] * np.ones((1, 9, 2, 2, 3), np.float32)
  np.testing.assert_allclose(evaluate.linear_extrapolation(ramp[:, :3], 6), ramp[:, 3:], atol=1e-6)  # exact on a line


def test_score_ranks_a_perfect_prediction_first_and_includes_fvd(optimized):
  """A moving square: the truth itself scores perfectly; copying the last frame misses all motion."""
  frames = np.full((2, 9, 16, 16, 3), -1.0, np.float32)
  for b in range(2):
    for t in range(9):
      x = 1 + t + b
      frames[b, t, 4:10, x : x + 5] = 1.0
  context, truth = frames[:, :4], frames[:, 4:]
  reference = evaluate.FvdReference(context, truth)
  perfect, curves = evaluate.score(context, truth, truth, reference)
  copied, _ = evaluate.score(context, truth, evaluate.copy_last(context, 5), reference)
  assert perfect["mse"] == 0 and perfect["ssim"] == pytest.approx(1.0)
  assert perfect["physics_iq_spatiotemporal_iou"] == 1.0
  # Masks start at the last context frame (empty for both: IoU 1), then copying shows no motion (IoU 0): 1 / 6.
  assert copied["physics_iq_spatiotemporal_iou"] == pytest.approx(1 / 6)
  assert copied["mse"] > 0.1 and copied["psnr"] < perfect["psnr"]
  assert abs(perfect["fvd"]) < 1e-2 < copied["fvd"]
  assert curves["mse"].shape == (5,)


def test_evaluate_cli_end_to_end(tmp_path, trained_run):
  workdir, out = trained_run, tmp_path / "eval"
  args = ["--num_videos=3", "--context_frames=2", "--frames=4", "--clip_frames=2", "--steps=2", "--nofvd"]
  cmd = [sys.executable, "-m", "vgpt_jax.evaluate", f"--checkpoint={workdir}", f"--output={out}", *args]
  proc = subprocess.run(cmd, env=cpu_env(), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads((out / "metrics.json").read_text())
  assert report["videos"] == 3 and report["predicted_frames"] == 4 and report["fvd"] == "off (--nofvd)"
  assert list(report["metrics"]) == ["model", "copy_last", "linear"]
  for method, metrics in report["metrics"].items():
    assert all(np.isfinite(v) for v in metrics.values()), method
    assert len(report["per_frame"][method]["mse"]) == 4
  assert "| model |" in proc.stdout and (out / "table.md").exists()
  for name in ("per_frame_mse.png", "per_frame_psnr.png", "per_frame_ssim.png", "rollouts.gif"):
    assert (out / name).stat().st_size > 0
  # Shorter than the run's clips (2 + 1 < data.num_frames = 5): the held-out videos are cut, not refused.
  request = RolloutRequest(str(workdir), num_videos=2, context_frames=2, frames=1, batch_size=16)
  short = evaluate.evaluate(request, tmp_path / "short", with_fvd=False)
  assert short["videos"] == 2 and short["predicted_frames"] == 1 and len(short["per_frame"]["model"]["mse"]) == 1
  # The learning-curve and diagnosis tools on the same run: what they compute and write. Whether a trained
  # model beats copying under them is tests/test_learning.py's (slow) check.
  curve = learning_curve.learning_curve(request, tmp_path / "curve")
  assert [r["step"] for r in curve["rows"]] == checkpoint.saved_steps(str(workdir)) == [6]
  row = curve["rows"][0]
  assert row["first_frame_vs_copy"] == row["first_frame_mse"] / curve["baselines"]["copy_last"]["first_frame_mse"]
  for name in ("curve.json", "curve.md", "step_6/metrics.json"):
    assert (tmp_path / "curve" / name).exists(), name
  diagnosis = diagnose.diagnose(str(workdir), videos=2, context_frames=2)
  assert diagnosis["step"] == 6 and diagnosis["videos"] == 2 and diagnosis["rows"]
  assert all(np.isfinite(r["model"]) and np.isfinite(r["copy_last"]) for r in diagnosis["rows"])
  assert len(diagnose.format_rows(diagnosis["rows"]).splitlines()) == 2 + len(diagnosis["rows"])
