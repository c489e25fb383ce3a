"""Attention driven by per-token ids: the hierarchical mask and its implementations."""

from vgpt_jax.attention.dense import dense_attention
from vgpt_jax.attention.mask import visible

__all__ = ["dense_attention", "visible"]
