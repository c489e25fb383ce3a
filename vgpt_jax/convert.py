"""Interchange with the reference Video-GPT's released weights (PyTorch, GrayShine/Video-GPT layout).

  python -m vgpt_jax.convert reference-to-jax --reference=DIR --out=WORKDIR [--config=configs/paper.py:stage=4]
  python -m vgpt_jax.convert jax-to-reference --workdir=WORKDIR --out=DIR [--step=N] [--ema]

reference-to-jax reads the reference's folder (SPEC section 11): its transformer weights (`model.safetensors`,
`model-*.safetensors` shards, `model.pt`, or `pytorch_model.bin` as a file or a folder of shards; the `.pt`/`.bin`
files need torch, read with `weights_only=True` so a file cannot run code), its Phi-3 `config.json`, its
tokenizer files (for the rows of `<img>`, `</img>` and `<|diffusion|>` in `embed_tokens`; or pass
--special_token_ids) and its diffusers `vae/`. It writes WORKDIR: a weights-only checkpoint (step 0) with a full
config (--config, with the model's shape, RoPE and prediction from the reference), the VAE copied to WORKDIR/vae,
and WORKDIR/reference.json (the Phi-3 config and the special token ids, for export). `sample`, `evaluate`,
`export` and `--config.checkpoint.init_from` take WORKDIR like a run's.

Loading is strict: every tensor is used (`input_final_layer.*`, an optional head of the reference's training
class that its inference never runs, is the one exception, reported), every parameter is filled, shapes are
checked, and a Phi-3 config field that would change the computation and is not implemented is refused by name.
A checkpoint shipped as `model.pt` is v-prediction, the others x-prediction: the rule of the reference's
inference script.

jax-to-reference writes a run's weights under the reference's key names and layouts (`model.safetensors`,
float32), a Phi-3 `config.json` matching them, `added_tokens.json` naming the special tokens' rows, and the
run's VAE as `vae/`; the reference's `LVM` class loads them with strict=True. The rows of `embed_tokens` other
than the three special tokens are zeros (the model never reads them).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import traverse_util

from vgpt_jax import checkpoint
from vgpt_jax.layout import SPECIAL_DIFF, SPECIAL_END_IMG, SPECIAL_IMG
from vgpt_jax.model.embeddings import sincos_2d_table

# The reference's special tokens, in the order of the project's `special_tokens` rows (layout.SPECIAL_*).
SPECIAL_TOKENS = ("<img>", "</img>", "<|diffusion|>")
assert (SPECIAL_IMG, SPECIAL_END_IMG, SPECIAL_DIFF) == (0, 1, 2)
REFERENCE_JSON = "reference.json"
REFERENCE_POS_BASE = 64  # LVM's get_2d_sincos_pos_embed(..., base_size=64)
# What the reference's LVM(config) constructor builds (its from_pretrained passes only the Phi-3 config).
REFERENCE_LVM_DEFAULTS = {"patch_size": 2, "latent channels": 4, "pos_embed_max_size": 192}
IGNORED_PREFIXES = ("input_final_layer.",)  # LVMTraining.init_input_final_layer: a training-only head

# Phi-3 config fields: the ones read, and the ones that do not change what the reference computes.
_PHI3_READ = (
  "hidden_size",
  "num_hidden_layers",
  "num_attention_heads",
  "num_key_value_heads",
  "intermediate_size",
  "rms_norm_eps",
  "rope_theta",
  "rope_scaling",
  "max_position_embeddings",
  "original_max_position_embeddings",
  "hidden_act",
  "vocab_size",
  "partial_rotary_factor",
  "head_dim",
  "attention_bias",
)
_PHI3_NEUTRAL = (
  "_name_or_path",
  "architectures",
  "auto_map",
  "model_type",
  "torch_dtype",
  "dtype",
  "transformers_version",
  "bos_token_id",
  "eos_token_id",
  "pad_token_id",
  "initializer_range",
  "use_cache",
  "tie_word_embeddings",
  # Dropout is off at inference; the reference trains with Phi-3's 0.0 defaults.
  "attention_dropout",
  "embd_pdrop",
  "resid_pdrop",
  # The reference passes its own 3D attention mask to every layer, so no sliding window is ever applied.
  "sliding_window",
)
_ROPE_SCALING_KEYS = ("type", "rope_type", "short_factor", "long_factor", "factor", "attention_factor",
                      "original_max_position_embeddings")  # fmt: skip


# ----------------------------------------------------------------------------
# Phi-3 config <-> config.model.


def rope_scaling_from_phi3(phi3: dict[str, Any]) -> dict[str, Any] | None:
  """config.model.rope_scaling from a Phi-3 config: LongRoPE ("su", "longrope") as transformers computes it."""
  scaling = phi3.get("rope_scaling")
  if not scaling:
    return None
  unknown = sorted(set(scaling) - set(_ROPE_SCALING_KEYS))
  if unknown:
    raise ValueError(f"config.json rope_scaling has fields this project does not implement: {unknown}")
  kind = scaling.get("rope_type", scaling.get("type"))
  if kind not in ("su", "longrope"):
    raise ValueError(f"config.json rope_scaling type {kind!r} is not implemented (only Phi-3's 'su'/'longrope')")
  original = scaling.get("original_max_position_embeddings", phi3.get("original_max_position_embeddings"))
  if original is None:
    raise ValueError("config.json rope_scaling needs original_max_position_embeddings")
  factor = scaling.get("factor") or phi3["max_position_embeddings"] / original
  attention_factor = scaling.get("attention_factor")
  if attention_factor is None:
    attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
  return {
    "short_factor": [float(x) for x in scaling["short_factor"]],
    "long_factor": [float(x) for x in scaling["long_factor"]],
    "original_max_positions": int(original),
    "attention_factor": float(attention_factor),
  }


def model_fields_from_phi3(phi3: dict[str, Any]) -> dict[str, Any]:
  """The config.model fields a Phi-3 config fixes; refuses fields that change the math and are not implemented."""
  unknown = sorted(set(phi3) - set(_PHI3_READ) - set(_PHI3_NEUTRAL))
  if unknown:
    raise ValueError(f"config.json has fields this project does not implement (they may change the model): {unknown}")
  heads, hidden = phi3["num_attention_heads"], phi3["hidden_size"]
  problems = []
  if phi3.get("num_key_value_heads", heads) != heads:
    problems.append(f"num_key_value_heads={phi3['num_key_value_heads']} (grouped-query attention) != {heads} heads")
  if phi3.get("hidden_act", "silu") != "silu":
    problems.append(f"hidden_act={phi3['hidden_act']!r} (the backbone's MLP is SwiGLU: silu)")
  if phi3.get("partial_rotary_factor", 1.0) != 1.0:
    problems.append(f"partial_rotary_factor={phi3['partial_rotary_factor']} (RoPE rotates the whole head here)")
  if phi3.get("head_dim", hidden // heads) != hidden // heads:
    problems.append(f"head_dim={phi3['head_dim']} != hidden_size / num_attention_heads")
  if phi3.get("attention_bias", False):
    problems.append("attention_bias=true (the backbone's projections have no bias)")
  if problems:
    raise ValueError("config.json describes a model this project does not implement: " + "; ".join(problems))
  return {
    "num_layers": phi3["num_hidden_layers"],
    "hidden": hidden,
    "num_heads": heads,
    "mlp_dim": phi3["intermediate_size"],
    "norm_eps": float(phi3.get("rms_norm_eps", 1e-5)),
    "rope_theta": float(phi3.get("rope_theta", 10000.0)),
    "rope_scaling": rope_scaling_from_phi3(phi3),
  }


def phi3_from_model(model: ml_collections.ConfigDict, vocab_size: int, base: dict[str, Any] | None) -> dict:
  """A Phi-3 config.json for config.model (starting from `base`, the imported one, when there is one)."""
  phi3 = dict(base or {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "hidden_act": "silu"})
  phi3.update(
    hidden_size=model.hidden,
    num_hidden_layers=model.num_layers,
    num_attention_heads=model.num_heads,
    num_key_value_heads=model.num_heads,
    intermediate_size=model.mlp_dim,
    rms_norm_eps=model.norm_eps,
    rope_theta=model.rope_theta,
    vocab_size=vocab_size,
  )
  phi3.setdefault("max_position_embeddings", 4096)
  scaling = model.rope_scaling
  if scaling is None:
    phi3["rope_scaling"] = None
    return phi3
  kind = (phi3.get("rope_scaling") or {}).get("type", "longrope")
  # The three fields every transformers version's Phi-3 accepts; the attention factor is implied by
  # max_position_embeddings / original_max_position_embeddings, written explicitly only when it is not.
  phi3["rope_scaling"] = {"type": kind, "short_factor": list(scaling.short_factor),
                          "long_factor": list(scaling.long_factor)}  # fmt: skip
  phi3["original_max_position_embeddings"] = scaling.original_max_positions
  implied = rope_scaling_from_phi3(phi3)["attention_factor"]
  if not math.isclose(implied, scaling.attention_factor, rel_tol=1e-12):
    phi3["rope_scaling"]["attention_factor"] = scaling.attention_factor
  return phi3


# ----------------------------------------------------------------------------
# Reading the reference's files.


def _require_torch(path: Path):
  try:
    import torch
  except ImportError:
    raise ImportError(
      f"{path} is a PyTorch pickle: reading it needs torch (pip install torch), only for the conversion"
    ) from None
  return torch


def _torch_file(path: Path) -> dict[str, np.ndarray]:
  torch = _require_torch(path)
  state = torch.load(path, map_location="cpu", weights_only=True)  # plain tensors only: a file cannot run code
  return {k: v.detach().to(torch.float32).numpy() if v.is_floating_point() else v.numpy() for k, v in state.items()}


def _safetensors_file(path: Path) -> dict[str, np.ndarray]:
  from safetensors import safe_open

  out = {}
  with safe_open(str(path), framework="flax") as f:  # jax arrays: bfloat16 reads too
    for key in f.keys():
      out[key] = np.asarray(jax.device_get(f.get_tensor(key)))
  return out


def read_reference_weights(directory: str | Path) -> tuple[dict[str, np.ndarray], str, str]:
  """(tensors by the reference's key names, prediction "x" or "v", the file read) from a reference folder.

  The formats the reference's inference script accepts, in its order: model.pt (v-prediction), then
  model.safetensors, then pytorch_model.bin (a file or a folder of .bin shards); also model-*.safetensors shards.
  """
  d = Path(directory)
  candidates = [
    (d / "model.pt", "v", lambda p: _torch_file(p)),
    (d / "model.safetensors", "x", lambda p: _safetensors_file(p)),
  ]
  for path, prediction, read in candidates:
    if path.is_file():
      return read(path), prediction, str(path)
  shards = sorted(d.glob("model-*.safetensors"))
  if shards:
    return _merge([_safetensors_file(p) for p in shards], shards), "x", str(d / "model-*.safetensors")
  bins = d / "pytorch_model.bin"
  if bins.is_file():
    return _torch_file(bins), "x", str(bins)
  if bins.is_dir() and sorted(bins.glob("*.bin")):
    files = sorted(bins.glob("*.bin"))
    return _merge([_torch_file(p) for p in files], files), "x", str(bins)
  raise FileNotFoundError(
    f"{d} has no reference weights: expected model.pt, model.safetensors, model-*.safetensors shards or "
    "pytorch_model.bin (a file or a folder of .bin shards)"
  )


def _merge(parts: list[dict[str, np.ndarray]], files: list[Path]) -> dict[str, np.ndarray]:
  out: dict[str, np.ndarray] = {}
  for part, path in zip(parts, files):
    twice = sorted(set(part) & set(out))
    if twice:
      raise ValueError(f"{path} repeats tensors of an earlier shard: {twice[:5]}")
    out.update(part)
  return out


def special_token_ids(directory: str | Path, given: str = "") -> tuple[int, int, int]:
  """Rows of `<img>`, `</img>`, `<|diffusion|>` in embed_tokens: from `given` ("IMG,END_IMG,DIFF") or the folder's
  tokenizer files (added_tokens.json, tokenizer.json, tokenizer_config.json)."""
  if given:
    ids = tuple(int(x) for x in given.split(","))
    if len(ids) != 3:
      raise ValueError(f"--special_token_ids takes three ids (<img>, </img>, <|diffusion|>), got {given!r}")
    return ids  # type: ignore[return-value]
  d = Path(directory)
  vocab: dict[str, int] = {}
  if (d / "tokenizer.json").is_file():
    tok = json.loads((d / "tokenizer.json").read_text())
    vocab.update((tok.get("model") or {}).get("vocab") or {})
    vocab.update({t["content"]: t["id"] for t in tok.get("added_tokens", [])})
  if (d / "tokenizer_config.json").is_file():
    decoder = json.loads((d / "tokenizer_config.json").read_text()).get("added_tokens_decoder", {})
    vocab.update({t["content"]: int(i) for i, t in decoder.items()})
  if (d / "added_tokens.json").is_file():
    vocab.update(json.loads((d / "added_tokens.json").read_text()))
  missing = [t for t in SPECIAL_TOKENS if t not in vocab]
  if missing:
    raise ValueError(
      f"{d}: no tokenizer file names {missing} as single tokens (looked in added_tokens.json, tokenizer.json, "
      "tokenizer_config.json); pass their rows of embed_tokens with --special_token_ids=IMG,END_IMG,DIFF"
    )
  return tuple(int(vocab[t]) for t in SPECIAL_TOKENS)  # type: ignore[return-value]


# ----------------------------------------------------------------------------
# Tensors <-> params.


def _patch_kernel(weight: np.ndarray) -> np.ndarray:
  """Conv2d weight [D, C, p, p] -> Dense kernel [(p_row, p_col, C), D] (embeddings.patchify's order)."""
  d, c, p, _ = weight.shape
  return weight.transpose(2, 3, 1, 0).reshape(p * p * c, d)


def _conv_weight(kernel: np.ndarray, channels: int) -> np.ndarray:
  """Inverse of `_patch_kernel`."""
  features, d = kernel.shape
  p = int(round(math.sqrt(features // channels)))
  return kernel.reshape(p, p, channels, d).transpose(3, 2, 0, 1)


def reference_shapes(model: ml_collections.ConfigDict, channels: int, vocab_size: int) -> dict[str, tuple]:
  """Every tensor the reference's LVM holds for this model, with its shape."""
  d, f, p = model.hidden, model.mlp_dim, model.patch_size
  shapes: dict[str, tuple] = {
    "llm.embed_tokens.weight": (vocab_size, d),
    "llm.norm.weight": (d,),
    "pos_embed": (1, model.pos_embed_max_size**2, d),
    "final_layer.adaLN_modulation.1.weight": (2 * d, d),
    "final_layer.adaLN_modulation.1.bias": (2 * d,),
    "final_layer.linear.weight": (p * p * channels, d),
    "final_layer.linear.bias": (p * p * channels,),
  }
  for name in ("x_embedder", "input_x_embedder"):
    shapes[f"{name}.proj.weight"] = (d, channels, p, p)
    shapes[f"{name}.proj.bias"] = (d,)
  for name in ("time_token", "t_embedder"):
    shapes[f"{name}.mlp.0.weight"] = (d, model.time_freq_dim)
    shapes[f"{name}.mlp.0.bias"] = (d,)
    shapes[f"{name}.mlp.2.weight"] = (d, d)
    shapes[f"{name}.mlp.2.bias"] = (d,)
  for i in range(model.num_layers):
    layer = f"llm.layers.{i}."
    shapes[layer + "self_attn.qkv_proj.weight"] = (3 * d, d)
    shapes[layer + "self_attn.o_proj.weight"] = (d, d)
    shapes[layer + "mlp.gate_up_proj.weight"] = (2 * f, d)
    shapes[layer + "mlp.down_proj.weight"] = (d, f)
    shapes[layer + "input_layernorm.weight"] = (d,)
    shapes[layer + "post_attention_layernorm.weight"] = (d,)
  return shapes


def check_tensors(tensors: dict[str, np.ndarray], expected: dict[str, tuple], source: str) -> list[str]:
  """Raise naming every missing, unexpected or mis-shaped tensor; returns the ignored ones (IGNORED_PREFIXES)."""
  ignored = sorted(k for k in tensors if k not in expected and k.startswith(IGNORED_PREFIXES))
  problems = [f"missing {k}" for k in sorted(expected.keys() - tensors.keys())]
  problems += [f"unexpected {k}" for k in sorted(tensors.keys() - expected.keys() - set(ignored))]
  problems += [
    f"{k}: shape {tuple(tensors[k].shape)}, expected {expected[k]}"
    for k in sorted(expected.keys() & tensors.keys())
    if tuple(tensors[k].shape) != expected[k]
  ]
  problems += [
    f"{k}: dtype {tensors[k].dtype} is not floating point"
    for k in sorted(expected.keys() & tensors.keys())
    if not np.issubdtype(np.asarray(tensors[k]).dtype, np.floating) and tensors[k].dtype.name != "bfloat16"
  ]
  if problems:
    raise ValueError(f"{source} does not match its config.json ({len(problems)} problems): " + "; ".join(problems))
  return ignored


def params_from_reference(
  tensors: dict[str, np.ndarray], model: ml_collections.ConfigDict, special_ids: tuple[int, int, int]
) -> dict[str, Any]:
  """The project's params tree (float32 numpy) from the reference's tensors (already checked)."""
  t = {k: np.asarray(v, np.float32) for k, v in tensors.items()}
  d, h, f = model.hidden, model.num_heads, model.mlp_dim
  layers = range(model.num_layers)

  def stack(name: str, fn) -> np.ndarray:
    return np.stack([fn(t[f"llm.layers.{i}.{name}"]) for i in layers])

  def qkv(part: int):
    return lambda w: w[part * d : (part + 1) * d].T.reshape(d, h, d // h)

  def dense(prefix: str) -> dict[str, np.ndarray]:
    return {"kernel": t[prefix + ".weight"].T, "bias": t[prefix + ".bias"]}

  def timestep(prefix: str) -> dict[str, Any]:
    return {"fc1": dense(prefix + ".mlp.0"), "fc2": dense(prefix + ".mlp.2")}

  flat = {
    "clean_embed": {"Dense_0": {"kernel": _patch_kernel(t["input_x_embedder.proj.weight"]),
                                "bias": t["input_x_embedder.proj.bias"]}},
    "noisy_embed": {"Dense_0": {"kernel": _patch_kernel(t["x_embedder.proj.weight"]),
                                "bias": t["x_embedder.proj.bias"]}},
    "special_tokens": t["llm.embed_tokens.weight"][list(special_ids)],
    "time_token": timestep("time_token"),
    "final_time": timestep("t_embedder"),
    "final": {"ada_ln": dense("final_layer.adaLN_modulation.1"), "linear": dense("final_layer.linear")},
    "decoder": {
      "final_norm": {"scale": t["llm.norm.weight"]},
      "layers": {
        "attn": {
          "query": stack("self_attn.qkv_proj.weight", qkv(0)),
          "key": stack("self_attn.qkv_proj.weight", qkv(1)),
          "value": stack("self_attn.qkv_proj.weight", qkv(2)),
          "out": stack("self_attn.o_proj.weight", lambda w: w.T.reshape(h, d // h, d)),
        },
        "attn_norm": {"scale": stack("input_layernorm.weight", lambda w: w)},
        "mlp_norm": {"scale": stack("post_attention_layernorm.weight", lambda w: w)},
        "mlp": {
          "gate": {"kernel": stack("mlp.gate_up_proj.weight", lambda w: w[:f].T)},
          "up": {"kernel": stack("mlp.gate_up_proj.weight", lambda w: w[f:].T)},
          "down": {"kernel": stack("mlp.down_proj.weight", lambda w: w.T)},
        },
      },
    },
  }  # fmt: skip
  return jax.tree.map(np.ascontiguousarray, flat)


def reference_from_params(
  params: Any, model: ml_collections.ConfigDict, channels: int, special_ids: tuple[int, int, int], vocab_size: int
) -> dict[str, np.ndarray]:
  """The reference's tensors (float32, its key names and layouts) from the project's params."""
  p = traverse_util.flatten_dict(jax.tree.map(lambda x: np.asarray(x, np.float32), params), sep="/")
  d = model.hidden
  embed = np.zeros((vocab_size, d), np.float32)
  embed[list(special_ids)] = p["special_tokens"]
  out = {
    "llm.embed_tokens.weight": embed,
    "llm.norm.weight": p["decoder/final_norm/scale"],
    "pos_embed": _pos_embed(model),
    "x_embedder.proj.weight": _conv_weight(p["noisy_embed/Dense_0/kernel"], channels),
    "x_embedder.proj.bias": p["noisy_embed/Dense_0/bias"],
    "input_x_embedder.proj.weight": _conv_weight(p["clean_embed/Dense_0/kernel"], channels),
    "input_x_embedder.proj.bias": p["clean_embed/Dense_0/bias"],
    "final_layer.adaLN_modulation.1.weight": p["final/ada_ln/kernel"].T,
    "final_layer.adaLN_modulation.1.bias": p["final/ada_ln/bias"],
    "final_layer.linear.weight": p["final/linear/kernel"].T,
    "final_layer.linear.bias": p["final/linear/bias"],
  }
  for ours, theirs in (("time_token", "time_token"), ("final_time", "t_embedder")):
    for fc, index in (("fc1", 0), ("fc2", 2)):
      out[f"{theirs}.mlp.{index}.weight"] = p[f"{ours}/{fc}/kernel"].T
      out[f"{theirs}.mlp.{index}.bias"] = p[f"{ours}/{fc}/bias"]
  layer = lambda name: p[f"decoder/layers/{name}"]  # noqa: E731  [L, ...]
  for i in range(model.num_layers):
    prefix = f"llm.layers.{i}."
    q, k, v = (layer(f"attn/{n}")[i].reshape(d, d).T for n in ("query", "key", "value"))
    out[prefix + "self_attn.qkv_proj.weight"] = np.concatenate([q, k, v])
    out[prefix + "self_attn.o_proj.weight"] = layer("attn/out")[i].reshape(d, d).T
    gate, up = layer("mlp/gate/kernel")[i].T, layer("mlp/up/kernel")[i].T
    out[prefix + "mlp.gate_up_proj.weight"] = np.concatenate([gate, up])
    out[prefix + "mlp.down_proj.weight"] = layer("mlp/down/kernel")[i].T
    out[prefix + "input_layernorm.weight"] = layer("attn_norm/scale")[i]
    out[prefix + "post_attention_layernorm.weight"] = layer("mlp_norm/scale")[i]
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


def _pos_embed(model: ml_collections.ConfigDict) -> np.ndarray:
  """The reference's fixed `pos_embed` buffer: the whole max_size x max_size table [1, max_size**2, D]."""
  size = model.pos_embed_max_size
  table = sincos_2d_table(model.hidden, size, size, size, model.pos_embed_base_size)
  return table[None]


# ----------------------------------------------------------------------------
# The two commands.


def reference_to_jax(
  reference: str | Path, out: str | Path, config: ml_collections.ConfigDict, special_ids: str = ""
) -> Path:
  """Import a reference folder into workdir `out` (see the module docstring); returns `out`."""
  from vgpt_jax.export import host_params_target
  from vgpt_jax.run import make_run

  reference, out = Path(reference), Path(out)
  phi3_path = reference / "config.json"
  if not phi3_path.is_file():
    raise FileNotFoundError(f"{reference} has no config.json (the reference's Phi-3 config)")
  phi3 = json.loads(phi3_path.read_text())
  tensors, prediction, source = read_reference_weights(reference)
  ids = special_token_ids(reference, special_ids)

  config = ml_collections.ConfigDict(config.to_dict())
  if "x_embedder.proj.weight" not in tensors:
    raise ValueError(f"{source} has no x_embedder.proj.weight: not a Video-GPT (LVM) checkpoint")
  _, channels, patch, _ = tensors["x_embedder.proj.weight"].shape
  config.model.update(model_fields_from_phi3(phi3))
  config.model.patch_size = int(patch)
  # Fixed in the reference's LVM class, not in its config.json: read back from the tensors where they show.
  config.model.pos_embed_max_size = int(round(math.sqrt(tensors.get("pos_embed", np.zeros((1, 192**2))).shape[1])))
  config.model.pos_embed_base_size = REFERENCE_POS_BASE
  config.model.time_freq_dim = int(tensors.get("time_token.mlp.0.weight", np.zeros((1, 256))).shape[1])
  config.model.param_dtype = "float32"
  config.diffusion.prediction = prediction
  config.train.ema_decay = 0.0  # the released weights are the parameters; there is no EMA to read
  if (reference / "vae").is_dir():  # checked from where it is; copied into `out` once everything passed
    config.tokenizer.kind = "vae"
    config.tokenizer.vae_path = str((reference / "vae").resolve())
  vocab_size = int(phi3.get("vocab_size", max(ids) + 1))
  if max(ids) >= vocab_size:
    raise ValueError(f"special token ids {ids} do not fit embed_tokens of {vocab_size} rows")
  ignored = check_tensors(tensors, reference_shapes(config.model, int(channels), vocab_size), source)
  if ignored:
    logging.info("not imported (a training-only head the reference's inference never runs): %s", ignored)
  want = _pos_embed(config.model)
  if not np.allclose(np.asarray(tensors["pos_embed"], np.float32), want, atol=1e-5):
    raise ValueError(f"{source}: pos_embed is not the 2D sin-cos table of hidden {config.model.hidden} this code uses")
  run = make_run(config)  # builds the model (checks its fields) and the tokenizer, once
  latent_channels = run.latent_shape[2]
  if latent_channels != channels:
    raise ValueError(
      f"the reference's patch embedders take {channels} latent channels but the config's tokenizer "
      f"({config.tokenizer.kind}) gives {latent_channels}: put the reference's vae/ folder beside its weights"
    )

  params = params_from_reference(tensors, config.model, ids)
  expected = traverse_util.flatten_dict(host_params_target(run), sep="/")
  found = traverse_util.flatten_dict(params, sep="/")
  if expected.keys() != found.keys() or any(found[k].shape != expected[k].shape for k in expected):
    raise AssertionError(f"conversion bug: params differ from the model's ({sorted(expected.keys() ^ found.keys())})")
  out.mkdir(parents=True, exist_ok=True)
  if (reference / "vae").is_dir():
    if (out / "vae").exists():
      shutil.rmtree(out / "vae")
    shutil.copytree(reference / "vae", out / "vae")
    config.tokenizer.vae_path = str((out / "vae").resolve())
  checkpoint.save_weights(out, params, config)
  record = {"special_token_ids": dict(zip(SPECIAL_TOKENS, ids)), "phi3_config": phi3, "source": source}
  (out / REFERENCE_JSON).write_text(json.dumps(record, indent=2))
  return out


def jax_to_reference(
  workdir: str | Path, out: str | Path, step: int = -1, ema: bool = False, special_ids: str = ""
) -> Path:
  """Export a run's weights in the reference's layout to folder `out`; returns `out`."""
  from vgpt_jax.export import host_params_target
  from vgpt_jax.run import make_run

  workdir, out = Path(workdir), Path(out)
  config = checkpoint.saved_config(workdir, step)
  run = make_run(config)  # once: with the VAE tokenizer this loads its weights
  params, step = checkpoint.load_params(workdir, host_params_target(run), step, ema=ema)
  imported = json.loads((workdir / REFERENCE_JSON).read_text()) if (workdir / REFERENCE_JSON).is_file() else None
  if special_ids:
    ids = special_token_ids("", special_ids)
  elif imported:
    ids = tuple(imported["special_token_ids"][t] for t in SPECIAL_TOKENS)
  else:
    raise ValueError(
      f"{workdir} was not imported from the reference, so the rows of {list(SPECIAL_TOKENS)} in embed_tokens are "
      "not known: pass --special_token_ids=IMG,END_IMG,DIFF (the reference tokenizer's ids)"
    )
  base = imported["phi3_config"] if imported else None
  vocab_size = max(int((base or {}).get("vocab_size", 0)), max(ids) + 1)
  channels = run.latent_shape[2]
  built = {"patch_size": config.model.patch_size, "latent channels": channels,
           "pos_embed_max_size": config.model.pos_embed_max_size}  # fmt: skip
  differs = {k: v for k, v in built.items() if v != REFERENCE_LVM_DEFAULTS[k]}
  if differs:
    logging.warning(
      "the reference's LVM(config) builds %s; this run has %s, so load it into an LVM constructed with those "
      "arguments", REFERENCE_LVM_DEFAULTS, differs,
    )  # fmt: skip
  tensors = reference_from_params(params, config.model, channels, ids, vocab_size)
  check_tensors(tensors, reference_shapes(config.model, channels, vocab_size), "export")

  from safetensors.numpy import save_file

  out.mkdir(parents=True, exist_ok=True)
  save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt", "vgpt_jax_step": str(step)})
  (out / "config.json").write_text(json.dumps(phi3_from_model(config.model, vocab_size, base), indent=2))
  (out / "added_tokens.json").write_text(json.dumps(dict(zip(SPECIAL_TOKENS, ids)), indent=2))
  if config.tokenizer.kind == "vae" and config.tokenizer.vae_path:
    if (out / "vae").exists():
      shutil.rmtree(out / "vae")
    shutil.copytree(config.tokenizer.vae_path, out / "vae")
  if config.diffusion.prediction != "x":
    logging.warning("the run predicts %s; the reference runs model.safetensors as x", config.diffusion.prediction)
  return out


def main(argv: list[str]) -> None:
  from absl import flags

  f = flags.FLAGS
  if len(argv) != 2 or argv[1] not in ("reference-to-jax", "jax-to-reference"):
    raise app_usage_error()
  if argv[1] == "reference-to-jax":
    if not f.reference or not f.out:
      raise ValueError("reference-to-jax needs --reference=DIR (the reference's folder) and --out=WORKDIR")
    out = reference_to_jax(f.reference, f.out, f.config, f.special_token_ids)
    print(f"imported {f.reference} into {out} (use it as --checkpoint / --workdir / checkpoint.init_from)")
  else:
    if not f.workdir or not f.out:
      raise ValueError("jax-to-reference needs --workdir=RUN and --out=DIR")
    out = jax_to_reference(f.workdir, f.out, f.step, f.ema, f.special_token_ids)
    print(f"wrote {out}/model.safetensors, config.json and added_tokens.json in the reference's layout")


def app_usage_error() -> Exception:
  from absl import app

  return app.UsageError("usage: python -m vgpt_jax.convert reference-to-jax|jax-to-reference --flags (see --help)")


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file(
    "config", "configs/paper.py:stage=4", "reference-to-jax: the run config the imported model gets (its model "
    "shape, RoPE and prediction are then taken from the reference)", lock_config=False
  )  # fmt: skip
  flags.DEFINE_string("reference", None, "reference-to-jax: the reference's folder (weights, config.json, vae/).")
  flags.DEFINE_string("workdir", None, "jax-to-reference: the run to export.")
  flags.DEFINE_string("out", None, "The folder to write.")
  flags.DEFINE_string("special_token_ids", "", "Rows of <img>, </img>, <|diffusion|> in embed_tokens: IMG,END,DIFF.")
  flags.DEFINE_integer("step", -1, "jax-to-reference: checkpoint step (-1: newest).")
  flags.DEFINE_bool("ema", False, "jax-to-reference: export the EMA parameters.")
  app.run(main)
