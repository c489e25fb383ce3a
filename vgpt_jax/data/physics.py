"""Procedurally generated "synthetic physics world" videos (pure numpy, no JAX).

Each video shows 1..N balls falling under gravity and bouncing elastically off the
four walls and off each other, rendered with anti-aliased soft edges so that
sub-pixel motion stays smooth even at 32x32.

World model (2.5-D):
  * Every ball lives on one of `depth_layers` depth planes (layer 0 is the
    farthest). Balls on the same plane collide (proper 2-D elastic collisions,
    mass ~ radius^2, overlap resolved); balls on different planes pass in front
    of / behind each other, so a nearer ball hides a farther one.
  * Optionally one static occluder bar sits in front of all balls and hides
    whatever moves behind it (object permanence).

Units: positions in pixels (x to the right, y downward, pixel (i, j) covers
[j, j+1) x [i, i+1)); time in frames. Sizes and speeds in `PhysicsWorld` are
fractions of the frame size `min(height, width)`, gravity is a fraction of the
frame height per frame^2, so the same world looks the same at any resolution.

Everything is deterministic given the integer seed passed to `render_video`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Sequence

import numpy as np

SPLITS: tuple[str, ...] = ("train", "eval")


@dataclasses.dataclass(frozen=True)
class PhysicsWorld:
  """Knobs of the synthetic world; defaults are tuned for 32x32 videos.

  Attributes:
    height, width: frame size in pixels.
    num_frames: frames T of one rendered video.
    min_balls, max_balls: inclusive range of the ball count.
    min_radius, max_radius: ball radius range, fraction of min(height, width).
    min_speed, max_speed: initial speed range, fraction of min(height, width)
      per frame (0.05 at 32x32 = 1.6 px/frame, i.e. ~half the frame in 10 frames).
    gravity: downward acceleration, fraction of the frame height per frame^2.
    substeps: physics substeps per frame; more = more stable collisions.
    wall_restitution, ball_restitution: 1.0 = perfectly elastic, motion persists.
    depth_layers: number of depth planes (1 = every pair of balls can collide).
    occluder_prob: probability that a video has a static occluder bar.
    min_occluder_width, max_occluder_width: bar thickness range, fraction of
      min(height, width).
    min_background, max_background: grey level range of the background in [0, 1].
    shading: how much darker a ball's rim is than its centre (fake 3-D look).
  """

  height: int = 32
  width: int = 32
  num_frames: int = 32
  min_balls: int = 1
  max_balls: int = 3
  min_radius: float = 0.08
  max_radius: float = 0.16
  min_speed: float = 0.03
  max_speed: float = 0.08
  gravity: float = 0.004
  substeps: int = 8
  wall_restitution: float = 1.0
  ball_restitution: float = 1.0
  depth_layers: int = 2
  occluder_prob: float = 0.25
  min_occluder_width: float = 0.1
  max_occluder_width: float = 0.2
  min_background: float = 0.06
  max_background: float = 0.22
  shading: float = 0.3

  # Knobs that the data config may override; other fields map to differently
  # named config fields (see `from_config`).
  CONFIG_KNOBS: ClassVar[tuple[str, ...]] = (
    "min_radius",
    "max_radius",
    "min_speed",
    "max_speed",
    "gravity",
    "substeps",
    "wall_restitution",
    "ball_restitution",
    "depth_layers",
    "occluder_prob",
    "min_occluder_width",
    "max_occluder_width",
    "min_background",
    "max_background",
    "shading",
  )

  def __post_init__(self) -> None:
    checks = [
      (self.height >= 4 and self.width >= 4, "height and width must be >= 4"),
      (self.num_frames >= 1, "num_frames must be >= 1"),
      (1 <= self.min_balls <= self.max_balls, "need 1 <= min_balls <= max_balls"),
      (
        0 < self.min_radius <= self.max_radius < 0.5,
        "need 0 < min_radius <= max_radius < 0.5 (fractions of the frame size)",
      ),
      (0 <= self.min_speed <= self.max_speed, "need 0 <= min_speed <= max_speed"),
      (self.substeps >= 1, "substeps must be >= 1"),
      (0 <= self.wall_restitution <= 1 and 0 <= self.ball_restitution <= 1, "restitutions must lie in [0, 1]"),
      (self.depth_layers >= 1, "depth_layers must be >= 1"),
      (0 <= self.occluder_prob <= 1, "occluder_prob must lie in [0, 1]"),
      (
        0 < self.min_occluder_width <= self.max_occluder_width < 1,
        "need 0 < min_occluder_width <= max_occluder_width < 1",
      ),
      (0 <= self.min_background <= self.max_background <= 1, "need 0 <= min_background <= max_background <= 1"),
      (0 <= self.shading < 1, "shading must lie in [0, 1)"),
    ]
    for ok, message in checks:
      if not ok:
        raise ValueError(f"Invalid PhysicsWorld: {message} (got {self}).")

  @property
  def size(self) -> float:
    """Reference length (pixels) that the fractional knobs are relative to."""
    return float(min(self.height, self.width))

  @classmethod
  def from_config(cls, data_cfg: Any) -> "PhysicsWorld":
    """Builds the world from a data config (`default_data_config`).

    Reads height, width, video_frames (-> num_frames), min_balls, max_balls and
    every one of `CONFIG_KNOBS` (default_data_config copies this class's defaults).
    Note: the config's `num_frames` is the training window, not the video length.
    """
    kwargs = {
      "height": int(data_cfg.height),
      "width": int(data_cfg.width),
      "num_frames": int(data_cfg.video_frames),
      "min_balls": int(data_cfg.min_balls),
      "max_balls": int(data_cfg.max_balls),
    }
    for name in cls.CONFIG_KNOBS:
      kwargs[name] = type(getattr(cls, name))(data_cfg[name])
    return cls(**kwargs)


@dataclasses.dataclass(frozen=True)
class Scene:
  """Initial state of one video. N balls; all lengths in pixels.

  Attributes:
    position: float64 [N, 2] ball centres (x, y) at frame 0.
    velocity: float64 [N, 2] pixels per frame at frame 0.
    radius: float64 [N].
    layer: int [N] depth plane, 0 = farthest.
    colour: float32 [N, 3] RGB in [0, 1].
    background: float32 [3] RGB in [0, 1].
    occluder: (x0, y0, x1, y1) pixel box of the bar in front, or None.
    occluder_colour: float32 [3] RGB in [0, 1].
  """

  position: np.ndarray
  velocity: np.ndarray
  radius: np.ndarray
  layer: np.ndarray
  colour: np.ndarray
  background: np.ndarray
  occluder: tuple[float, float, float, float] | None
  occluder_colour: np.ndarray

  @property
  def mass(self) -> np.ndarray:
    """float64 [N]: mass ~ area, so big balls push small ones around."""
    return self.radius**2


# ----------------------------------------------------------------------------- seeds


def video_seed(split: str, index: int, base_seed: int) -> int:
  """Seed of video `index` of `split`; train and eval streams are disjoint.

  The seed is hashed from (base_seed, split, index) with SeedSequence, and its
  lowest bit is the split id, so no train seed can ever equal an eval seed.
  """
  if split not in SPLITS:
    raise ValueError(f"Unknown split {split!r}; valid splits are {list(SPLITS)}.")
  if index < 0 or base_seed < 0:
    raise ValueError(f"index and base_seed must be >= 0, got {index=}, {base_seed=}.")
  split_id = SPLITS.index(split)
  (word,) = np.random.SeedSequence([base_seed, split_id, index]).generate_state(1, dtype=np.uint64)
  return (int(word) & ~1) | split_id


# ---------------------------------------------------------------------------- scenes


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Vectorised HSV -> RGB; inputs [N] in [0, 1], output float32 [N, 3]."""
  k = (np.array([5.0, 3.0, 1.0]) + 6.0 * h[:, None]) % 6.0
  rgb = v[:, None] - v[:, None] * s[:, None] * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)
  return rgb.astype(np.float32)


