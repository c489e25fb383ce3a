"""Clips and the token layout of a Video-GPT training sample (SPEC sections 2-3).

A sample of N frames is cut into K >= 2 contiguous clips. Every frame has a
noisy copy (to denoise) and, except the last frame, a clean copy (context).
Each copy of a frame is one segment of L = S + 2 tokens:

    clean frame f:  [<img>, p_1 .. p_S, </img>]      positions f*L .. f*L+L-1
    noisy frame f:  [<diff>, TIME, p_1 .. p_S]        positions f*L .. f*L+L-1

The project's order is every clean segment (frames 0..N-2), then every noisy
segment (frames 0..N-1). That fixes the length at (2N - 1) * L whatever the
split, so one compiled program serves every random split; the only per-sample
quantity is `clip_of_frame` ([N] clip index of each frame), from which the
per-token clip ids are gathered. The clean copy of the very last frame is never
visible to anyone (the last clip needs no clean copy) so it is left out; clean
copies of other last-clip frames are kept for the fixed shape and are masked
away from every noisy query.

Everything here is numpy (static, built once per config) or jnp that is
jit-friendly with fixed shapes.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Stream ids.
CLEAN = 0
NOISY = 1
PAD = -1  # padding tokens (to divide a sequence evenly): no token sees them and they see none

# Token kinds. The order matters: inside one attention unit (a clean frame or
# a noisy clip) a query sees exactly the keys whose kind is <= its own kind,
# which is every within-unit rule of SPEC section 3 in one comparison.
BOS = 0  # <img> on a clean frame, <diff> on a noisy frame
TIME = 1  # timestep token (noisy frames only)
PATCH = 2  # latent patch token
EOS = 3  # </img> (clean frames only)

# Rows of the special-token embedding table.
SPECIAL_IMG = 0  # <img>
SPECIAL_END_IMG = 1  # </img>
SPECIAL_DIFF = 2  # <diff>
NUM_SPECIAL = 3


@dataclasses.dataclass(frozen=True, eq=False)
class Layout:
  """Static description of one token sequence; all arrays are numpy [T].

  `source` indexes the token table the model assembles (see `table_size`):
    [0, N*S)                 clean patch tokens, frame-major
    [N*S, 2*N*S)             noisy patch tokens, frame-major
    [2*N*S, 2*N*S + N)       TIME token of each noisy frame
    2*N*S + N + j            special token j (SPECIAL_*)
  so any order of the same tokens can be built by a single gather.
  """

  num_frames: int
  tokens_per_frame: int  # S
  frame: np.ndarray  # int32 [T]
  stream: np.ndarray  # int32 [T]
  kind: np.ndarray  # int32 [T]
  position: np.ndarray  # int32 [T] RoPE position
  source: np.ndarray  # int32 [T] index into the token table

  @property
  def length(self) -> int:
    return int(self.frame.shape[0])

  @property
  def segment_length(self) -> int:
    return self.tokens_per_frame + 2

  @property
  def table_size(self) -> int:
    n, s = self.num_frames, self.tokens_per_frame
    return 2 * n * s + n + NUM_SPECIAL

  def noisy_patch_index(self) -> np.ndarray:
    """int32 [N, S]: sequence index of patch p of noisy frame f (for decoding)."""
    n, s = self.num_frames, self.tokens_per_frame
    lookup = np.full((n, s), -1, np.int32)
    sel = (self.stream == NOISY) & (self.kind == PATCH)
    patch = self.source[sel] - n * s
    lookup[patch // s, patch % s] = np.nonzero(sel)[0]
    if (lookup < 0).any():
      raise ValueError("layout is missing noisy patch tokens")
    return lookup


def _clean_segment(frame: int, n: int, s: int) -> list[tuple[int, int, int, int, int]]:
  """(frame, stream, kind, position, source) rows of the clean copy of `frame`."""
  seg = s + 2
  special = 2 * n * s + n
  rows = [(frame, CLEAN, BOS, frame * seg, special + SPECIAL_IMG)]
  rows += [(frame, CLEAN, PATCH, frame * seg + 1 + p, frame * s + p) for p in range(s)]
  rows.append((frame, CLEAN, EOS, frame * seg + s + 1, special + SPECIAL_END_IMG))
  return rows


def _noisy_segment(frame: int, n: int, s: int) -> list[tuple[int, int, int, int, int]]:
  """(frame, stream, kind, position, source) rows of the noisy copy of `frame`."""
  seg = s + 2
  special = 2 * n * s + n
  rows = [
    (frame, NOISY, BOS, frame * seg, special + SPECIAL_DIFF),
    (frame, NOISY, TIME, frame * seg + 1, 2 * n * s + frame),
  ]
  rows += [(frame, NOISY, PATCH, frame * seg + 2 + p, n * s + frame * s + p) for p in range(s)]
  return rows


def _from_rows(n: int, s: int, rows: list[tuple[int, int, int, int, int]]) -> Layout:
  cols = np.asarray(rows, np.int32).T
  return Layout(n, s, frame=cols[0], stream=cols[1], kind=cols[2], position=cols[3], source=cols[4])


def training_layout(num_frames: int, tokens_per_frame: int) -> Layout:
  """The project's order: clean frames 0..N-2, then noisy frames 0..N-1."""
  n, s = num_frames, tokens_per_frame
  rows: list[tuple[int, int, int, int, int]] = []
  for f in range(n - 1):
    rows += _clean_segment(f, n, s)
  for f in range(n):
    rows += _noisy_segment(f, n, s)
  return _from_rows(n, s, rows)


