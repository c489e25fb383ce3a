"""Interchange with the reference's released weights (convert.py), and the proof that the Flax model is the
reference model: a small PyTorch reference (tests/reference_model.py: transformers' Phi3Model plus the
reference's embedders and final layer) with random weights is saved as a released folder, imported, and both
networks run on the same inputs, in the training layout (the reference's token order and mask) and in a
KV-cached sampling step with context, with and without Phi-3 LongRoPE."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from configs import tiny
from vgpt_jax import checkpoint, convert, sampler
from vgpt_jax.layout import training_layout

SPECIAL_IDS = (37, 38, 39)  # rows of <img>, </img>, <|diffusion|> in the small vocabulary
LONGROPE = {
  "type": "longrope",
  "short_factor": [1.0 + 0.05 * i for i in range(8)],
  "long_factor": [1.5 + 0.4 * i for i in range(8)],
}
ORIGINAL_MAX = 48  # 18-token segments: 3 frames (54 positions) take the long factors, 2 frames (36) the short


def phi3_json(scaling: bool) -> dict:
  """A small Phi-3 config.json as the reference ships one (heads of 16: 8 RoPE frequencies)."""
  cfg = {
    "architectures": ["Phi3ForCausalLM"],
    "model_type": "phi3",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "intermediate_size": 96,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "vocab_size": 40,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "hidden_act": "silu",
    "max_position_embeddings": 4 * ORIGINAL_MAX if scaling else 4096,
    "sliding_window": None,
    "rope_scaling": LONGROPE if scaling else None,
  }
  if scaling:
    cfg["original_max_position_embeddings"] = ORIGINAL_MAX
  return cfg


def import_config():
  """The run config the import starts from: tiny's pixel tokenizer (8x8x48 latents, 16 tokens per frame)."""
  c = tiny.get_config()
  c.train.batch_size = 2
  return c


@pytest.fixture(scope="module")
def torch_ref():
  torch = pytest.importorskip("torch")
  import reference_model

  return torch, reference_model


def make_reference(torch_ref, directory: Path, scaling: bool, seed: int = 0, channels: int = 48):
  """A released-style folder (model.safetensors, config.json, added_tokens.json) of a random reference model."""
  torch, reference_model = torch_ref
  from safetensors.torch import save_file
  from transformers import Phi3Config

  torch.manual_seed(seed)
  phi3 = phi3_json(scaling)
  fields = copy.deepcopy({k: v for k, v in phi3.items() if k != "architectures"})  # Phi3Config edits its input
  config = Phi3Config(**fields, attn_implementation="eager")
  model = reference_model.ReferenceVideoGPT(config, channels=channels, patch=2).eval()
  with torch.no_grad():
    for name, param in model.named_parameters():  # nothing zero (the reference zero-inits its outputs)
      param.copy_(torch.randn_like(param) * (0.3 if param.ndim > 1 else 0.1) + (1.0 if "norm" in name else 0.0))
  directory.mkdir(parents=True, exist_ok=True)
  save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "model.safetensors"))
  (directory / "config.json").write_text(json.dumps(phi3))
  (directory / "added_tokens.json").write_text(json.dumps(dict(zip(convert.SPECIAL_TOKENS, SPECIAL_IDS))))
  return model


@pytest.fixture(scope="module", params=[False, True], ids=["plain_rope", "longrope"])
def imported(request, torch_ref, tmp_path_factory):
  """(torch model, imported workdir, run, params)."""
  root = tmp_path_factory.mktemp("reference")
  model = make_reference(torch_ref, root / "released", scaling=request.param)
  workdir = convert.reference_to_jax(root / "released", root / "imported", import_config())
  run, params, step = checkpoint.load_model(workdir)
  assert step == 0
  return model, workdir, run, params


def inputs(seed: int, b: int, n: int):
  rng = np.random.default_rng(seed)
  clean = rng.normal(size=(b, n, 8, 8, 48)).astype(np.float32)
  noisy = rng.normal(size=(b, n, 8, 8, 48)).astype(np.float32)
  t = rng.uniform(size=(b, n)).astype(np.float32)
  return clean, noisy, t


def reference_out(torch_ref, model, clean, noisy, t, clips, context=0) -> np.ndarray:
  """The torch model's outputs [n_noisy, h, w, C] for one sample (latents channels-last in and out)."""
  torch, _ = torch_ref
  to_nchw = lambda x: torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))  # noqa: E731
  with torch.no_grad():
    out = model(to_nchw(clean), to_nchw(noisy), torch.from_numpy(t), list(clips), SPECIAL_IDS, context=context)
  return out.numpy().transpose(0, 2, 3, 1)


def rel(a, b) -> float:
  return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


def test_rope_scaling_is_imported(imported):
  _, _, run, _ = imported
  scaling = run.model.rope_scaling
  if run.config.model.rope_scaling is None:
    assert scaling is None
    return
  assert scaling.long_factor == tuple(LONGROPE["long_factor"]) and scaling.original_max_positions == ORIGINAL_MAX
  assert scaling.attention_factor == pytest.approx(np.sqrt(1 + np.log(4.0) / np.log(ORIGINAL_MAX)))