def _place_balls(
  rng: np.random.Generator, radius: np.ndarray, layer: np.ndarray, world: PhysicsWorld
) -> tuple[np.ndarray, np.ndarray]:
  """Rejection-samples non-overlapping (per layer) centres.

  Returns positions float64 [N, 2] and a bool [N] mask of balls that found a
  spot (the first ball always does, since radius < half the frame).
  """
  n = len(radius)
  position = np.zeros((n, 2))
  placed = np.zeros(n, dtype=bool)
  for i in range(n):
    for _ in range(50):
      x = rng.uniform(radius[i], world.width - radius[i])
      y = rng.uniform(radius[i], world.height - radius[i])
      others = placed & (layer == layer[i])
      gap = np.hypot(position[others, 0] - x, position[others, 1] - y)
      if np.all(gap > radius[others] + radius[i] + 0.5):
        position[i] = (x, y)
        placed[i] = True
        break
  return position, placed


def _sample_occluder(rng: np.random.Generator, world: PhysicsWorld) -> tuple[float, float, float, float] | None:
  """A vertical or horizontal bar (x0, y0, x1, y1), or None with 1 - occluder_prob."""
  if rng.random() >= world.occluder_prob:
    return None
  thickness = rng.uniform(world.min_occluder_width, world.max_occluder_width) * world.size
  vertical = rng.random() < 0.5
  across, along = (world.width, world.height) if vertical else (world.height, world.width)
  centre = rng.uniform(0.25, 0.75) * across
  length = rng.uniform(0.6, 1.0) * along
  start = rng.uniform(0.0, along - length)
  lo, hi = centre - thickness / 2, centre + thickness / 2
  if vertical:
    return (lo, start, hi, start + length)
  return (start, lo, start + length, hi)


