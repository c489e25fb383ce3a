"""What more compute buys: a run's held-out scores at each of its checkpoints, against training wall time.

  python -m vgpt_jax.benchmarks.learning_curve --checkpoint=RUN [--num_videos=256 --context_frames=4
      --frames=4 --clip_frames=1 --steps=1 --weights=auto --output=DIR]

The flags are `evaluate`'s (0 for a length means the run's default).

Each saved step is evaluated with `vgpt_jax.evaluate` (FVD off) on the same
held-out videos; its training time is the `time` logged in RUN/metrics.jsonl at
that step (the newest row at or before it). Keep every checkpoint you want on
the curve (`checkpoint.keep_every`; `configs/tiny_learn.py` keeps them all).

Written to DIR (default RUN/learning_curve): curve.json, curve.md (also
printed), curve.png (first predicted frame's MSE and the mean MSE over the
predicted frames, with the copy-last-frame baseline), and each step's
evaluate output in step_S/.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
from absl import app, flags

from vgpt_jax import checkpoint, evaluate, media
from vgpt_jax.rollouts import RolloutRequest, define_flags, request_from_flags

COLUMNS = ("mse", "psnr", "ssim", "physics_iq_spatiotemporal_iou")


def train_seconds(workdir: str | Path) -> dict[int, float]:
  """{logged step: seconds since the training loop started}, from WORKDIR/metrics.jsonl ({} without it).

  A resumed run restarts its clock, so its rows after a restart count from the restart.
  """
  path = Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return {}
  rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  return {int(r["step"]): float(r["time"]) for r in rows if "step" in r and "time" in r}


def seconds_at(times: dict[int, float], step: int) -> float | None:
  """The logged time at `step`, or at the newest logged step before it; None when nothing was logged by then."""
  before = [s for s in times if s <= step]
  return times[max(before)] if before else None


def curve_row(step: int, seconds: float | None, report: dict[str, Any]) -> dict[str, Any]:
  """One step's scores: first predicted frame's MSE (and copy-last-frame's), then the means over the rollout."""
  per_frame, metrics = report["per_frame"], report["metrics"]
  row = {
    "step": step,
    "train_seconds": seconds,
    "first_frame_mse": per_frame["model"]["mse"][0],
    "copy_first_frame_mse": per_frame["copy_last"]["mse"][0],
  }
  row["first_frame_vs_copy"] = row["first_frame_mse"] / row["copy_first_frame_mse"]
  row.update({name: metrics["model"][name] for name in COLUMNS})
  return row


def format_curve(rows: list[dict[str, Any]], baselines: dict[str, dict[str, float]]) -> str:
  """Markdown: one row per checkpoint, then one per baseline (same videos)."""
  head = "| step | train s | first-frame MSE | vs copy | " + " | ".join(COLUMNS) + " |"
  rule = "|---|---|---|---|" + "---|" * len(COLUMNS)
  body = []
  for r in rows:
    seconds = "-" if r["train_seconds"] is None else f"{r['train_seconds']:.0f}"
    cells = [str(r["step"]), seconds, f"{r['first_frame_mse']:.5f}", f"{r['first_frame_vs_copy']:.2f}x"]
    body.append("| " + " | ".join(cells + [f"{r[c]:.4g}" for c in COLUMNS]) + " |")
  for name, metrics in baselines.items():
    first = f"{metrics['first_frame_mse']:.5f}"
    body.append(f"| {name} | - | {first} | - | " + " | ".join(f"{metrics[c]:.4g}" for c in COLUMNS) + " |")
  return "\n".join([head, rule, *body])


def learning_curve(request: RolloutRequest, output: str | Path) -> dict[str, Any]:
  """Evaluates every checkpoint of `request.checkpoint` (a run); returns what curve.json holds."""
  run = request.checkpoint
  steps = checkpoint.saved_steps(run)
  if not steps:
    raise ValueError(f"no checkpoints in {run}: train first, keeping the steps to plot (checkpoint.keep_every)")
  directory = Path(output)
  times = train_seconds(run)
  rows = []
  for step in steps:
    at_step = dataclasses.replace(request, step=step)
    report = evaluate.evaluate(at_step, directory / f"step_{step}", with_fvd=False)
    rows.append(curve_row(step, seconds_at(times, step), report))
  baselines = {  # the same videos at every step: the last report's numbers serve for all
    name: {"first_frame_mse": report["per_frame"][name]["mse"][0], **report["metrics"][name]}
    for name in ("copy_last", "linear")
  }
  table = format_curve(rows, baselines)
  result = {"run": str(run), "videos": report["videos"], "sampling": report["sampling"], "rows": rows}
  result["baselines"] = baselines
  (directory / "curve.json").write_text(json.dumps(result, indent=2))
  (directory / "curve.md").write_text(table + "\n")
  timed = [r for r in rows if r["train_seconds"] is not None]
  if timed:
    x = np.array([r["train_seconds"] for r in timed])
    series = {
      "model, first frame": np.array([r["first_frame_mse"] for r in timed]),
      "model, mean over rollout": np.array([r["mse"] for r in timed]),
      "copy last, first frame": np.full(len(timed), baselines["copy_last"]["first_frame_mse"]),
      "copy last, mean over rollout": np.full(len(timed), baselines["copy_last"]["mse"]),
    }
    title = f"held-out MSE, {result['videos']} videos, {report['context_frames']} context frames"
    media.save_lines(directory / "curve.png", x, series, "training seconds", "MSE (pixels in [0, 1])", title)
  print(table)
  return result


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  if f.step != -1:
    raise app.UsageError("--step does not apply here: every saved checkpoint is evaluated")
  try:
    learning_curve(request_from_flags(), f.output or str(Path(f.checkpoint) / "learning_curve"))
  except (ValueError, checkpoint.CheckpointError) as e:
    raise SystemExit(f"learning_curve: {e}") from None


if __name__ == "__main__":
  define_flags(num_videos=256, batch_size=16)
  flags.DEFINE_string("output", "", "Where to write; default CHECKPOINT/learning_curve.")
  app.run(main)