def sampling_layout(num_frames: int, tokens_per_frame: int) -> Layout:
  """Clean frames 0..N-1, then noisy frames 0..N-1: every token a sampler may run (the ids
  of each token, and so the mask, are those of the training layout)."""
  n, s = num_frames, tokens_per_frame
  rows: list[tuple[int, int, int, int, int]] = []
  for f in range(n):
    rows += _clean_segment(f, n, s)
  for f in range(n):
    rows += _noisy_segment(f, n, s)
  return _from_rows(n, s, rows)


def pad_layout(layout: Layout, multiple: int) -> Layout:
  """The layout with PAD tokens appended up to a multiple of `multiple` tokens (e.g. to split it over devices).

  A PAD token embeds as the <img> special token; the mask hides it from every
  query and every key from it, so it changes no other token's output.
  """
  extra = -layout.length % multiple
  if extra == 0:
    return layout
  n, s = layout.num_frames, layout.tokens_per_frame
  pad = lambda a, value: np.concatenate([a, np.full(extra, value, np.int32)])  # noqa: E731
  return Layout(
    n,
    s,
    frame=pad(layout.frame, 0),
    stream=pad(layout.stream, PAD),
    kind=pad(layout.kind, BOS),
    position=pad(layout.position, 0),
    source=pad(layout.source, 2 * n * s + n + SPECIAL_IMG),
  )


def context_parallel_layout(layout: Layout, shards: int) -> Layout:
  """The same tokens, padded and reordered so `shards` contiguous slices (devices of mesh.context) carry equal work.

  In the training order (clean frames, then noisy frames) the work per query
  grows along each half, so contiguous slices would give the last device the
  most. Clean and noisy segments are first interleaved frame by frame (the work
  then grows with the frame), then the sequence is dealt out in 2c chunks,
  device i taking chunk i and chunk 2c-1-i: a cheap early chunk with an
  expensive late one. Each device's slice is then sorted by (stream, frame):
  the same tokens, so the same balance, but its query tiles again span few
  frames of one stream, which keeps tile skipping (attention/accounting.py:
  without this sort, context=4 computed 62% of the tiles at 48 frames instead
  of 32%). A length that 2c does not divide (the paper's stage 2 has 95 x 222
  tokens) is first padded with PAD tokens, which the mask hides. The mask
  depends on ids only, so any token order gives the same model.
  """
  layout = pad_layout(layout, 2 * shards)
  t = layout.length
  by_frame = np.lexsort((np.arange(t), layout.stream, layout.frame))  # C0 N0 C1 N1 ...: work grows with the frame
  chunks = by_frame.reshape(2 * shards, t // (2 * shards))
  slices = [np.concatenate([chunks[i], chunks[2 * shards - 1 - i]]) for i in range(shards)]
  order = np.concatenate([s[np.lexsort((s, layout.frame[s], layout.stream[s]))] for s in slices])
  return Layout(
    layout.num_frames,
    layout.tokens_per_frame,
    frame=layout.frame[order],
    stream=layout.stream[order],
    kind=layout.kind[order],
    position=layout.position[order],
    source=layout.source[order],
  )


def segment_tokens(layout: Layout, stream: int, first: int, stop: int) -> np.ndarray:
  """int [T']: the layout's tokens of `stream` (CLEAN or NOISY) for frames first..stop-1, in layout order."""
  return np.nonzero((layout.stream == stream) & (layout.frame >= first) & (layout.frame < stop))[0]


def interleaved_layout(clip_sizes: Sequence[int], tokens_per_frame: int) -> Layout:
  """The reference order N(B1) C(B1) N(B2) C(B2) ... N(BK) for one fixed split."""
  n, s = int(sum(clip_sizes)), tokens_per_frame
  rows: list[tuple[int, int, int, int, int]] = []
  start = 0
  for k, size in enumerate(clip_sizes):
    frames = range(start, start + size)
    for f in frames:
      rows += _noisy_segment(f, n, s)
    if k < len(clip_sizes) - 1:
      for f in frames:
        rows += _clean_segment(f, n, s)
    start += size
  return _from_rows(n, s, rows)


# ----------------------------------------------------------------------------
# Clip splits: int32 [N] clip index of each frame, non-decreasing from 0.


def fixed_split(clip_sizes: Sequence[int]) -> np.ndarray:
  """Clip index of each frame for explicit clip sizes, e.g. (2, 3) -> [0 0 1 1 1]."""
  if any(c <= 0 for c in clip_sizes):
    raise ValueError(f"clip sizes must be positive, got {tuple(clip_sizes)}")
  return np.repeat(np.arange(len(clip_sizes), dtype=np.int32), clip_sizes)


def per_frame_split(num_frames: int) -> np.ndarray:
  """Stage-1 mode: every frame is its own clip (K = N)."""
  return np.arange(num_frames, dtype=np.int32)


def random_split(key: jax.Array, num_frames: int, min_clips: int = 2, max_clips: int | None = None) -> jax.Array:
  """Random contiguous split (SPEC section 3): K ~ U{min..max}, cut points uniform
  without replacement among the N-1 gaps. Fixed shapes, so it jits and vmaps.

  Returns int32 [N] clip index of each frame.
  """
  n = num_frames
  max_clips = n if max_clips is None else max_clips
  if not 1 <= min_clips <= max_clips <= n:
    raise ValueError(f"need 1 <= min_clips <= max_clips <= num_frames, got {min_clips}, {max_clips}, {n}")
  if n == 1:
    return jnp.zeros((1,), jnp.int32)
  k_key, perm_key = jax.random.split(key)
  num_clips = jax.random.randint(k_key, (), min_clips, max_clips + 1)
  # Rank of each of the N-1 gaps in a random order; the first K-1 become cuts.
  rank = jnp.argsort(jax.random.permutation(perm_key, n - 1))
  is_cut = (rank < num_clips - 1).astype(jnp.int32)
  return jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(is_cut)]).astype(jnp.int32)


