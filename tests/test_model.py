"""The Video-GPT network: invariances implied by the mask, order equivalence, presets."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vgpt_jax import layout as L
from vgpt_jax.model import PRESETS, VideoGPT, model_config
from vgpt_jax.model.embeddings import patchify, sincos_2d_table, unpatchify
from vgpt_jax.model.transformer import SAVEABLE

N, H, W, C = 5, 4, 6, 3  # 5 frames of 2x3 = 6 tokens (patch 2)


def _model(**overrides) -> VideoGPT:
  cfg = model_config("test")
  cfg.update(overrides)
  return VideoGPT.from_config(cfg)


def _random_params(model, lay, key):
  """Init, then perturb every parameter so zero-initialised layers are not trivially zero."""
  x = jnp.zeros((1, N, H, W, C))
  params = nn.unbox(model.init(key, x, x, jnp.zeros((1, N)), jnp.zeros((1, N), jnp.int32), lay))
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.fold_in(key, 1), len(leaves))
  return jax.tree.unflatten(tree, [p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])


@pytest.fixture(scope="module")
def setup():
  model = _model()
  lay = L.training_layout(N, H * W // 4)
  params = _random_params(model, lay, jax.random.key(0))
  apply = jax.jit(lambda clean, noisy, t, split: model.apply(params, clean, noisy, t, split, lay))
  k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
  inputs = dict(
    clean=jax.random.normal(k1, (2, N, H, W, C)),
    noisy=jax.random.normal(k2, (2, N, H, W, C)),
    t=jax.random.uniform(k3, (2, N)),
  )
  return model, params, lay, apply, inputs


SPLIT = np.array([0, 0, 1, 1, 2], np.int32)  # clips {0,1} {2,3} {4}


def _run(apply, inputs, split=SPLIT):
  return np.asarray(apply(inputs["clean"], inputs["noisy"], inputs["t"], jnp.broadcast_to(split, (2, N))))


def _changed(inputs, field, frames, key=7):
  x = np.array(inputs[field])
  x[:, frames] = np.asarray(jax.random.normal(jax.random.key(key), x[:, frames].shape))
  return dict(inputs, **{field: jnp.asarray(x)})


def test_later_clips_do_not_change_earlier_outputs(setup):
  *_, apply, inputs = setup
  base = _run(apply, inputs)
  # Change every input of the last two clips (frames 2..4): clip 0's output is bit-identical.
  changed = _changed(_changed(inputs, "clean", [2, 3, 4]), "noisy", [2, 3, 4], key=8)
  changed["t"] = inputs["t"].at[:, 2:].set(0.123)
  out = _run(apply, changed)
  np.testing.assert_array_equal(out[:, :2], base[:, :2])
  assert not np.allclose(out[:, 2:], base[:, 2:])  # the later clips did change


def test_other_noisy_clips_do_not_change_a_clip(setup):
  *_, apply, inputs = setup
  base = _run(apply, inputs)
  out = _run(apply, _changed(inputs, "noisy", [0, 1, 4]))  # noisy copies of clips 0 and 2
  np.testing.assert_array_equal(out[:, 2:4], base[:, 2:4])  # clip 1 untouched
  # The clean copy of a clip's own frames and of later frames is invisible to it too.
  out = _run(apply, _changed(inputs, "clean", [2, 3, 4]))
  np.testing.assert_array_equal(out[:, 2:4], base[:, 2:4])


def test_context_and_own_clip_do_change_a_clip(setup):
  """The invariance tests could fail: what a clip may see does move its output."""
  *_, apply, inputs = setup
  base = _run(apply, inputs)
  assert not np.allclose(_run(apply, _changed(inputs, "clean", [0]))[:, 2:4], base[:, 2:4])
  assert not np.allclose(_run(apply, _changed(inputs, "noisy", [3]))[:, 2], base[:, 2])


@pytest.mark.parametrize("sizes", [(2, 2, 1), (1, 4), (3, 1, 1), (1, 1, 1, 1, 1)])
def test_reference_interleaved_order_gives_same_outputs(setup, sizes):
  model, params, lay, apply, inputs = setup
  split = L.fixed_split(sizes)
  ref_lay = L.interleaved_layout(sizes, lay.tokens_per_frame)
  ref = model.apply(params, inputs["clean"], inputs["noisy"], inputs["t"], jnp.broadcast_to(split, (2, N)), ref_lay)
  np.testing.assert_allclose(_run(apply, inputs, split), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_zero_init_output_and_noisy_embedder():
  model = _model()
  lay = L.training_layout(N, H * W // 4)
  x = jax.random.normal(jax.random.key(0), (1, N, H, W, C))
  params = nn.unbox(model.init(jax.random.key(1), x, x, jnp.full((1, N), 0.5), jnp.zeros((1, N), jnp.int32), lay))
  assert not np.any(np.asarray(params["params"]["noisy_embed"]["Dense_0"]["kernel"]))
  assert np.any(np.asarray(params["params"]["clean_embed"]["Dense_0"]["kernel"]))
  out = model.apply(params, x, x, jnp.full((1, N), 0.5), jnp.zeros((1, N), jnp.int32), lay)
  assert out.shape == (1, N, H, W, C) and not np.any(np.asarray(out))


def test_every_parameter_has_logical_axis_names():
  model = _model()
  lay = L.training_layout(N, H * W // 4)
  x = jnp.zeros((1, N, H, W, C))
  boxed = jax.eval_shape(
    lambda: model.init(jax.random.key(0), x, x, jnp.zeros((1, N)), jnp.zeros((1, N), jnp.int32), lay)
  )
  leaves = jax.tree.leaves(boxed, is_leaf=lambda v: isinstance(v, nn.LogicallyPartitioned))
  assert leaves and all(isinstance(v, nn.LogicallyPartitioned) for v in leaves)
  for v in leaves:
    assert len(v.names) == v.value.ndim
    if v.value.ndim >= 1 and "layers" in v.names:
      assert v.names[0] == "layers"  # nn.scan stacks layers on axis 0


@pytest.mark.parametrize(
  "remat", ["full", "dots", "dots_no_batch", ("save_names", ("attention", "mlp_up")), ("save_names", SAVEABLE)]
)
def test_remat_policies_match_no_remat(setup, remat):
  _, params, lay, _, inputs = setup
  split = jnp.broadcast_to(SPLIT, (2, N))
  remat, save = remat if isinstance(remat, tuple) else (remat, ())

  def loss(model, p):
    return jnp.mean(model.apply(p, inputs["clean"], inputs["noisy"], inputs["t"], split, lay) ** 2)

  ref_val, ref_grad = jax.value_and_grad(lambda p: loss(_model(), p))(params)
  val, grad = jax.value_and_grad(lambda p: loss(_model(remat=remat, remat_save=save), p))(params)
  np.testing.assert_allclose(val, ref_val, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), grad, ref_grad)


def test_bfloat16_compute_keeps_fp32_params_and_is_close(setup):
  _, params, lay, apply, inputs = setup
  model = _model(dtype="bfloat16")
  out = model.apply(params, inputs["clean"], inputs["noisy"], inputs["t"], jnp.broadcast_to(SPLIT, (2, N)), lay)
  assert out.dtype == jnp.float32
  ref = _run(apply, inputs)
  assert np.abs(np.asarray(out) - ref).max() < 0.1 * np.abs(ref).max()
  x = jnp.zeros((1, N, H, W, C))
  shapes = jax.eval_shape(
    lambda: nn.unbox(model.init(jax.random.key(0), x, x, jnp.zeros((1, N)), jnp.zeros((1, N), jnp.int32), lay))
  )
  assert {l.dtype for l in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}


def test_patchify_roundtrip_and_sincos_table():
  x = jax.random.normal(jax.random.key(0), (2, 3, 8, 12, 5))
  p = patchify(x, 2)
  assert p.shape == (2, 3, 24, 20)
  np.testing.assert_array_equal(unpatchify(p, 2, 8, 12), x)
  # Patch (row 0, col 1) holds pixels [0:2, 2:4].
  np.testing.assert_array_equal(p[0, 0, 1].reshape(2, 2, 5), x[0, 0, 0:2, 2:4])
  table = sincos_2d_table(16, 3, 4)
  assert table.shape == (12, 16)
  assert len({tuple(r) for r in np.round(table, 6)}) == 12  # every patch position distinct
  # A centre crop of a larger grid: the 3x4 table is the middle of the 5x4 one.
  np.testing.assert_allclose(sincos_2d_table(16, 5, 4)[4:16], table, atol=1e-6)


def _count(preset: str) -> int:
  cfg = model_config(preset)
  model = VideoGPT.from_config(cfg)
  lay = L.training_layout(2, 4)
  x = jnp.zeros((1, 2, 4, 4, 4))
  shapes = jax.eval_shape(
    lambda: model.init(jax.random.key(0), x, x, jnp.zeros((1, 2)), jnp.zeros((1, 2), jnp.int32), lay)
  )
  return sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nn.unbox(shapes)))


def test_paper_preset_parameter_count():
  """Phi-3-mini shape without its 32k-word vocabulary: ~3.66B (reference with vocab ~3.76B)."""
  n = _count("paper")
  cfg = PRESETS["paper"]
  d, f, layers, p, c, freq = cfg["hidden"], cfg["mlp_dim"], cfg["num_layers"], 2, 4, 256
  backbone = layers * (4 * d * d + 3 * d * f + 2 * d) + d
  embedders = 2 * (p * p * c * d + d) + 3 * d
  timestep_mlps = 2 * (freq * d + d + d * d + d)
  final = d * 2 * d + 2 * d + d * p * p * c + p * p * c
  print(f"\npaper preset: {n:,} parameters ({n / 1e9:.3f}B)")
  assert n == backbone + embedders + timestep_mlps + final
  assert 3.6e9 < n < 3.9e9


def test_remat_save_names_keeps_exactly_the_named_activations(capsys):
  """remat="save_names" keeps the activations named in model.remat_save across the layer scan, and only those."""
  from jax.ad_checkpoint import print_saved_residuals

  lay = L.training_layout(N, H * W // 4)
  x, split = jnp.zeros((1, N, H, W, C)), jnp.zeros((1, N), jnp.int32)

  def scan_residuals(save: tuple[str, ...]) -> list[str]:
    model = _model(remat="save_names", remat_save=save)
    params = nn.unbox(model.init(jax.random.key(0), x, x, jnp.zeros((1, N)), split, lay))
    print_saved_residuals(lambda p: jnp.sum(model.apply(p, x, x, jnp.zeros((1, N)), split, lay)), params)
    lines = capsys.readouterr().out.splitlines()
    return sorted(line.split()[0] for line in lines if "output of scan" in line)

  layers, tokens, heads, head_dim = 2, lay.length, 2, 16  # the `test` preset
  base = scan_residuals(())
  kept = scan_residuals(("attention", "mlp_up"))
  added = list(kept)
  for shape in base:
    added.remove(shape)
  assert sorted(added) == sorted([f"f32[{layers},1,{tokens},{heads},{head_dim}]", f"f32[{layers},1,{tokens},64]"])


def test_inputs_of_the_wrong_shape_are_refused_at_the_model_boundary():
  """chex checks the model's inputs: clean and noisy alike, one t and one clip index per frame."""
  model, lay = _model(), L.training_layout(N, H * W // 4)
  x, split = jnp.zeros((1, N, H, W, C)), jnp.zeros((1, N), jnp.int32)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), x, x, jnp.zeros((1, N)), split, lay))
  with pytest.raises(AssertionError):
    jax.eval_shape(lambda p: model.apply(p, x, x[:, :-1], jnp.zeros((1, N)), split, lay), params)
  with pytest.raises(AssertionError):
    jax.eval_shape(lambda p: model.apply(p, x, x, jnp.zeros((1, N - 1)), split, lay), params)
