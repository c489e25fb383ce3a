"""The reference Video-GPT: Phi-3-mini-shaped backbone (~3.7B) and its 4-stage recipe.

  python -m vgpt_jax.train --config=configs/paper.py:stage=2 --workdir=gs://.../stage2
Stages (SPEC section 6), each initialised from the previous one:
  1: 16 frames, one frame per clip, stride 4
  2: 48 frames, random split, stride 4
  3: 48 frames, random split, stride random 4..12
  4: 80 frames, random split, stride random 4..12
Frames are 320x176 (20x11 = 220 tokens per frame after 8x down and patch 2).
Until the SDXL VAE and video-file sources land, the tokenizer is the pixel one
with the VAE's 8x down-sampling and the data is the built-in physics world, so
token counts and shapes match the reference exactly.
"""

import ml_collections

from configs import base
from vgpt_jax.model import model_config

STAGES = {
  1: dict(num_frames=16, split="per_frame", frame_stride=4, frame_stride_max=4),
  2: dict(num_frames=48, split="random", frame_stride=4, frame_stride_max=4),
  3: dict(num_frames=48, split="random", frame_stride=4, frame_stride_max=12),
  4: dict(num_frames=80, split="random", frame_stride=4, frame_stride_max=12),
}


def _parse(arg: str | None) -> int:
  """'stage=2' or '2' -> 2."""
  text = (arg or "stage=1").split("=")[-1]
  if not text.isdigit() or int(text) not in STAGES:
    raise ValueError(f"configs/paper.py takes stage=1..4 (e.g. --config=configs/paper.py:stage=2), got {arg!r}")
  return int(text)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  stage = _parse(arg)
  s = STAGES[stage]
  c = base.get_config()
  c.stage = stage
  c.model = model_config("paper")
  c.tokenizer.downsample = 8
  c.data.height, c.data.width = 176, 320
  c.data.num_frames = s["num_frames"]
  c.data.frame_stride = s["frame_stride"]
  c.data.frame_stride_max = s["frame_stride_max"]
  c.data.video_frames = s["num_frames"] * s["frame_stride_max"]
  c.layout.split = s["split"]
  c.train.batch_size = 320  # one video per device on 320 GPUs
  c.train.steps = 100_000
  c.train.sample_context_frames = s["num_frames"] // 2
  return c
