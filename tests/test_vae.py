"""The Flax SDXL-style VAE against diffusers' AutoencoderKL; strict loading; the per-frame VAE tokenizer.

diffusers and torch are test-only (requirements-test.txt); without them these tests are skipped. They are imported
by the `reference` fixture, not at collection: the worker that runs other modules does not pay 3.4 s for them.
"""

import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from vgpt_jax.model import tokenizer as tok
from vgpt_jax.model.vae import WEIGHTS_NAME, AutoencoderKL, VaeConfig, load_vae
from vgpt_jax.run import make_run

BLOCKS = (32, 32, 64, 64)  # four levels: 8x down like SDXL, at small widths
SCALE, SHIFT = 0.13025, 0.1159
TOL = 1e-4


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def nhwc(t) -> np.ndarray:
  return t.permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, object]:
  """A seeded random diffusers VAE saved in diffusers format: (its directory, the torch nn.Module)."""
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  torch.manual_seed(0)
  model = diffusers.AutoencoderKL(
    block_out_channels=BLOCKS,
    down_block_types=("DownEncoderBlock2D",) * len(BLOCKS),
    up_block_types=("UpDecoderBlock2D",) * len(BLOCKS),
    layers_per_block=1,
    norm_num_groups=8,  # 4-8 channels per group: catches a wrong channel-to-group assignment
    latent_channels=4,
    sample_size=32,
    scaling_factor=SCALE,
    shift_factor=SHIFT,
  ).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      # Default init leaves norm scales at 1 and some biases at 0: make every parameter count.
      if name.endswith("bias"):
        p.normal_(0.0, 0.1)
      elif p.ndim == 1:
        p.copy_(1.0 + 0.3 * torch.randn_like(p))
  directory = tmp_path_factory.mktemp("vae")
  model.save_pretrained(directory)
  return directory, model


@pytest.fixture(scope="module")
def loaded(reference) -> tuple[VaeConfig, dict]:
  return load_vae(reference[0])


@pytest.fixture(scope="module")
def images() -> np.ndarray:
  """float32 [3, 3, 32, 48] (NCHW) in [-1, 1]; not square, so a swapped H/W shows."""
  return np.random.default_rng(0).uniform(-1, 1, (3, 3, 32, 48)).astype(np.float32)


def test_config_is_read_from_diffusers(loaded):
  config, _ = loaded
  assert config.block_out_channels == BLOCKS and config.downsample == 8
  assert (config.scaling_factor, config.shift_factor, config.norm_num_groups) == (SCALE, SHIFT, 8)
  with pytest.raises(ValueError, match="latents_mean"):
    VaeConfig.from_diffusers({"block_out_channels": [32], "latents_mean": [0.0] * 4, "latents_std": [1.0] * 4})


def test_encoder_matches_diffusers(reference, loaded, images):
  import torch

  _, model = reference
  config, params = loaded
  with torch.no_grad():
    want = model.encode(torch.from_numpy(images)).latent_dist
  post = AutoencoderKL(config).apply({"params": params}, jnp.asarray(images.transpose(0, 2, 3, 1)), method="encode")
  assert post.mean.shape == (3, 4, 6, 4)
  assert rel_err(post.mean, nhwc(want.mean)) < TOL
  assert rel_err(post.logvar, nhwc(want.logvar)) < TOL
  assert rel_err(post.std, nhwc(want.std)) < TOL
  tokenizer = tok.VaeTokenizer(params, config)
  z = tokenizer.encode(jnp.asarray(images.transpose(0, 2, 3, 1)))
  assert rel_err(z, (nhwc(want.mean) - SHIFT) * SCALE) < TOL


def test_decoder_matches_diffusers(reference, loaded):
  import torch

  _, model = reference
  config, params = loaded
  z = torch.from_numpy(np.random.default_rng(1).normal(size=(3, 4, 4, 6)).astype(np.float32))
  with torch.no_grad():
    want = nhwc(model.decode(z).sample)
  got = AutoencoderKL(config).apply({"params": params}, jnp.asarray(nhwc(z)), method="decode")
  assert got.shape == (3, 32, 48, 3)
  assert rel_err(got, want) < TOL
  # The tokenizer undoes the scaling: scaled latents (z - shift) * scale decode to the same frames.
  assert rel_err(tok.VaeTokenizer(params, config).decode(jnp.asarray((nhwc(z) - SHIFT) * SCALE)), want) < TOL


def test_sampling_draws_around_the_mean(loaded, images):
  config, params = loaded
  tokenizer = tok.VaeTokenizer(params, config)
  frames = jnp.asarray(images.transpose(0, 2, 3, 1))
  post = tokenizer.posterior(frames)
  key = jax.random.key(3)
  z = tokenizer.encode(frames, key)
  np.testing.assert_array_equal(z, tokenizer.encode(frames, key))
  assert not np.allclose(z, tokenizer.encode(frames, jax.random.key(4)))
  eps = (z / SCALE + SHIFT - post.mean) / post.std  # should be standard normal
  assert abs(float(eps.mean())) < 0.1 and abs(float(eps.std()) - 1.0) < 0.1


