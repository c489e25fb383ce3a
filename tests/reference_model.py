"""The reference Video-GPT's network in PyTorch, small, for parity tests (torch and transformers: test-only).

Written from reading the reference (zhuangshaobin/Video-GPT: LVM/model.py, LVM/processor.py, OmniGen/
transformer.py), not from this project's code: transformers' Phi3Model as the backbone, conv patch embedders on
NCHW latents, a DiT sin-cos table added to the patch tokens, two timestep MLPs (the TIME token and the final
layer's adaLN) and the final layer; the sequence in the reference's order (per clip: its noisy frames, then its
clean frames; the last clip has no clean copy) with its hierarchical mask written out as SPEC section 3 states it.
The state dict uses the reference's key names, so it can be saved as a released checkpoint would be.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from transformers import Phi3Config, Phi3Model


def sincos_table(dim: int, size: int, base: int) -> np.ndarray:
  """The reference's get_2d_sincos_pos_embed(dim, size, base_size=base): [size*size, dim], w-half first."""
  coords = np.arange(size, dtype=np.float32) / (size / base)
  grid_w, grid_h = np.meshgrid(coords, coords)  # w varies along columns

  def one_d(d: int, pos: np.ndarray) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
    angles = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

  return np.concatenate([one_d(dim // 2, grid_w), one_d(dim // 2, grid_h)], axis=1)


class Timestep(nn.Module):
  def __init__(self, hidden: int, freq: int = 256):
    super().__init__()
    self.freq = freq
    self.mlp = nn.Sequential(nn.Linear(freq, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

  def forward(self, t: torch.Tensor) -> torch.Tensor:
    half = self.freq // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class PatchEmbed(nn.Module):
  def __init__(self, channels: int, hidden: int, patch: int):
    super().__init__()
    self.proj = nn.Conv2d(channels, hidden, kernel_size=patch, stride=patch)

  def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] -> [B, HW/p^2, D]
    return self.proj(x).flatten(2).transpose(1, 2)


class Final(nn.Module):
  def __init__(self, hidden: int, out: int):
    super().__init__()
    self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
    self.linear = nn.Linear(hidden, out)
    self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

  def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
    return self.linear(self.norm_final(x) * (1 + scale[:, None]) + shift[:, None])


class ReferenceVideoGPT(nn.Module):
  def __init__(self, phi3: Phi3Config, channels: int, patch: int, pos_max: int = 192, pos_base: int = 64):
    super().__init__()
    d = phi3.hidden_size
    self.channels, self.patch, self.pos_max = channels, patch, pos_max
    self.x_embedder = PatchEmbed(channels, d, patch)
    self.input_x_embedder = PatchEmbed(channels, d, patch)
    self.time_token = Timestep(d)
    self.t_embedder = Timestep(d)
    self.register_buffer("pos_embed", torch.from_numpy(sincos_table(d, pos_max, pos_base)).float()[None])
    self.final_layer = Final(d, patch * patch * channels)
    self.llm = Phi3Model(phi3)

  def pos(self, h: int, w: int) -> torch.Tensor:
    gh, gw = h // self.patch, w // self.patch
    top, left = (self.pos_max - gh) // 2, (self.pos_max - gw) // 2
    table = self.pos_embed.reshape(self.pos_max, self.pos_max, -1)[top : top + gh, left : left + gw]
    return table.reshape(gh * gw, -1)

  def unpatchify(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:  # [S, p*p*C] -> [C, h, w]
    p, c = self.patch, self.channels
    x = x.reshape(h // p, w // p, p, p, c)
    return torch.einsum("hwpqc->chpwq", x).reshape(c, h, w)

  def forward(self, clean, noisy, t, clips, special_ids, context=0):
    """Outputs of the noisy frames, [N_noisy, C, h, w] (one sample).

    clean, noisy: [N, C, h, w]; t [N]: flow time of each noisy frame; clips: the clip of each frame (contiguous,
    from 0). context > 0: a sampling step, frames < context are clean context only (no noisy copy) and the
    rest one clip being denoised.
    """
    img, end_img, diff = special_ids
    embed = self.llm.embed_tokens.weight
    n, _, h, w = noisy.shape
    pos = self.pos(h, w)
    s = pos.shape[0]
    seg = s + 2
    tokens, meta = [], []  # meta: (frame, stream 0 clean / 1 noisy, kind 0 bos 1 time 2 patch 3 eos, clip)
    positions = []  # a frame's segment (either copy) takes positions f * seg .. f * seg + seg - 1, in order

    def noisy_frame(f):
      tokens.extend([embed[diff][None], self.time_token(t[f : f + 1]), self.x_embedder(noisy[f : f + 1])[0] + pos])
      meta.extend([(f, 1, 0, clips[f]), (f, 1, 1, clips[f])] + [(f, 1, 2, clips[f])] * s)
      positions.extend(range(f * seg, (f + 1) * seg))

    def clean_frame(f):
      tokens.extend([embed[img][None], self.input_x_embedder(clean[f : f + 1])[0] + pos, embed[end_img][None]])
      meta.extend([(f, 0, 0, clips[f])] + [(f, 0, 2, clips[f])] * s + [(f, 0, 3, clips[f])])
      positions.extend(range(f * seg, (f + 1) * seg))

    if context:
      for f in range(context):
        clean_frame(f)
      for f in range(context, n):
        noisy_frame(f)
    else:
      last = max(clips)
      for b in range(last + 1):
        frames = [f for f in range(n) if clips[f] == b]
        for f in frames:
          noisy_frame(f)
        if b != last:
          for f in frames:
            clean_frame(f)
    x = torch.cat(tokens)[None]
    positions = torch.tensor([positions])
    mask = torch.tensor(_mask(meta))
    additive = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)[None, None]
    rope = self.llm.rotary_emb(x, positions)
    for layer in self.llm.layers:
      x = layer(x, attention_mask=additive, position_ids=positions, position_embeddings=rope)
    x = self.llm.norm(x)[0]
    out = []
    for f in range(n):
      rows = [i for i, m in enumerate(meta) if m[0] == f and m[1] == 1 and m[2] == 2]
      if rows:
        pred = self.final_layer(x[rows][None], self.t_embedder(t[f : f + 1]))[0]
        out.append(self.unpatchify(pred, h, w))
    return torch.stack(out)


def _mask(meta) -> np.ndarray:
  """SPEC section 3, token by token: who each query (row) may attend to."""
  t = len(meta)
  mask = np.zeros((t, t), bool)
  for qi, (qf, qs, qk, qb) in enumerate(meta):
    for ki, (kf, ks, kk, kb) in enumerate(meta):
      if qs == 0:  # clean query: earlier clean frames; inside its own frame, kinds up to its own
        mask[qi, ki] = ks == 0 and (kf < qf or (kf == qf and kk <= qk))
      else:  # noisy query: clean frames of earlier clips; its own clip's noisy tokens of kinds up to its own
        mask[qi, ki] = (ks == 0 and kb < qb) or (ks == 1 and kb == qb and kk <= qk)
  return mask
