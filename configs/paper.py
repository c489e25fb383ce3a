"""The reference Video-GPT: Phi-3-mini-shaped backbone (~3.7B), the SDXL VAE, and its 4-stage recipe.

  python -m vgpt_jax.train --config=configs/paper.py:stage=2 --workdir=gs://.../stage2 \
    --config.tokenizer.vae_path=SDXL_VAE_DIR --config.data.path=VIDEO_DIR \
    --config.checkpoint.init_from=gs://.../stage1
or, with latents pre-encoded by `python -m vgpt_jax.encode`:
    --config.data.source=latents --config.data.latents_path=LATENTS_DIR

Nothing has a default path: without data (data.path, data.manifest or data.latents_path) or without the VAE
(tokenizer.vae_path, a diffusers AutoencoderKL folder such as the released model's vae/) the run is refused
before anything compiles, naming the override to set.

Stages (SPEC section 6), each initialised from the previous one (checkpoint.init_from):
  1: 16 frames, one frame per clip, stride 4
  2: 48 frames, random split, stride 4
  3: 48 frames, random split, stride random 4..12
  4: 80 frames, random split, stride random 4..12
Frames are 176x320 (20x11 = 220 tokens per frame after the VAE's 8x down and patch 2); latents are the VAE's
posterior mean times its scaling factor (0.13025 for SDXL), as the reference encodes.

Optimiser as the reference's scripts actually ran: AdamW lr 1e-4, weight decay 0.1, clip 1.0, constant after a
1000-step warmup (the scripts ask for 320000 scheduler steps, which accelerate steps once per process: 1000
optimiser steps on 320 processes); stages 2-4 with betas (0.9, 0.95) and eps 1e-5; stage 1's script builds
AdamW without the betas and eps it is given, so it ran with torch's defaults (0.9, 0.999) and 1e-8.

Sampling defaults (the end-of-run sample, `sample`, `evaluate`) follow the reference's inference script:
guidance 1.5, 50 Euler steps, clips of 24 frames in a window of 80 frames (56 context frames), clean context
(train.sample_context_noise=False). A stage trained on fewer than 80 frames samples in a window of its own
length, with clips of up to 24 frames and the rest context.
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
# The reference's inference script (LVM/script/inference): --img_guidance_scale=1.5 --num_inference_steps=50
# --gen_nums 24 24 --max_frame_window=80 --clean_image_noise_level=0.
SAMPLE_GUIDANCE, SAMPLE_STEPS, SAMPLE_CLIP_FRAMES, SAMPLE_WINDOW = 1.5, 50, 24, 80


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
  c.tokenizer.kind = "vae"
  c.tokenizer.downsample = 8
  c.tokenizer.vae_path = ""  # required: --config.tokenizer.vae_path=DIR (diffusers AutoencoderKL)
  c.data.source = "video_files"  # or latents (data.latents_path)
  c.data.path = ""  # required: --config.data.path=DIR (or data.manifest=FILE)
  c.data.height, c.data.width = 176, 320
  c.data.num_frames = s["num_frames"]
  c.data.frame_stride = s["frame_stride"]
  c.data.frame_stride_max = s["frame_stride_max"]
  c.layout.split = s["split"]
  if stage == 1:  # the stage-1 script's AdamW(lr, weight_decay): torch's default betas and eps
    c.optim.b2, c.optim.eps = 0.999, 1e-8
  c.train.batch_size = 320  # one video per device on 320 GPUs
  c.train.steps = 100_000
  window = min(SAMPLE_WINDOW, s["num_frames"])
  c.train.sample_window = window
  c.train.sample_clip_frames = min(SAMPLE_CLIP_FRAMES, window // 2)
  c.train.sample_context_frames = window - c.train.sample_clip_frames
  c.train.sample_steps = SAMPLE_STEPS
  c.train.sample_guidance = SAMPLE_GUIDANCE
  c.train.sample_context_noise = False
  return c
