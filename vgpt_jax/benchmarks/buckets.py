"""Pixels kept on a mixed corpus: one fixed frame size against aspect-ratio buckets of the same token budget.

  python -m vgpt_jax.benchmarks.buckets

The corpus (made here, deterministic): 60 videos, a third landscape 16:9 (320x180), a third portrait 9:16
(180x320), and 4:3, 3:4, square and 3:1 ones. Each is fitted the way the pipeline fits frames (cover-scale,
centre crop, sources.cover_crop), to the paper's fixed 176x320, or to the nearest of the buckets 176x320,
320x176 and 240x240 (220, 220 and 225 tokens at 8x down and patch 2). Prints the mean share of each
video's picture kept, per kind of video.
"""

from __future__ import annotations

import numpy as np

from vgpt_jax.data.buckets import assign, kept_fraction, parse_buckets

CORPUS = {  # kind -> (width, height, how many)
  "landscape 16:9": (320, 180, 20),
  "portrait 9:16": (180, 320, 20),
  "landscape 4:3": (320, 240, 5),
  "portrait 3:4": (240, 320, 5),
  "square": (256, 256, 5),
  "panorama 3:1": (480, 160, 5),
}
FIXED = [(176, 320)]
BUCKETS = [(176, 320), (320, 176), (240, 240)]


def table() -> list[tuple[str, int, float, float, str]]:
  """(kind, videos, kept with the fixed size, kept with buckets, bucket chosen) per kind, then the whole corpus."""
  fixed, buckets = parse_buckets(FIXED, 8, 2), parse_buckets(BUCKETS, 8, 2)
  rows, all_fixed, all_buckets = [], [], []
  for kind, (width, height, count) in CORPUS.items():
    chosen = buckets[assign(width, height, buckets)]
    kept_fixed = kept_fraction(width, height, fixed[0])
    kept_bucket = kept_fraction(width, height, chosen)
    rows.append((kind, count, kept_fixed, kept_bucket, f"{chosen.height}x{chosen.width}"))
    all_fixed += [kept_fixed] * count
    all_buckets += [kept_bucket] * count
  rows.append(("all", len(all_fixed), float(np.mean(all_fixed)), float(np.mean(all_buckets)), ""))
  return rows


def main() -> None:
  tokens = {f"{h}x{w}": b.tokens(8, 2, 1) for (h, w), b in zip(BUCKETS, parse_buckets(BUCKETS, 8, 2))}
  print(f"tokens per frame: {tokens}")
  print("| videos | count | picture kept, fixed 176x320 | picture kept, buckets | bucket |")
  print("|---|---|---|---|---|")
  for kind, count, fixed, bucketed, chosen in table():
    print(f"| {kind} | {count} | {fixed:.1%} | {bucketed:.1%} | {chosen} |")


if __name__ == "__main__":
  main()