def test_training_layout_equals_the_reference(imported, torch_ref):
  """4 frames, two samples with different clip splits, every frame noisy: the project's layout (clean stream
  first) against the reference's order (per clip: noisy frames, then clean), fp32, relative error < 1e-4."""
  model, _, run, params = imported
  clean, noisy, t = inputs(1, 2, 4)
  splits = np.array([[0, 0, 1, 2], [0, 1, 1, 1]], np.int32)
  out = run.model.apply({"params": params}, clean, noisy, t, jnp.asarray(splits), training_layout(4, 16))
  for i in range(2):
    want = reference_out(torch_ref, model, clean[i], noisy[i], t[i], splits[i])
    assert rel(out[i], want) < 1e-4, (i, rel(out[i], want))


@pytest.mark.parametrize("m", [1, 2])
def test_cached_sampling_step_equals_the_reference(imported, torch_ref, m):
  """One denoising step of a 1-frame clip after m context frames through the KV-cached sampler (window m + 1)
  against the reference's full sequence (context clean frames, then the noisy clip); with LongRoPE, m = 1 uses
  the short factors (36 positions <= 48) and m = 2 the long ones (54)."""
  model, _, run, params = imported
  clean, noisy, t = inputs(2, 1, m + 1)
  window = m + 1
  cache = sampler.extend_cache(run, window, params, None, jnp.asarray(clean[:, :m]), 0)
  out = sampler.cached_denoise(run, window, params, cache, m, jnp.asarray(noisy[:, m:]), t[0, m])
  clips = [0] * m + [1]
  want = reference_out(torch_ref, model, clean[0], noisy[0], np.full(m + 1, t[0, m], np.float32), clips, context=m)
  assert rel(out[0], want) < 1e-4


def test_export_round_trip_and_strict_torch_load(imported, torch_ref, tmp_path):
  """jax-to-reference writes tensors the reference model loads with strict=True and that equal the imported
  ones; importing the export gives back the same parameters bit for bit."""
  torch, _ = torch_ref
  model, workdir, run, params = imported
  exported = convert.jax_to_reference(workdir, tmp_path / "exported")
  from safetensors.torch import load_file

  state = load_file(str(exported / "model.safetensors"))
  model.load_state_dict(state, strict=True)  # every key the reference holds, nothing else, right shapes
  original = load_file(str(Path(workdir).parent / "released" / "model.safetensors"))
  for key, value in state.items():
    if key == "llm.embed_tokens.weight":
      assert torch.equal(value[list(SPECIAL_IDS)], original[key][list(SPECIAL_IDS)])
    else:
      assert torch.equal(value, original[key]), key
  assert json.loads((exported / "config.json").read_text())["hidden_size"] == 64
  again = convert.reference_to_jax(exported, tmp_path / "again", import_config())
  run2, params2, _ = checkpoint.load_model(again)
  assert run2.model.rope_scaling == run.model.rope_scaling  # LongRoPE survives the Phi-3 config.json
  if run.model.rope_scaling is not None:  # written as every transformers version's Phi-3 reads it
    assert set(json.loads((exported / "config.json").read_text())["rope_scaling"]) == {"type", "short_factor",
                                                                                      "long_factor"}  # fmt: skip
  a, b = (traverse_util.flatten_dict(jax.device_get(p), sep="/") for p in (params, params2))
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=key)


def test_strict_loading_names_missing_extra_and_misshaped_tensors(torch_ref, tmp_path):
  from safetensors.numpy import load_file, save_file

  make_reference(torch_ref, tmp_path / "ok", scaling=False)
  tensors = load_file(str(tmp_path / "ok" / "model.safetensors"))
  cases = {
    "missing llm.layers.1.mlp.down_proj.weight": lambda t: t.pop("llm.layers.1.mlp.down_proj.weight"),
    "unexpected llm.layers.2.self_attn.o_proj.weight": lambda t: t.update(
      {"llm.layers.2.self_attn.o_proj.weight": np.zeros((64, 64), np.float32)}
    ),
    "final_layer.linear.bias: shape (191,), expected (192,)": lambda t: t.update(
      {"final_layer.linear.bias": np.zeros(191, np.float32)}
    ),
  }
  for message, damage in cases.items():
    folder = tmp_path / message.split()[0].strip(":").replace(".", "_")
    folder.mkdir()
    broken = dict(tensors)
    damage(broken)
    save_file(broken, str(folder / "model.safetensors"))
    for name in ("config.json", "added_tokens.json"):
      (folder / name).write_text((tmp_path / "ok" / name).read_text())
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
      convert.reference_to_jax(folder, tmp_path / "out", import_config())
    assert not (tmp_path / "out" / "checkpoints").exists()  # nothing half-written


def test_config_fields_that_change_the_math_are_refused():
  with pytest.raises(ValueError, match="num_key_value_heads"):
    convert.model_fields_from_phi3({**phi3_json(False), "num_key_value_heads": 2})
  with pytest.raises(ValueError, match="'lm_head_bias'"):
    convert.model_fields_from_phi3({**phi3_json(False), "lm_head_bias": True})
  with pytest.raises(ValueError, match="'yarn'"):
    convert.model_fields_from_phi3({**phi3_json(False), "rope_scaling": {"type": "yarn", "factor": 2.0}})
  with pytest.raises(ValueError, match="short_mscale"):
    convert.model_fields_from_phi3({**phi3_json(True), "rope_scaling": {**LONGROPE, "short_mscale": 1.0}})


