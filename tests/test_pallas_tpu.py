"""The Pallas TPU kernel against the dense reference, run in interpret mode on CPU.

Most tests use TPU interpret mode (`pltpu.InterpretParams`): it simulates TPU memory, fills uninitialised
buffers with NaN and raises on out-of-bounds block reads, so it also checks the scratch initialisation and the
index maps of the compacted tile lists. One test uses the plain Pallas interpreter (`interpret=True`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from vgpt_jax import layout as L
from vgpt_jax.attention import pallas_tpu
from vgpt_jax.attention.chunked import full_tile_map, pad_ids, tile_map
from vgpt_jax.attention.dense import dense_attention
from vgpt_jax.attention.mask import dense_mask
from vgpt_jax.attention.pallas_tpu import _work_list, pallas_tpu_attention, tpu_plan

TPU_INTERPRET = pltpu.InterpretParams()
BLOCK = 128
RANDOM = ml_collections.ConfigDict(dict(split="random", min_clips=2, max_clips=-1))


def random_ids(seed: int, batch: int, frames: int, tokens: int) -> L.TokenIds:
  """Training-layout ids of `batch` independent random clip splits."""
  split = L.sample_splits(jax.random.key(seed), batch, frames, RANDOM)
  return L.token_ids(L.training_layout(frames, tokens), split)


def qkv(seed: int, batch: int, tq: int, tk: int, heads: int, dim: int, dtype=jnp.float32):
  keys = jax.random.split(jax.random.key(seed), 3)
  return tuple(
    jax.random.normal(key, (batch, t, heads, dim), jnp.float32).astype(dtype) for key, t in zip(keys, (tq, tk, tk))
  )


def rel(a: jax.Array, b: jax.Array) -> float:
  a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def kernel(interpret=TPU_INTERPRET, block_q: int = BLOCK, block_k: int = BLOCK):
  return lambda q, k, v, a, b: pallas_tpu_attention(
    q, k, v, a, b, block_q=block_q, block_k=block_k, interpret=interpret
  )


def run(fn, *args):
  """jit and wait: TPU interpret mode runs jnp ops inside io_callbacks, which can deadlock on a small CPU thread
  pool when the main thread dispatches other work (e.g. the dense reference) while a kernel is still running."""
  return jax.block_until_ready(jax.jit(fn)(*args))


def check_against_dense(fn, q, k, v, q_ids, k_ids, seed: int, tol: float = 1e-5) -> dict[str, float]:
  """Forward and (dq, dk, dv) of a random linear loss; returns the relative errors."""
  weights = jax.random.normal(jax.random.key(seed), q.shape)
  loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v, q_ids, k_ids) * weights)  # noqa: E731
  both = lambda f: lambda q, k, v: (f(q, k, v, q_ids, k_ids), jax.grad(loss(f), argnums=(0, 1, 2))(q, k, v))  # noqa: E731
  out, grads = run(both(fn), q, k, v)
  want_out, want_grads = run(both(dense_attention), q, k, v)
  errors = {"out": rel(out, want_out)}
  errors.update({name: rel(g, w) for name, g, w in zip(("dq", "dk", "dv"), grads, want_grads)})
  assert all(e < tol for e in errors.values()), errors
  return errors


def test_forward_and_gradients_equal_dense_with_random_splits():
  """5 frames of 62 patches (576 tokens, 5 x 5 tiles), 2 independent random splits, skipped tiles included."""
  ids = random_ids(seed=1, batch=2, frames=5, tokens=62)
  q, k, v = qkv(2, 2, ids.frame.shape[1], ids.frame.shape[1], heads=2, dim=128)
  padded = pad_ids(ids, 640)
  keep = tile_map(padded, padded, BLOCK, BLOCK)
  assert not bool(jnp.all(keep)) and bool(jnp.any(keep))
  check_against_dense(kernel(), q, k, v, ids, ids, seed=3)


def test_odd_length_needs_padding_and_small_head_dim():
  """3 frames of 37 patches: 195 tokens padded to 256 (the padding queries and keys see nothing); D = 64 padded."""
  ids = random_ids(seed=4, batch=2, frames=3, tokens=37)
  t = ids.frame.shape[1]
  assert t % BLOCK
  q, k, v = qkv(5, 2, t, t, heads=1, dim=64)
  check_against_dense(kernel(), q, k, v, ids, ids, seed=6)


def test_query_and_key_tiles_of_different_sizes_at_the_papers_head_size():
  """block_q = 128, block_k = 256, heads of 96 (zero-padded to 128 lanes): equal to dense, forward and gradients."""
  ids = random_ids(seed=13, batch=1, frames=4, tokens=62)
  t = ids.frame.shape[1]
  q, k, v = qkv(14, 1, t, t, heads=1, dim=96)
  check_against_dense(kernel(block_q=128, block_k=256), q, k, v, ids, ids, seed=15)


def test_skipped_tiles_are_not_computed():
  """NaN values in key tiles that some query tiles skip: those rows (and their dq) stay finite, as 0 * NaN would
  poison a row that ran the tile, and equal dense attention without the NaNs. Plain Pallas interpreter."""
  ids = random_ids(seed=7, batch=1, frames=5, tokens=62)
  t = ids.frame.shape[1]
  lp = -(-t // BLOCK) * BLOCK
  q, k, v = qkv(8, 1, t, t, heads=2, dim=128)
  keep = np.asarray(tile_map(pad_ids(ids, lp), pad_ids(ids, lp), BLOCK, BLOCK))[0]  # [nq, nk]
  stream = np.asarray(ids.stream[0])
  # Key tiles made only of noisy tokens: every clean query tile skips them.
  noisy_tiles = [j for j in range(keep.shape[1]) if (stream[j * BLOCK : (j + 1) * BLOCK] == L.NOISY).all()]
  assert noisy_tiles
  clean_rows = [i for i in range(keep.shape[0]) if not keep[i, noisy_tiles].any()]
  assert clean_rows, keep
  poison = np.zeros(t, bool)
  for j in noisy_tiles:
    poison[j * BLOCK : (j + 1) * BLOCK] = True
  poison = jnp.asarray(poison)[None, :, None, None]
  rows = np.concatenate([np.arange(i * BLOCK, min((i + 1) * BLOCK, t)) for i in clean_rows])
  weights = jax.random.normal(jax.random.key(9), (1, len(rows), 2, 128))

  def out_and_dq(fn, v):
    out, pullback = jax.vjp(lambda q: fn(q, k, v, ids, ids)[:, rows], q)
    return out, pullback(weights)[0][:, rows]

  out, dq = run(functools.partial(out_and_dq, kernel(interpret=True)), jnp.where(poison, jnp.nan, v))
  assert bool(jnp.all(jnp.isfinite(out))) and bool(jnp.all(jnp.isfinite(dq)))
  want_out, want_dq = run(functools.partial(out_and_dq, dense_attention), jnp.where(poison, 0.0, v))
  assert rel(out, want_out) < 1e-5 and rel(dq, want_dq) < 1e-5


@pytest.mark.parametrize("step", ["denoise", "extend"])
def test_queries_against_cached_keys(step):
  """Tq != Tk as in the KV-cached sampler: a clip's tokens (or new clean frames) against cached clean keys plus
  themselves, ids gathered from the sampling layout (see sampling.py and transformer.Attention); block_k 256
  for the extend step (block_q != block_k)."""
  window, tokens, m, g = 6, 62, 3, 2
  lay = L.sampling_layout(window, tokens)
  if step == "denoise":  # the clip's noisy tokens; clips: context 0, the clip 1, the rest 2
    split = np.repeat([0, 1, 2], [m, g, window - m - g]).astype(np.int32)
    new = L.segment_tokens(lay, L.NOISY, m, m + g)
  else:  # extend_cache: clean frames m..m+g-1, all in clip 0
    split = np.zeros(window, np.int32)
    new = L.segment_tokens(lay, L.CLEAN, m, m + g)
  ids = L.token_ids(lay, np.stack([split, split]))
  q_ids = ids[:, new]
  k_ids = jax.tree.map(
    lambda a, b: jnp.concatenate([a, b], axis=1), ids[:, L.segment_tokens(lay, L.CLEAN, 0, m)], q_ids
  )
  tq, tk = q_ids.frame.shape[1], k_ids.frame.shape[1]
  assert tq != tk
  q, k, v = qkv(9, 2, tq, tk, heads=2, dim=128)
  check_against_dense(kernel(block_k=256 if step == "extend" else BLOCK), q, k, v, q_ids, k_ids, seed=10)


def test_bfloat16_forward():
  ids = random_ids(seed=11, batch=1, frames=4, tokens=30)
  t = ids.frame.shape[1]
  q, k, v = qkv(12, 1, t, t, heads=2, dim=128, dtype=jnp.bfloat16)
  out = run(kernel(), q, k, v, ids, ids)
  assert out.dtype == jnp.bfloat16
  assert rel(out, dense_attention(q, k, v, ids, ids)) < 2e-2


@pytest.mark.parametrize("block_q, block_k", [(100, 128), (128, 64), (0, 128), (128, -256)])
def test_bad_block_sizes_raise(block_q, block_k):
  ids = random_ids(seed=0, batch=1, frames=3, tokens=4)
  t = ids.frame.shape[1]
  q, k, v = qkv(0, 1, t, t, heads=1, dim=128)
  with pytest.raises(ValueError, match="multiple of 128"):
    pallas_tpu_attention(q, k, v, ids, ids, block_q=block_q, block_k=block_k, interpret=True)


def test_bad_inputs_raise():
  ids = random_ids(seed=0, batch=1, frames=3, tokens=4)
  t = ids.frame.shape[1]
  q, k, v = qkv(0, 1, t, t, heads=1, dim=128)
  with pytest.raises(ValueError, match="dtype"):
    pallas_tpu_attention(q, k, v.astype(jnp.bfloat16), ids, ids, interpret=True)
  with pytest.raises(ValueError, match="expected"):
    pallas_tpu_attention(q, k, v, ids[:, 1:], ids, interpret=True)
  big = L.TokenIds(ids.frame + 20000, ids.clip, ids.stream, ids.kind, ids.position)
  with pytest.raises(ValueError, match="frame ids"):
    pallas_tpu_attention(q, k, v, big, big, interpret=True)


@pytest.mark.parametrize("seed", range(3))
def test_full_tiles_are_fully_visible(seed):
  """The tiles whose mask the kernel skips have every entry visible, and there are some (the fast path is used)."""
  ids = random_ids(seed=seed, batch=4, frames=6, tokens=14)  # 176 tokens, tiles of 16
  block = 16
  full = np.asarray(full_tile_map(ids, ids, block, block))
  mask = np.asarray(dense_mask(ids, ids))
  b, t, _ = mask.shape
  tiles = mask.reshape(b, t // block, block, t // block, block).all(axis=(2, 4))
  assert full.any()
  assert not (full & ~tiles).any()


def decode(items, steps: int, rows: int, cols: int) -> list[tuple[int, int, int, int]]:
  """(b, row, column, flags) of each of the first `steps` work items."""
  out = []
  for item in np.asarray(items)[:steps]:
    index, flags = int(item) >> 4, int(item) & 15
    out.append((index // (rows * cols), index // cols % rows, index % cols, flags))
  return out


def test_work_list_has_one_step_per_kept_tile():
  """Rows in order, each row's kept tiles ascending with the full bit; a row with nothing kept gets one step that
  runs nothing (its output is still written); no step for a skipped tile (the grid is as long as the list)."""
  keep = jnp.asarray([[[False, True, False, True], [False] * 4, [True] * 4]])
  full = jnp.asarray([[[False, True, False, False], [False] * 4, [True, False, True, False]]])
  items, steps = _work_list(keep, full)
  full_, first, last, run = 1, 2, 4, 8
  assert int(steps) == 2 + 1 + 4
  assert decode(items, int(steps), 3, 4) == [
    (0, 0, 1, run | first | full_),
    (0, 0, 3, run | last),
    (0, 1, 0, first | last),
    (0, 2, 0, run | first | full_),
    (0, 2, 1, run),
    (0, 2, 2, run | full_),
    (0, 2, 3, run | last),
  ]


def test_grid_runs_only_kept_tiles():
  """At 24 frames the plan's grids are as long as the kept tiles (plus one step per empty row), well under the
  nq x nk steps of a grid over every tile."""
  ids = random_ids(seed=3, batch=2, frames=24, tokens=62)
  t = ids.frame.shape[1]
  plan = tpu_plan(ids, ids, block_q=256, block_k=256)
  lp = -(-t // 256) * 256
  keep = np.asarray(tile_map(pad_ids(ids, lp), pad_ids(ids, lp), 256, 256))
  empty_rows, empty_cols = (~keep.any(axis=2)).sum(), (~keep.any(axis=1)).sum()
  assert int(plan.rows[1]) == keep.sum() + empty_rows
  assert int(plan.cols[1]) == keep.sum() + empty_cols
  assert int(plan.rows[1]) < 0.6 * keep.size


def test_vmem_limit_follows_the_chip():
  """The scoped VMEM limit is twice the estimate within 90% of the chip; too-large blocks are refused by name;
  the default 512 blocks fit the smallest TPU VMEM (16 MiB, v4) at the paper's head size."""
  need = pallas_tpu.vmem_bytes(512, 512, 96, 2)
  assert need < 0.9 * 16 * 2**20
  assert pallas_tpu.vmem_limit(need, None, (512, 512)) is None  # off TPU: Mosaic's default
  assert pallas_tpu.vmem_limit(need, 128 * 2**20, (512, 512)) == 2 * need
  assert pallas_tpu.vmem_limit(need, 16 * 2**20, (512, 512)) == int(0.9 * 16 * 2**20)
  with pytest.raises(ValueError, match="smaller blocks"):
    pallas_tpu.vmem_limit(pallas_tpu.vmem_bytes(2048, 2048, 128, 4), 16 * 2**20, (2048, 2048))