def _broken_copy(src: Path, dst: Path, edit) -> Path:
  """Copy a diffusers directory, letting `edit` change its tensors dict."""
  dst.mkdir()
  shutil.copy(src / "config.json", dst / "config.json")
  tensors = safetensors.numpy.load_file(str(src / WEIGHTS_NAME))
  edit(tensors)
  safetensors.numpy.save_file(tensors, str(dst / WEIGHTS_NAME))
  return dst


@pytest.mark.parametrize(
  "kind, edit, named",
  [
    ("missing", lambda t: t.pop("encoder.mid_block.attentions.0.to_k.weight"), "encoder.mid_block.attentions.0.to_k"),
    ("unexpected", lambda t: t.update({"decoder.extra.weight": np.ones(3, np.float32)}), "decoder.extra.weight"),
    (
      "mis-shaped",
      lambda t: t.update({"quant_conv.bias": np.ones(5, np.float32)}),
      "quant_conv.bias",
    ),
  ],
)
def test_loading_is_strict(reference, tmp_path, kind, edit, named):
  broken = _broken_copy(reference[0], tmp_path / "broken", edit)
  with pytest.raises(ValueError, match=kind) as info:
    load_vae(broken)
  assert named in str(info.value)


def test_legacy_attention_names_load(reference, loaded, tmp_path):
  """Older diffusers files name the mid-block attention query/key/value/proj_attn."""
  legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}

  def rename(tensors):
    for name in list(tensors):
      for new, old in legacy.items():
        if f".{new}." in name:
          tensors[name.replace(f".{new}.", f".{old}.")] = tensors.pop(name)

  _, params = load_vae(_broken_copy(reference[0], tmp_path / "legacy", rename))
  jax.tree.map(np.testing.assert_array_equal, params, loaded[1])


def test_tokenizer_is_per_frame_and_chunked(loaded):
  config, params = loaded
  frames = jnp.asarray(np.random.default_rng(2).uniform(-1, 1, (2, 3, 32, 32, 3)).astype(np.float32))
  whole = tok.VaeTokenizer(params, config, frames_per_chunk=0)
  chunked = tok.VaeTokenizer(params, config, frames_per_chunk=4)  # 6 frames: one chunk of 4, a rest of 2
  assert whole.latent_shape(32, 32) == (4, 4, 4)
  z = jax.jit(lambda t, x: t.encode(x))(chunked, frames)  # the tokenizer is a pytree argument
  assert z.shape == (2, 3, 4, 4, 4)
  per_frame = jnp.stack([jnp.stack([whole.encode(frames[b, t][None])[0] for t in range(3)]) for b in range(2)])
  np.testing.assert_allclose(z, per_frame, rtol=1e-5, atol=1e-5)
  out = jax.jit(lambda t, x: t.decode(x))(chunked, z)
  assert out.shape == frames.shape
  np.testing.assert_allclose(out[1, 2], whole.decode(z[1, 2][None])[0], rtol=1e-5, atol=1e-5)


def test_make_tokenizer_vae(reference):
  assert "vae" in tok.TOKENIZERS and "pixel" in tok.TOKENIZERS
  cfg = tok.tokenizer_config(kind="vae", vae_path=str(reference[0]), downsample=8, frames_per_chunk=2)
  tokenizer = tok.make_tokenizer(cfg)
  assert isinstance(tokenizer, tok.VaeTokenizer) and tokenizer.frames_per_chunk == 2
  assert tokenizer.latent_shape(176, 320) == (22, 40, 4)
  cfg.downsample = 4
  with pytest.raises(ValueError, match="downsamples by 8"):
    tok.make_tokenizer(cfg)
  with pytest.raises(ValueError, match="vae_path"):
    tok.make_tokenizer(tok.tokenizer_config(kind="vae", vae_path=""))


def test_vae_latents_are_encoded_once_and_must_match_the_tokenizer(reference, tmp_path):
  """encode.py stores the VAE's latents of whole videos; training on them refuses another VAE's scaling."""
  import json

  from tests.conftest import small_config
  from vgpt_jax import encode
  from vgpt_jax.data import pipeline
  from vgpt_jax.data.latents import LatentSource

  sizes = {"data.height": 32, "data.width": 32, "data.num_train_videos": 3, "data.num_eval_videos": 1}
  vae = {"tokenizer.kind": "vae", "tokenizer.vae_path": str(reference[0]), "tokenizer.downsample": 8}
  cfg = small_config(**sizes, **vae, **{"model.patch_size": 1})
  out = tmp_path / "latents"
  encode.encode(cfg, out, splits=["train", "eval"], max_frames=6, dtype="float32", batch_frames=4)
  tokenizer = tok.make_tokenizer(cfg.tokenizer)
  source = pipeline.make_source(cfg.data, "train")
  lat_cfg = small_config(**sizes, **vae, **{"model.patch_size": 1, "data.source": "latents"})
  lat_cfg.data.latents_path = str(out)
  stored = LatentSource(lat_cfg.data, "train")
  for i in range(3):
    want = tokenizer.encode(jnp.asarray(pipeline.to_float(source.leading_frames(i, 1, 6))))
    np.testing.assert_allclose(stored.record(i)["latents"], want, rtol=1e-5, atol=1e-5)
  assert make_run(lat_cfg).inputs == "latents"
  other = tmp_path / "other_vae"
  shutil.copytree(reference[0], other)
  config = json.loads((other / "config.json").read_text())
  (other / "config.json").write_text(json.dumps({**config, "scaling_factor": 0.5}))
  lat_cfg.tokenizer.vae_path = str(other)
  with pytest.raises(ValueError, match="scaling_factor: encoded with 0.13025, configured 0.5"):
    make_run(lat_cfg)


