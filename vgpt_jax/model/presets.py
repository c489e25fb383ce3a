"""Named model shapes. `paper` is the reference backbone (Phi-3-mini shape, SPEC section 5)."""

from __future__ import annotations

import ml_collections

_COMMON = dict(
  norm_eps=1e-5,
  rope_theta=10000.0,
  rope_scaling=None,  # Phi-3 LongRoPE fields (transformer.RopeScaling), as an imported checkpoint's config says
  time_freq_dim=256,
  pos_embed_max_size=192,
  pos_embed_base_size=64,
  attention="auto",  # Pallas kernels on TPU/GPU; on CPU dense for short sequences, chunked for long
  attention_block=512,
  remat="none",  # transformer.REMAT_POLICIES
  remat_save=(),  # with remat="save_names": the transformer.SAVEABLE activations to keep, e.g. ("attention",)
  dtype="float32",
  param_dtype="float32",
)

PRESETS: dict[str, dict] = {
  # 32 layers, hidden 3072, 32 heads of 96, SwiGLU 8192, latent patch 2: ~3.7B.
  "paper": dict(num_layers=32, hidden=3072, num_heads=32, mlp_dim=8192, patch_size=2, remat="full", dtype="bfloat16"),
  # ~1.2B parameters, heads of 128: the device check's train step (benchmarks/device_check.py).
  "1b": dict(num_layers=24, hidden=2048, num_heads=16, mlp_dim=5504, patch_size=2, remat="full", dtype="bfloat16"),
  # ~100M parameters: for scaling checks and benchmarks.
  "100m": dict(num_layers=12, hidden=768, num_heads=12, mlp_dim=2048, patch_size=2),
  # Trains on 2 CPU cores in minutes.
  "tiny": dict(num_layers=4, hidden=128, num_heads=4, mlp_dim=384, patch_size=2),
  # Smallest that still exercises every code path: unit tests.
  "test": dict(num_layers=2, hidden=32, num_heads=2, mlp_dim=64, patch_size=2),
}


def model_config(name: str) -> ml_collections.ConfigDict:
  """A fresh config.model for preset `name`."""
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
  return ml_collections.ConfigDict({**_COMMON, **PRESETS[name], "preset": name})
