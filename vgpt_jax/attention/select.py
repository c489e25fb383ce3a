"""`config.model.attention` -> the attention path the model runs.

  dense       the [B, Tq, Tk] mask, materialised (short sequences, tests)
  chunked     pure-JAX flash attention over tiles, empty tiles never visited (any backend; CPU for long sequences)
  pallas_tpu  Pallas/Mosaic TPU kernel (splash-style), same ids, empty tiles skipped
  pallas_gpu  Pallas GPU (Triton) kernel, same ids, empty tiles skipped
  auto        pallas_tpu on TPU, pallas_gpu on GPU; on CPU dense up to DENSE_LIMIT
              score entries, chunked beyond

Every path is split in two (`AttentionPath`): `plan` turns the token ids into
what the kernels read (the dense mask, or padded ids and lists of the tiles to
visit) and runs once per forward pass; `attend` runs in every layer on that
plan. So the mask is not rebuilt in each layer, nor again in the backward
pass. Every path equals the reference `dense.dense_attention`
(tests/test_attention.py and the kernels' own tests). Under a mesh of more
than one device both halves run per device in a shard_map, split over the
sequence too when the `context` axis is > 1 (context_parallel.py).
"""

from __future__ import annotations

import functools

import jax

from vgpt_jax.attention.chunked import tile_plan, tiled_attention
from vgpt_jax.attention.context_parallel import shard_path
from vgpt_jax.attention.dense import masked_attention
from vgpt_jax.attention.mask import dense_mask
from vgpt_jax.attention.path import AttentionPath

ATTENTIONS = ("dense", "chunked", "pallas_tpu", "pallas_gpu", "auto")
GPU_BACKWARD_BLOCK = 64  # the Triton backward's tiles: its dk/dv kernel holds 2 [bk, D] + 3 [bq, bk] float32 tiles
DENSE_LIMIT = 1 << 19  # Tq * Tk score entries up to which dense beats chunked on CPU (BENCHMARKS.md, issue 11)


def _tpu_block(block: int) -> int:
  """Mosaic tiles are multiples of 128 tokens: block is rounded down to one (at least 128)."""
  return max(128, block // 128 * 128)


def _gpu_block(block: int) -> int:
  """Triton tiles must be powers of two, and above 128 they rarely fit a GPU core's memory: block is adapted."""
  return max(16, min(128, 1 << (block.bit_length() - 1)))


def _path(name: str, block: int) -> AttentionPath:
  if name == "dense":
    return AttentionPath("dense", dense_mask, masked_attention)
  if name == "chunked":
    return AttentionPath("chunked", functools.partial(tile_plan, block_q=block, block_k=block), tiled_attention)
  if name == "pallas_tpu":
    from vgpt_jax.attention import pallas_tpu

    b = _tpu_block(block)
    plan = functools.partial(pallas_tpu.tpu_plan, block_q=b, block_k=b)
    return AttentionPath("pallas_tpu", plan, pallas_tpu.tpu_attend)
  if name == "pallas_gpu":
    from vgpt_jax.attention import pallas_gpu

    b = _gpu_block(block)
    bwd = min(b, GPU_BACKWARD_BLOCK)
    plan = functools.partial(pallas_gpu.gpu_plan, block_q=b, block_k=b, bwd_block_q=bwd, bwd_block_k=bwd)
    return AttentionPath("pallas_gpu", plan, pallas_gpu.gpu_attend)
  raise ValueError(f"unknown attention {name!r}; choose one of {list(ATTENTIONS)}")


def resolve(name: str, q_length: int, k_length: int, backend: str | None = None) -> str:
  """The concrete path `name` stands for: `auto` picks by backend and (static) lengths, the others are themselves."""
  if name not in ATTENTIONS:
    raise ValueError(f"unknown attention {name!r}; choose one of {list(ATTENTIONS)}")
  if name != "auto":
    return name
  backend = backend or jax.default_backend()
  if backend == "tpu":
    return "pallas_tpu"
  if backend == "gpu":
    return "pallas_gpu"
  return "dense" if q_length * k_length <= DENSE_LIMIT else "chunked"


def attention_path(name: str, q_length: int, k_length: int, block: int = 512) -> AttentionPath:
  """The path for `config.model.attention` (one of ATTENTIONS) at these sequence lengths, tiles of `block` tokens.

  The lengths are the whole sequence's (the Decoder's queries and keys, before any split over `context`); `auto`
  decides on them. Under a mesh of more than one device the path runs per device (context_parallel.shard_path).
  """
  return shard_path(_path(resolve(name, q_length, k_length), block))