def test_paper_stage_trains_on_vae_latents_and_refuses_without_paths(reference, tmp_path):
  """configs/paper.py:stage=2 from the command line: without data and VAE paths it stops before compiling,
  naming both overrides; with a tiny latents directory (this VAE) and the model and frames shrunk by overrides
  it trains a few steps and writes its end-of-run sample."""
  import json
  import subprocess
  import sys

  from tests.conftest import cpu_env, small_config
  from vgpt_jax import encode

  refused = subprocess.run(
    [sys.executable, "-m", "vgpt_jax.train", "--config=configs/paper.py:stage=2", f"--workdir={tmp_path / 'no'}"],
    env=cpu_env(), capture_output=True, text=True, timeout=300,
  )  # fmt: skip
  assert refused.returncode != 0
  assert "--config.data.path" in refused.stderr or "data.path" in refused.stderr, refused.stderr[-2000:]
  assert "tokenizer.vae_path" in refused.stderr and "compiled" not in refused.stderr + refused.stdout

  vae = {"tokenizer.kind": "vae", "tokenizer.vae_path": str(reference[0]), "tokenizer.downsample": 8}
  sizes = {"data.height": 32, "data.width": 32, "data.num_train_videos": 4, "data.num_eval_videos": 1}
  latents = tmp_path / "latents"
  encode.encode(small_config(**sizes, **vae), latents, splits=["train", "eval"], max_frames=16, dtype="float32")
  shrink = {
    "data.source": "latents", "data.latents_path": str(latents), "tokenizer.vae_path": str(reference[0]),
    "data.height": 32, "data.width": 32, "data.num_frames": 4, "data.frame_stride": 4, "data.frame_stride_max": 4,
    "model.num_layers": 2, "model.hidden": 32, "model.num_heads": 2, "model.mlp_dim": 64, "model.remat": "none",
    "model.dtype": "float32", "train.batch_size": 2, "train.steps": 2, "train.num_samples": 1,
    "train.sample_window": 4, "train.sample_clip_frames": 1, "train.sample_context_frames": 3,
    "train.sample_steps": 2,
  }  # fmt: skip
  workdir = tmp_path / "run"
  command = [sys.executable, "-m", "vgpt_jax.train", "--config=configs/paper.py:stage=2", f"--workdir={workdir}"]
  command += [f"--config.{k}={v}" for k, v in shrink.items()]
  done = subprocess.run(command, env=cpu_env(), capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["end_step"] == 2 and np.isfinite(summary["loss_last"])
  assert json.loads((workdir / "config.json").read_text())["optim"]["b2"] == 0.95  # stage 2's betas


def test_import_with_the_reference_vae_gets_the_paper_recipe(reference, tmp_path):
  """`convert reference-to-jax` with its default config on a released-style folder with a vae/: the imported
  run uses that VAE (copied) and samples as the reference's inference script does (configs/paper.py:stage=4)."""
  import json
  import subprocess
  import sys

  import reference_model
  import torch

  from tests.conftest import cpu_env
  from tests.test_convert import make_reference

  released = tmp_path / "released"
  make_reference((torch, reference_model), released, scaling=False, channels=4)
  shutil.copytree(reference[0], released / "vae")
  out = tmp_path / "imported"
  command = [sys.executable, "-m", "vgpt_jax.convert", "reference-to-jax", f"--reference={released}", f"--out={out}"]
  done = subprocess.run(command, env=cpu_env(), capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  from vgpt_jax import checkpoint

  config = checkpoint.saved_config(out)
  assert (config.tokenizer.kind, config.tokenizer.vae_path) == ("vae", str((out / "vae").resolve()))
  assert (out / "vae" / "config.json").is_file()
  tr = config.train
  assert (tr.sample_guidance, tr.sample_steps, tr.sample_clip_frames, tr.sample_window) == (1.5, 50, 24, 80)
  assert (config.data.height, config.data.width, config.model.hidden) == (176, 320, 64)
  assert json.loads((out / "reference.json").read_text())["special_token_ids"]["<img>"] == 37
