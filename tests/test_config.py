"""Configs load, and a bad value is refused with a message naming it, before anything compiles."""

import subprocess
import sys
import time

import pytest

from configs import base, paper, tiny, tiny_learn
from tests.conftest import small_config
from vgpt_jax.config import ConfigError, validate


@pytest.mark.parametrize("get", [base.get_config, tiny.get_config, tiny_learn.get_config])
def test_shipped_configs_are_valid(get):
  validate(get())


@pytest.mark.parametrize("stage", [1, 2, 3, 4])
def test_paper_configs_lack_only_their_paths(stage):
  """The paper stages have no default data or VAE path: validating names those two overrides and nothing else."""
  with pytest.raises(ConfigError) as refused:
    validate(paper.get_config(f"stage={stage}"))
  problems = str(refused.value).split("\n  - ")[1:]
  assert len(problems) == 2, problems
  assert "tokenizer.vae_path" in problems[0] + problems[1] and "data.path" in problems[0] + problems[1]


def test_paper_stages_follow_the_recipe():
  frames = {s: paper.get_config(f"stage={s}").data.num_frames for s in (1, 2, 3, 4)}
  assert frames == {1: 16, 2: 48, 3: 48, 4: 80}
  assert paper.get_config("stage=1").layout.split == "per_frame"
  assert paper.get_config("3").layout.split == "random"
  c = paper.get_config("stage=2")
  assert (c.model.num_layers, c.model.hidden, c.model.num_heads, c.model.mlp_dim) == (32, 3072, 32, 8192)
  assert (c.optim.lr, c.optim.b1, c.optim.b2, c.optim.eps, c.optim.weight_decay, c.optim.grad_clip) == (
    1e-4,
    0.9,
    0.95,
    1e-5,
    0.1,
    1.0,
  )
  # 320x176 frames -> 20x11 = 220 patch tokens, 222 per segment; the SDXL VAE's 8x down.
  assert (c.data.width // 16) * (c.data.height // 16) == 220
  assert (c.tokenizer.kind, c.tokenizer.downsample, c.data.source) == ("vae", 8, "video_files")
  # Stage 1's script builds AdamW without its betas/eps (torch defaults); all stages warm up 1000 steps.
  s1 = paper.get_config("stage=1")
  assert (s1.optim.b1, s1.optim.b2, s1.optim.eps, s1.optim.warmup_steps) == (0.9, 0.999, 1e-8, 1000)
  # Sampling as the reference's inference script: guidance 1.5, 50 steps, clips of 24 in a window of 80.
  s4 = paper.get_config("stage=4")
  tr = s4.train
  assert (tr.sample_guidance, tr.sample_steps, tr.sample_clip_frames, tr.sample_window) == (1.5, 50, 24, 80)
  assert tr.sample_context_frames == 56 and not tr.sample_context_noise
  with pytest.raises(ValueError, match="stage=1..4"):
    paper.get_config("stage=5")


BAD = [
  ({"data.height": 18}, "data.height=18 is not divisible"),
  ({"layout.max_clips": 9}, "layout.max_clips=9 is larger than data.num_frames=5"),
  ({"layout.min_clips": 1}, "layout.min_clips=1 must be >= 2"),
  ({"model.attention": "flash"}, "model.attention='flash' is not a known option"),
  ({"model.remat": "some"}, "model.remat='some' is not a known option"),
  ({"diffusion.prediction": "eps"}, "diffusion.prediction='eps' is not a known option"),
  ({"model.num_heads": 3}, "not divisible by model.num_heads=3"),
  ({"data.num_frames": 40}, "exceeds data.video_frames"),
  ({"layout.split": "fixed", "layout.fixed_clip_sizes": (2, 2)}, "summing to data.num_frames=5"),
  ({"diffusion.context_t_min": 1.5}, "context_t_min"),
  ({"train.sample_context_frames": 5}, "train.sample_context_frames=5"),
]


@pytest.mark.parametrize("overrides,message", BAD)
def test_bad_values_are_refused_with_the_field_named(overrides, message):
  with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
    validate(small_config(**overrides))


def test_all_problems_are_reported_at_once():
  with pytest.raises(ConfigError) as err:
    validate(small_config(**{"data.height": 18, "model.remat": "x"}))
  assert "data.height" in str(err.value) and "model.remat" in str(err.value)


@pytest.fixture(scope="module")
def three_videos(tmp_path_factory):
  from tests.test_video_files import encode, flat_video

  root = tmp_path_factory.mktemp("three_videos")
  for i in range(3):
    encode(root / f"v{i}.mp4", flat_video(i, height=128, width=160))
  return root


BAD_CONFIGS = {
  "clips": (
    ["--config.layout.split=random", "--config.layout.max_clips=20"],
    "layout.max_clips=20 is larger than data.num_frames=8",
  ),
  "held_out_default": (
    ["--config.data.source=video_files", "--config.data.path={videos}"],
    "data.num_eval_videos=256 would hold out all 3 videos",
  ),
  "samples": (["--config.train.num_samples=300"], "train.num_samples=300 is more than the data.num_eval_videos=256"),
  "mesh": (["--config.mesh.data=2"], "needs 2 devices, have 1: set the mesh to fit the 1 devices"),
  "vae": (["--config.tokenizer.kind=vae"], "tokenizer.kind='vae' needs tokenizer.vae_path"),
  "typo": (["--config.train.stepz=5"], "--config.train.stepz: the config has no field 'stepz'; did you mean 'steps'?"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_cli_refuses_a_bad_config_in_seconds_without_compiling(tmp_path, three_videos, case):
  overrides, message = BAD_CONFIGS[case]
  command = [sys.executable, "-m", "vgpt_jax.train", "--config=configs/tiny.py", f"--workdir={tmp_path}"]
  start = time.time()
  proc = subprocess.run(
    command + [o.format(videos=three_videos) for o in overrides], capture_output=True, text=True, timeout=120
  )
  seconds = time.time() - start
  assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr and "compiling the train step" not in proc.stderr
  assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "checkpoints").exists()
  assert seconds < 10, f"refused only after {seconds:.1f}s"