def test_special_token_ids_come_from_the_tokenizer_or_a_flag(tmp_path):
  (tmp_path / "tokenizer.json").write_text(
    json.dumps(
      {
        "model": {"vocab": {"a": 0}},
        "added_tokens": [
          {"id": 7, "content": "<img>"},
          {"id": 8, "content": "</img>"},
          {"id": 9, "content": "<|diffusion|>"},
        ],
      }
    )  # fmt: skip
  )
  assert convert.special_token_ids(tmp_path) == (7, 8, 9)
  assert convert.special_token_ids(tmp_path, "1,2,3") == (1, 2, 3)
  with pytest.raises(ValueError, match="--special_token_ids"):
    convert.special_token_ids(tmp_path / "nothing")


def test_weights_only_checkpoint_starts_runs_but_refuses_resume(imported):
  """A new run's stage-to-stage init (checkpoint.init_from) takes the imported weights; a run pointed at the
  imported workdir itself is told to use init_from instead of resuming."""
  _, workdir, run, params = imported
  from vgpt_jax import parallel, train, train_step

  config = run.config.copy_and_resolve_references()
  config.checkpoint.init_from = str(workdir)
  new_run = train.make_run(config)
  mesh = parallel.make_mesh(config.mesh)
  state = train._initial_state(new_run, mesh, train_step.sharded_abstract_state(new_run, mesh))
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert int(state.step) == 0
  with checkpoint.Checkpointer(workdir, run.config.checkpoint) as ckpt:
    with pytest.raises(checkpoint.IncompatibleCheckpoint, match="init_from"):
      ckpt.restore(train_step.abstract_state(run), data_iter=None)


def test_the_readme_commands_import_sample_and_export(torch_ref, tmp_path):
  """From the command line: convert reference-to-jax, `sample --checkpoint=IMPORTED` end to end (on the run's
  held-out physics videos), then convert jax-to-reference."""
  make_reference(torch_ref, tmp_path / "released", scaling=True)
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}

  def run(*args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done

  imported, samples, exported = tmp_path / "imported", tmp_path / "samples", tmp_path / "exported"
  run("vgpt_jax.convert", "reference-to-jax", f"--reference={tmp_path / 'released'}", f"--out={imported}",
      "--config=configs/tiny.py")  # fmt: skip
  run("vgpt_jax.sample", f"--checkpoint={imported}", f"--output={samples}", "--num_videos=1", "--batch_size=1",
      "--context_frames=2", "--frames=2", "--steps=2")  # fmt: skip
  assert list(samples.glob("*.mp4"))
  run("vgpt_jax.convert", "jax-to-reference", f"--workdir={imported}", f"--out={exported}")
  assert json.loads((exported / "config.json").read_text())["rope_scaling"]["long_factor"] == pytest.approx(
    LONGROPE["long_factor"]
  )
  assert json.loads((exported / "added_tokens.json").read_text())["<|diffusion|>"] == SPECIAL_IDS[2]


def test_pickled_formats_import_alike_and_model_pt_is_v_prediction(torch_ref, tmp_path, monkeypatch):
  """model.pt (v-prediction, the reference script's rule) and pytorch_model.bin shards give the parameters the
  safetensors file gives; torch reads them with weights_only=True, and without torch the error says so."""
  torch, _ = torch_ref
  from safetensors.torch import load_file

  make_reference(torch_ref, tmp_path / "st", scaling=False)
  state = load_file(str(tmp_path / "st" / "model.safetensors"))
  keys = sorted(state)
  for name in ("pt", "bin"):
    (tmp_path / name).mkdir()
    for extra in ("config.json", "added_tokens.json"):
      (tmp_path / name / extra).write_text((tmp_path / "st" / extra).read_text())
  torch.save(state, tmp_path / "pt" / "model.pt")
  (tmp_path / "bin" / "pytorch_model.bin").mkdir()
  half = len(keys) // 2
  torch.save({k: state[k] for k in keys[:half]}, tmp_path / "bin" / "pytorch_model.bin" / "part1.bin")
  torch.save({k: state[k] for k in keys[half:]}, tmp_path / "bin" / "pytorch_model.bin" / "part2.bin")
  runs = {n: checkpoint.load_model(convert.reference_to_jax(tmp_path / n, tmp_path / f"{n}_out", import_config()))
          for n in ("st", "pt", "bin")}  # fmt: skip
  assert {n: r[0].config.diffusion.prediction for n, r in runs.items()} == {"st": "x", "pt": "v", "bin": "x"}
  want = jax.tree.leaves(runs["st"][1])
  for n in ("pt", "bin"):
    for a, b in zip(jax.tree.leaves(runs[n][1]), want):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
  with pytest.raises(ImportError, match="needs torch"):
    convert.read_reference_weights(tmp_path / "pt")