def sample_scene(rng: np.random.Generator, world: PhysicsWorld) -> Scene:
  """Draws the initial state of one video from `rng` (fixed draw order)."""
  size = world.size
  n = int(rng.integers(world.min_balls, world.max_balls + 1))
  radius = rng.uniform(world.min_radius, world.max_radius, n) * size
  layer = rng.integers(0, world.depth_layers, n)
  position, placed = _place_balls(rng, radius, layer, world)
  speed = rng.uniform(world.min_speed, world.max_speed, n) * size
  angle = rng.uniform(0.0, 2.0 * np.pi, n)
  velocity = np.stack([speed * np.cos(angle), speed * np.sin(angle)], axis=-1)
  colour = _hsv_to_rgb(rng.random(n), rng.uniform(0.55, 1.0, n), rng.uniform(0.75, 1.0, n))
  grey = rng.uniform(world.min_background, world.max_background)
  background = np.full(3, grey, dtype=np.float32)
  occluder = _sample_occluder(rng, world)
  occluder_colour = _hsv_to_rgb(rng.random(1), rng.uniform(0.0, 0.3, 1), rng.uniform(0.45, 0.6, 1))[0]
  return Scene(
    position=position[placed],
    velocity=velocity[placed],
    radius=radius[placed],
    layer=layer[placed],
    colour=colour[placed],
    background=background,
    occluder=occluder,
    occluder_colour=occluder_colour,
  )


# --------------------------------------------------------------------------- physics


def _collide_walls(position: np.ndarray, velocity: np.ndarray, lo: np.ndarray, hi: np.ndarray, e: float) -> None:
  """Reflects balls ([N, 2] arrays, in place) that crossed a wall back inside."""
  below = position < lo
  if below.any():
    position[below] = lo[below] + e * (lo[below] - position[below])
    velocity[below] = e * np.abs(velocity[below])
  above = position > hi
  if above.any():
    position[above] = hi[above] - e * (position[above] - hi[above])
    velocity[above] = -e * np.abs(velocity[above])
  np.clip(position, lo, hi, out=position)


def _resolve_pair(
  position: np.ndarray,
  velocity: np.ndarray,
  radius: np.ndarray,
  mass: np.ndarray,
  i: int,
  j: int,
  e: float,
) -> None:
  """Elastic collision of balls i and j (in place): separate, then exchange impulse.

  The overlap is removed along the contact normal in inverse proportion to
  mass; then, if approaching, the normal velocity components are exchanged
  with the 1-D elastic formula (momentum conserved, energy too when e = 1).
  """
  delta = position[j] - position[i]
  dist = float(np.hypot(delta[0], delta[1]))
  overlap = radius[i] + radius[j] - dist
  if overlap <= 0.0:
    return
  normal = delta / dist if dist > 1e-9 else np.array([1.0, 0.0])
  total = mass[i] + mass[j]
  position[i] -= normal * (overlap * mass[j] / total)
  position[j] += normal * (overlap * mass[i] / total)
  approach = float(np.dot(velocity[j] - velocity[i], normal))
  if approach < 0.0:
    impulse = (1.0 + e) * approach * mass[i] * mass[j] / total
    velocity[i] += normal * (impulse / mass[i])
    velocity[j] -= normal * (impulse / mass[j])


def _collide_balls(
  position: np.ndarray,
  velocity: np.ndarray,
  radius: np.ndarray,
  mass: np.ndarray,
  pairs: np.ndarray,
  e: float,
) -> None:
  """Finds touching pairs (int [P, 2], same layer) vectorised; resolves them in order."""
  if len(pairs) == 0:
    return
  delta = position[pairs[:, 1]] - position[pairs[:, 0]]
  reach = radius[pairs[:, 0]] + radius[pairs[:, 1]]
  touching = np.einsum("pk,pk->p", delta, delta) < reach**2
  for k in np.flatnonzero(touching):
    _resolve_pair(position, velocity, radius, mass, pairs[k, 0], pairs[k, 1], e)


def _same_layer_pairs(layer: np.ndarray) -> np.ndarray:
  """int [P, 2] index pairs (i < j) of balls that share a depth layer."""
  i, j = np.triu_indices(len(layer), k=1)
  same = layer[i] == layer[j]
  return np.stack([i[same], j[same]], axis=-1)


