"""Does a trained run predict from its context, or copy? Teacher-forced checks of one checkpoint.

  python -m vgpt_jax.benchmarks.diagnose --checkpoint=WORKDIR [--weights=params|ema] [--videos=64]
      [--context_frames=4]

On held-out videos, with `context_frames` clean frames and a noisy clip of 1
or 4 frames at flow time t (0 = pure noise, the first sampling step), it
prints the error of the model's x-prediction of the clip's first frame next
to copying the last context frame, how far the prediction lies from that last
frame, and how much it moves when the context is blanked (zeros) or shuffled
across videos: a model that ignores its context moves little. It also prints
how often the run's random clip splits give the geometries sampling uses.
Errors are MSE of pixels in [0, 1].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from vgpt_jax import checkpoint
from vgpt_jax.data.held_out import context_videos
from vgpt_jax.layout import fixed_split, sample_splits, training_layout
from vgpt_jax.metrics import video
from vgpt_jax.run import Run

TIMES = (0.0, 0.5, 0.9)
CLIPS = (1, 4)


def _mse(a: jax.Array, b: jax.Array) -> float:
  """MSE in [0, 1] pixel units of frames in [-1, 1] (halved)."""
  return float(video.mse_per_frame(np.asarray(a)[None] / 2, np.asarray(b)[None] / 2).mean())


def first_frame_prediction(run: Run, params, context: jax.Array, clip: jax.Array, t: float) -> jax.Array:
  """Decoded x-prediction [B, H, W, 3] of the first clip frame; context/clip latents [B, m, ...], [B, g, ...]."""
  b, m, g = context.shape[0], context.shape[1], clip.shape[1]
  layout = training_layout(m + g, run.layout.tokens_per_frame)
  split = jnp.broadcast_to(jnp.asarray(fixed_split((m, g))), (b, m + g))
  eps = jax.random.normal(jax.random.key(0), clip.shape)
  frames = jnp.concatenate([context, t * clip + (1 - t) * eps], axis=1)
  times = jnp.concatenate([jnp.ones((b, m)), jnp.full((b, g), t)], axis=1)
  out = run.model.apply({"params": params}, frames, frames, times, split, layout)
  return run.tokenizer.decode(out[:, m : m + 1])[:, 0]


def context_dependence(run: Run, params, videos: np.ndarray, m: int) -> list[dict]:
  """One row per (clip size, t): model vs copy error and the prediction's change under blanked/shuffled context."""
  x = jnp.asarray(videos)
  latents = run.tokenizer.encode(x)
  truth, last = x[:, m], x[:, m - 1]
  rows = []
  for g in CLIPS:
    if m + g > run.layout.num_frames:
      continue
    clip = latents[:, m : m + g]
    for t in TIMES:
      predict = jax.jit(lambda ctx, t=t: first_frame_prediction(run, params, ctx, clip, t))
      pred = predict(latents[:, :m])
      rows.append(
        dict(
          clip=g,
          t=t,
          model=_mse(pred, truth),
          copy_last=_mse(last, truth),
          to_last_context=_mse(pred, last),
          change_blanked=_mse(predict(jnp.zeros_like(latents[:, :m])), pred),
          change_shuffled=_mse(predict(jnp.roll(latents[:, :m], 1, axis=0)), pred),
        )
      )
  return rows


def split_geometry(run: Run, m: int, samples: int = 20000) -> dict[str, float]:
  """How often training splits start a clip at frame m (of size 1 or N - m); the first clip's share of frames."""
  n = run.layout.num_frames
  splits = np.asarray(sample_splits(jax.random.key(0), samples, n, run.config.layout))
  starts_at_m = splits[:, m] != splits[:, m - 1]
  size_at_m = (splits == splits[:, m : m + 1]).sum(axis=1)
  return {
    "first_clip_frames": float(np.mean(splits == 0)),
    f"clip_starts_at_{m}": float(np.mean(starts_at_m)),
    f"clip_of_1_at_{m}": float(np.mean(starts_at_m & (size_at_m == 1))),
    f"clip_of_{n - m}_at_{m}": float(np.mean(starts_at_m & (size_at_m == n - m))),
  }


def format_rows(rows: list[dict]) -> str:
  head = (
    "| clip | t | model | copy_last | model/copy | to last ctx frame | change, ctx blanked | change, ctx shuffled |"
  )
  rule = "|---|---|---|---|---|---|---|---|"
  body = [
    f"| {r['clip']} | {r['t']} | {r['model']:.5f} | {r['copy_last']:.5f} | {r['model'] / r['copy_last']:.2f} | "
    f"{r['to_last_context']:.5f} | {r['change_blanked']:.5f} | {r['change_shuffled']:.5f} |"
    for r in rows
  ]
  return "\n".join([head, rule, *body])


def _define_flags() -> None:
  flags.DEFINE_string("checkpoint", None, "A run's workdir (or its checkpoints directory).")
  flags.DEFINE_enum("weights", "auto", ["auto", "params", "ema"], "auto: EMA when the run kept one.")
  flags.DEFINE_integer("videos", 64, "Held-out videos.")
  flags.DEFINE_integer("context_frames", 4, "Clean context frames before the noisy clip.")
  flags.mark_flag_as_required("checkpoint")


def diagnose(checkpoint_dir: str, weights: str = "auto", videos: int = 64, context_frames: int = 4) -> dict:
  """{"step", "videos", "rows" (context_dependence), "splits" (split_geometry)} for one run's latest checkpoint."""
  run, params, step = checkpoint.load_model(checkpoint_dir, -1, weights)
  clips = np.stack([v for _, v in context_videos(run, videos, run.layout.num_frames)])
  rows = context_dependence(run, params, clips, context_frames)
  return dict(step=step, videos=len(clips), rows=rows, splits=split_geometry(run, context_frames))


def main(argv: list[str]) -> None:
  del argv
  f = flags.FLAGS
  report = diagnose(f.checkpoint, f.weights, f.videos, f.context_frames)
  print(
    f"{f.checkpoint} at step {report['step']} ({f.weights} weights), {report['videos']} held-out videos, "
    f"{f.context_frames} context frames"
  )
  print(format_rows(report["rows"]))
  print("training splits:", {k: round(v, 3) for k, v in report["splits"].items()})


if __name__ == "__main__":
  _define_flags()
  app.run(main)