# ----------------------------------------------------------------------------
# Per-token ids consumed by the attention mask and RoPE.


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TokenIds:
  """Integer ids of every token, each int32 [B, T]; the mask is a function of these."""

  frame: jax.Array
  clip: jax.Array  # clip index of the token's frame
  stream: jax.Array  # CLEAN or NOISY
  kind: jax.Array  # BOS, TIME, PATCH or EOS
  position: jax.Array  # RoPE position

  def __getitem__(self, index) -> "TokenIds":
    """Slice every field alike, e.g. ids[:, a:b] for a tile of tokens."""
    return jax.tree.map(lambda x: x[index], self)


def token_ids(layout: Layout, clip_of_frame: jax.Array) -> TokenIds:
  """Ids of `layout`'s tokens for a batch of splits.

  Args:
    layout: the static token layout (T tokens).
    clip_of_frame: int32 [B, N] clip index of each frame.
  Returns:
    TokenIds with fields int32 [B, T].
  """
  clip_of_frame = jnp.asarray(clip_of_frame, jnp.int32)
  batch = clip_of_frame.shape[0]
  if clip_of_frame.shape[1] != layout.num_frames:
    raise ValueError(f"clip_of_frame has {clip_of_frame.shape[1]} frames, layout has {layout.num_frames}")

  def static(a: np.ndarray) -> jax.Array:
    return jnp.broadcast_to(jnp.asarray(a, jnp.int32), (batch, layout.length))

  return TokenIds(
    frame=static(layout.frame),
    clip=jnp.take(clip_of_frame, jnp.asarray(layout.frame), axis=1),
    stream=static(layout.stream),
    kind=static(layout.kind),
    position=static(layout.position),
  )


SPLITS = ("random", "per_frame", "fixed")


def sample_splits(key: jax.Array, batch: int, num_frames: int, layout_cfg) -> jax.Array:
  """int32 [B, N]: one clip split per sample, as `layout_cfg.split` says.

  random: SPEC's random split, independent per sample; per_frame: stage 1
  (one frame per clip); fixed: `layout_cfg.fixed_clip_sizes` for every sample.
  """
  if layout_cfg.split == "random":
    max_clips = num_frames if layout_cfg.max_clips <= 0 else layout_cfg.max_clips
    keys = jax.random.split(key, batch)
    return jax.vmap(lambda k: random_split(k, num_frames, layout_cfg.min_clips, max_clips))(keys)
  if layout_cfg.split == "per_frame":
    split = per_frame_split(num_frames)
  elif layout_cfg.split == "fixed":
    split = fixed_split(tuple(layout_cfg.fixed_clip_sizes))
  else:
    raise ValueError(f"unknown layout.split {layout_cfg.split!r}; choose one of {SPLITS}")
  return jnp.broadcast_to(jnp.asarray(split), (batch, num_frames))