@pytest.mark.parametrize("dtype, dim", [(jnp.bfloat16, 96), (jnp.float32, 128)])
def test_forward_and_backward_lower_for_tpu(dtype, dim, monkeypatch):
  """Cross-platform lowering (no TPU needed): the three kernels (dynamic grids over the work lists) pass Pallas'
  TPU checks and Mosaic lowering rules at the default 512 blocks, each with the scoped VMEM limit of the chip in
  use (here a 16 MiB one, as TPU v4 has). Mosaic's own compiler (layouts, VMEM) runs only on a TPU host."""
  monkeypatch.setattr(pallas_tpu, "_vmem_capacity", lambda: 16 * 2**20)
  ids = random_ids(seed=13, batch=2, frames=5, tokens=62)
  t = ids.frame.shape[1]
  q, k, v = qkv(14, 2, t, t, heads=2, dim=dim, dtype=dtype)
  loss = lambda q, k, v: jnp.sum(pallas_tpu_attention(q, k, v, ids, ids).astype(jnp.float32))  # noqa: E731
  lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, v).lower(lowering_platforms=("tpu",))
  text = lowered.as_text()
  assert text.count("tpu_custom_call") == 3  # forward, dq, dk/dv
  plan = tpu_plan(ids, ids)
  need = pallas_tpu.vmem_bytes(plan.block_q, plan.block_k, dim, jnp.dtype(dtype).itemsize)
  limit = pallas_tpu.vmem_limit(need, 16 * 2**20, (plan.block_q, plan.block_k))
  assert text.count(f"\\22size\\22: {limit}}}") == 3
