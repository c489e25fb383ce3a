"""`config.model.attention` -> the attention function the model calls.

  dense       the reference: materialises the [B, Tq, Tk] mask (short sequences, tests)
  chunked     pure-JAX tiles with masked tiles skipped (any backend; the CPU default for long sequences)
  pallas_tpu  Pallas/Mosaic TPU kernel (splash-style), same ids, masked tiles skipped
  pallas_gpu  Pallas GPU (Triton) kernel, same ids, masked tiles skipped
  auto        pallas_tpu on TPU, pallas_gpu on GPU; on CPU dense up to DENSE_LIMIT
              score entries, chunked beyond

Every path takes (q, k, v, q_ids, k_ids) and equals the dense reference
(tests/test_attention.py and the kernels' own tests). Under a mesh of more
than one device every path runs per device in a shard_map, split over the
sequence too when the `context` axis is > 1 (context_parallel.py).
"""

from __future__ import annotations

import functools

import jax

from vgpt_jax.attention.chunked import chunked_attention
from vgpt_jax.attention.context_parallel import shard_attention
from vgpt_jax.attention.dense import dense_attention
from vgpt_jax.layout import TokenIds

ATTENTIONS = ("dense", "chunked", "pallas_tpu", "pallas_gpu", "auto")
DENSE_LIMIT = 1 << 22  # Tq * Tk score entries under which the dense path is cheapest on CPU


def _pallas_tpu(q, k, v, q_ids, k_ids, *, block: int):
  """Mosaic tiles are multiples of 128 tokens: block is rounded down to one (at least 128)."""
  from vgpt_jax.attention.pallas_tpu import pallas_tpu_attention

  block = max(128, block // 128 * 128)
  return pallas_tpu_attention(q, k, v, q_ids, k_ids, block_q=block, block_k=block)


def _pallas_gpu(q, k, v, q_ids, k_ids, *, block: int):
  """Triton tiles must be powers of two, and above 128 they rarely fit a GPU core's memory: block is adapted."""
  from vgpt_jax.attention.pallas_gpu import pallas_gpu_attention

  block = max(16, min(128, 1 << (block.bit_length() - 1)))
  return pallas_gpu_attention(q, k, v, q_ids, k_ids, block_q=block, block_k=block)


def _auto(q: jax.Array, k: jax.Array, v: jax.Array, q_ids: TokenIds, k_ids: TokenIds, *, block: int) -> jax.Array:
  """Chosen at trace time from the backend and the (static) lengths."""
  backend = jax.default_backend()
  if backend == "tpu":
    return _pallas_tpu(q, k, v, q_ids, k_ids, block=block)
  if backend == "gpu":
    return _pallas_gpu(q, k, v, q_ids, k_ids, block=block)
  if q.shape[1] * k.shape[1] <= DENSE_LIMIT:
    return dense_attention(q, k, v, q_ids, k_ids)
  return chunked_attention(q, k, v, q_ids, k_ids, block_q=block, block_k=block)


def attention_fn(name: str, block: int = 512):
  """The function for `config.model.attention` (one of ATTENTIONS), tiles of `block` tokens where tiled."""
  paths = {
    "dense": dense_attention,
    "chunked": functools.partial(chunked_attention, block_q=block, block_k=block),
    "pallas_tpu": functools.partial(_pallas_tpu, block=block),
    "pallas_gpu": functools.partial(_pallas_gpu, block=block),
    "auto": functools.partial(_auto, block=block),
  }
  if name not in paths:
    raise ValueError(f"unknown attention {name!r}; choose one of {list(ATTENTIONS)}")
  return shard_attention(paths[name])