def simulate(scene: Scene, world: PhysicsWorld, num_frames: int | None = None) -> np.ndarray:
  """Integrates the scene; returns ball centres float64 [T, N, 2] (x, y), pixels.

  T = num_frames (default world.num_frames); stopping early saves time when
  only a prefix of the video is needed. Semi-implicit Euler with `substeps`
  steps per frame; balls then walls are resolved after every substep, which
  keeps fast collisions stable.
  """
  num_frames = world.num_frames if num_frames is None else num_frames
  position = scene.position.astype(np.float64).copy()
  velocity = scene.velocity.astype(np.float64).copy()
  radius, mass = scene.radius, scene.mass
  lo = np.broadcast_to(radius[:, None], position.shape)
  hi = np.array([world.width, world.height], dtype=np.float64) - radius[:, None]
  gravity_step = np.array([0.0, world.gravity * world.height]) / world.substeps
  dt = 1.0 / world.substeps
  pairs = _same_layer_pairs(scene.layer)
  out = np.empty((num_frames,) + position.shape)
  out[0] = position
  for t in range(1, num_frames):
    for _ in range(world.substeps):
      velocity += gravity_step
      position += velocity * dt
      _collide_balls(position, velocity, radius, mass, pairs, world.ball_restitution)
      _collide_walls(position, velocity, lo, hi, world.wall_restitution)
    out[t] = position
  return out


# -------------------------------------------------------------------------- drawing


def _box_coverage(lo: float, hi: float, n: int) -> np.ndarray:
  """float32 [n]: exact fraction of each unit pixel [k, k+1) inside [lo, hi]."""
  k = np.arange(n, dtype=np.float32)
  return np.clip(np.minimum(hi, k + 1.0) - np.maximum(lo, k), 0.0, 1.0)


def draw(scene: Scene, positions: np.ndarray, world: PhysicsWorld) -> np.ndarray:
  """Renders centres [T, N, 2] into uint8 frames [T, H, W, 3].

  Anti-aliasing: a pixel's ball coverage is the signed distance of its centre
  to the rim, clipped to [0, 1] (a one-pixel soft edge). Balls are composited
  far-to-near ("over" operator), then the occluder bar in front of all.
  """
  h, w = world.height, world.width
  ys = np.arange(h, dtype=np.float32) + 0.5
  xs = np.arange(w, dtype=np.float32) + 0.5
  px = positions[..., 0].astype(np.float32)[:, :, None, None]  # [T, N, 1, 1]
  py = positions[..., 1].astype(np.float32)[:, :, None, None]
  dist = np.sqrt((xs[None, None, None, :] - px) ** 2 + (ys[None, None, :, None] - py) ** 2)
  radius = scene.radius.astype(np.float32)[None, :, None, None]
  alpha = np.clip(radius - dist + 0.5, 0.0, 1.0)  # [T, N, H, W]
  shade = 1.0 - world.shading * np.minimum(dist / radius, 1.0) ** 2

  canvas = np.empty((positions.shape[0], h, w, 3), dtype=np.float32)
  canvas[...] = scene.background
  for n in np.argsort(scene.layer, kind="stable"):
    colour = shade[:, n, :, :, None] * scene.colour[n]  # [T, H, W, 3]
    canvas += alpha[:, n, :, :, None] * (colour - canvas)
  if scene.occluder is not None:
    x0, y0, x1, y1 = scene.occluder
    cover = _box_coverage(y0, y1, h)[:, None, None] * _box_coverage(x0, x1, w)[None, :, None]
    canvas += cover * (scene.occluder_colour - canvas)
  return np.round(np.clip(canvas, 0.0, 1.0) * 255.0).astype(np.uint8)


def render_video(seed: int, world: PhysicsWorld, frames: Sequence[int] | None = None) -> np.ndarray:
  """Deterministically renders video `seed`: uint8 [T, H, W, 3], T = world.num_frames.

  With `frames` (indices in [0, world.num_frames)) only those frames are
  drawn, [len(frames), H, W, 3], identical to `render_video(seed, world)[frames]`
  but cheaper: the simulation stops at the last requested frame.
  """
  scene = sample_scene(np.random.default_rng(seed), world)
  if frames is None:
    return draw(scene, simulate(scene, world), world)
  frames = np.asarray(frames, dtype=np.int64)
  if frames.size and (frames.min() < 0 or frames.max() >= world.num_frames):
    raise ValueError(f"frames must lie in [0, {world.num_frames}), got {frames.tolist()}.")
  last = int(frames.max()) + 1 if frames.size else 1
  return draw(scene, simulate(scene, world, num_frames=last)[frames], world)
