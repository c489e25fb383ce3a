"""Videos from the user's own files (a directory tree or a manifest), decoded with PyAV.

`VideoFileSource` implements the `VideoSource` protocol of `sources.py`: video
`index` -> uint8 clip [data.num_frames, data.height, data.width, 3].

Which files:
  * `data.path`: a directory, searched recursively for `data.extensions`
    (case-insensitive), sorted so every host sees the same numbering.
  * `data.manifest`: a text file, one video per line, `path` or
    `path<TAB>frame_count`; relative paths resolve against the manifest's
    directory; blank lines and `#` comments are ignored. Listing millions of
    files once into a manifest (see `write_manifest`) saves every process a
    directory walk, and the counts save opening containers that store none
    (mkv, webm). A line may instead give a clip of a long video,
    `path,start,end` (comma or tab; seconds or [H:]MM:SS.fff), and a CSV with a
    `timestamp` column is read as Panda-70M's (videoID.mp4 and its clips):
    each clip is one video, frames [round(start * fps), round(end * fps)) of
    the file, read by seeking; its frame count comes from the file's cached
    facts (frame rate), and a clip too short for a sample is skipped and
    counted like a short file.
  * Held out for evaluation: the files of `data.eval_path` / `data.eval_manifest`
    when set (and then removed from training if they also appear there), else
    the last `data.num_eval_videos` files of the listing. The listing order is
    the held-out rule, so a collection that grows changes which files are held
    out: give a fixed eval set for comparisons across runs.

How a clip is cut (SPEC section 6, made fixed-shape for a jitted step):
  * stride k drawn from [data.frame_stride, min(data.frame_stride_max, T // F)],
    T the video's frame count, F = data.num_frames; start drawn from
    [0, T - F*k]. A video with T < F * data.frame_stride is `too_short`.
  * Frame i is the frame whose timestamp is i / fps. Reading seeks to the
    keyframe before the first needed frame and decodes forward only up to
    the last needed one, so a 16-frame clip from an hour-long file costs a
    few GOPs, not the whole file.
  * Each frame is scaled (bicubic, swscale) so it covers data.height x
    data.width keeping its aspect, then centre-cropped to exactly that size.
    With data.buckets, the size is instead that of the video's bucket: the
    one nearest its aspect (and, for buckets with their own frame count, the
    longest clip it can give), chosen once from its cached facts
    (buckets.assign). The reference kept each video's own size (longest side
    <= 320, cropped to multiples of 16); a few buckets keep about as much of
    the picture with a few compiled shapes.

Bad files: a source first inspects every listed file once, in parallel
(`inspect_file`: container, video stream, size, frame count, and whether the
last frame decodes), caches what it found beside the data (file_facts.py), and
numbers only the files that can give clips under the config (`judge`); the
others are counted by reason in `VideoFileSource.excluded` and never drawn.
A file that fails later anyway (deleted mid-run, damaged in the middle) raises
`BadVideo`: every PyAV error becomes one with a reason of `SKIP_REASONS`, and
the pipeline replaces and counts it.

Not handled: rotation metadata (phone videos play rotated), non-square sample
aspect ratios, videos with several video streams (the first that is not cover
art is used).
"""

from __future__ import annotations

import csv
import os
from fractions import Fraction
from typing import Any, Iterator, Sequence

import av
import numpy as np
from absl import logging
from av.video.reformatter import Interpolation, VideoReformatter

from vgpt_jax.data import file_facts
from vgpt_jax.data.buckets import assign, config_buckets
from vgpt_jax.data.sources import SKIP_REASONS, BadVideo, NoUsableVideo, VideoSource, Window, cover_crop, stride_range

VIDEO_EXTENSIONS: tuple[str, ...] = ("mp4", "mov", "mkv", "webm", "avi", "m4v")

# PyAV/FFmpeg failures that mean "this file cannot give the clip"; anything else is a bug and escapes.
_AV_ERRORS = (av.FFmpegError, OSError, EOFError, ValueError, RuntimeError, MemoryError, OverflowError)

# Per-process memo of facts about a file that do not depend on the random draw (counted frame
# counts, rng-independent rejections). A process meets a file about once per epoch over a large
# collection, so this only pays off for small ones; the bound keeps it cheap.
_MEMO_LIMIT = 100_000


def _normalise_extensions(extensions: Sequence[str]) -> tuple[str, ...]:
  """('.MP4', 'mov') -> ('mp4', 'mov'): lower case, no dot."""
  return tuple(sorted({e.lower().lstrip(".") for e in extensions if e.strip(". ")}))


def _has_extension(name: str, extensions: tuple[str, ...]) -> bool:
  ext = os.path.splitext(name)[1][1:].lower()
  return bool(ext) and ext in extensions


def _walk(directory: str, extensions: tuple[str, ...]) -> Iterator[str]:
  """Video paths under `directory` (recursive, symlinked directories not followed), in walk order."""
  for root, dirs, files in os.walk(directory):
    dirs.sort()
    for name in sorted(files):
      if _has_extension(name, extensions):
        yield os.path.join(root, name)


def find_videos(directory: str, extensions: Sequence[str] = VIDEO_EXTENSIONS) -> list[str]:
  """Sorted paths of the video files under `directory`, recursively, matching `extensions` case-insensitively."""
  return sorted(_walk(directory, _normalise_extensions(extensions)))


def has_videos(directory: str, extensions: Sequence[str] = VIDEO_EXTENSIONS) -> bool:
  """Whether `directory` holds at least one video file; stops at the first, so it is cheap when true."""
  return next(_walk(directory, _normalise_extensions(extensions)), None) is not None


def parse_time(text: str) -> float:
  """Seconds from `12.5`, `MM:SS.fff` or `H:MM:SS.fff` (Panda-70M's timestamps); ValueError otherwise."""
  parts = text.strip().split(":")
  if not 1 <= len(parts) <= 3:
    raise ValueError(f"{text!r} is not seconds, MM:SS or H:MM:SS")
  seconds = 0.0
  for part in parts:
    seconds = seconds * 60 + float(part)
  if seconds < 0 or not np.isfinite(seconds):
    raise ValueError(f"{text!r} is not a time >= 0")
  return seconds


def _resolve(path: str, base: str) -> str:
  return path if "://" in path or os.path.isabs(path) else os.path.join(base, path)


def _clip(manifest: str, number: int, start: str, end: str) -> tuple[float, float]:
  try:
    clip = (parse_time(start), parse_time(end))
  except ValueError as e:
    raise ValueError(f"{manifest} line {number}: {e} (format: path,start_seconds,end_seconds)") from None
  if clip[1] <= clip[0]:
    raise ValueError(f"{manifest} line {number}: the clip ends ({end}) before it starts ({start})")
  return clip


def _panda_rows(manifest: str, lines: list[tuple[int, str]]) -> Iterator[tuple[str, tuple[float, float]]]:
  """(path, clip) per timestamp pair of a Panda-70M style CSV (columns videoID or path, and timestamp)."""
  import ast

  header = next(csv.reader([lines[0][1]]))
  for number, row in zip((n for n, _ in lines[1:]), csv.DictReader([line for _, line in lines])):
    path = row.get("path") or f"{row.get('videoID', '')}.mp4"
    if path == ".mp4":
      raise ValueError(f"{manifest} line {number}: no path or videoID (columns {header})")
    try:
      pairs = ast.literal_eval(row["timestamp"])
    except (ValueError, SyntaxError):
      raise ValueError(f"{manifest} line {number}: timestamp {row['timestamp']!r} is not a list of pairs") from None
    for start, end in pairs:
      yield path, _clip(manifest, number, str(start), str(end))


def read_manifest(manifest: str) -> tuple[list[str], list[int], list[tuple[float, float] | None]]:
  """(paths, frame counts, clips) from a manifest; count 0 = unknown, clip (start, end) seconds or None = whole.

  Lines are `path`, `path<TAB>frame_count`, or `path,start,end` (tab or comma separated; times in seconds
  or [H:]MM:SS.fff) for a clip of a long video; a CSV whose header has a `timestamp` column is read as
  Panda-70M's (a `videoID` or `path` column, timestamps `[['0:00:01.000', '0:00:05.500'], ...]`, one clip
  each; videoID -> videoID.mp4). Raises ValueError naming a bad line.
  """
  base = os.path.dirname(os.path.abspath(manifest))
  with open(manifest, encoding="utf-8", errors="surrogateescape") as f:
    lines = [(n, line.rstrip("\r\n")) for n, line in enumerate(f, 1)]
  lines = [(n, line) for n, line in lines if line.strip() and not line.lstrip().startswith("#")]
  paths, counts, clips = [], [], []
  if lines and "timestamp" in next(csv.reader([lines[0][1]])):
    for path, clip in _panda_rows(manifest, lines):
      paths.append(_resolve(path, base))
      counts.append(0)
      clips.append(clip)
    return paths, counts, clips
  for number, line in lines:
    path, count, clip = line.strip(), "", None
    if "\t" in line:
      fields = [x.strip() for x in line.split("\t")]
      if len(fields) == 3:
        path, clip = fields[0], _clip(manifest, number, fields[1], fields[2])
      elif len(fields) == 2:
        path, count = fields
      else:
        raise ValueError(f"{manifest} line {number}: expected path<TAB>frame_count or path<TAB>start<TAB>end")
    elif line.count(",") >= 2:  # path,start,end; a path that merely holds commas stays a path
      head, start, end = (x.strip() for x in line.rsplit(",", 2))
      try:
        parse_time(start), parse_time(end)
      except ValueError:
        pass
      else:
        path, clip = head, _clip(manifest, number, start, end)
    if not path:
      raise ValueError(f"{manifest} line {number}: empty path")
    frames = 0
    if count:
      try:
        frames = int(count)
      except ValueError:
        raise ValueError(
          f"{manifest} line {number}: frame count {count!r} is not an integer (format: path<TAB>frame_count)"
        ) from None
      if frames < 0:
        raise ValueError(f"{manifest} line {number}: frame count {frames} is negative (0 means unknown)")
    paths.append(_resolve(path, base))
    counts.append(frames)
    clips.append(clip)
  return paths, counts, clips


def manifest_has_entries(manifest: str) -> bool:
  """Whether the manifest lists at least one path; reads only up to the first."""
  with open(manifest, encoding="utf-8", errors="surrogateescape") as f:
    return any(line.strip() and not line.lstrip().startswith("#") for line in f)


class PathList:
  """Compact, picklable list of paths with frame counts (0 = unknown).

  Millions of Python strings cost ~100 bytes each in every Grain worker and
  pickle slowly; one bytes blob plus an offset array costs the path's bytes.
  """

  def __init__(
    self,
    paths: Sequence[str],
    frames: Sequence[int] | None = None,
    clips: Sequence[tuple[float, float] | None] | np.ndarray | None = None,
    starts: Sequence[int] | None = None,
  ):
    encoded = [os.fsencode(p) for p in paths]
    n = len(encoded)
    self._offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum([len(p) for p in encoded], out=self._offsets[1:])
    self._blob = b"".join(encoded)
    self.frames = np.zeros(n, np.int64) if frames is None else np.asarray(frames, np.int64)
    # A clip of a long video: (start, end) seconds from the manifest (NaN: the whole file) and, once the file's
    # frame rate is known (VideoFileSource), its first frame; `frames` is then the clip's frame count.
    if clips is None or isinstance(clips, np.ndarray):
      self.clips = np.full((n, 2), np.nan) if clips is None else np.asarray(clips, np.float64).reshape(n, 2)
    else:
      self.clips = np.array([(np.nan, np.nan) if c is None else c for c in clips], np.float64).reshape(n, 2)
    self.starts = np.zeros(n, np.int64) if starts is None else np.asarray(starts, np.int64)
    if self.frames.shape != (n,) or self.starts.shape != (n,):
      raise ValueError(f"{n} paths but {self.frames.shape} frame counts and {self.starts.shape} starts")

  def __len__(self) -> int:
    return len(self._offsets) - 1

  def __getitem__(self, index: int) -> str:
    return os.fsdecode(self._blob[self._offsets[index] : self._offsets[index + 1]])

  def __iter__(self) -> Iterator[str]:
    return (self[i] for i in range(len(self)))

  def take(self, indices: Sequence[int]) -> "PathList":
    picked = np.asarray(indices, dtype=np.int64)
    return PathList([self[i] for i in picked], self.frames[picked], self.clips[picked], self.starts[picked])


def write_manifest(directory: str, out: str, extensions: Sequence[str] = VIDEO_EXTENSIONS) -> int:
  """Writes `path<TAB>frame_count` for every video under `directory` (paths relative to `out`); returns the count.

  Unreadable files get count 0 and stay in the list (the pipeline skips and
  counts them), so the manifest is a faithful listing.
  """
  base = os.path.dirname(os.path.abspath(out))
  paths = find_videos(directory, extensions)
  with open(out, "w", encoding="utf-8", errors="surrogateescape") as f:
    f.write("# path<TAB>frame_count (0: unknown)\n")
    for path in paths:
      try:
        frames = probe(path).frames
      except BadVideo:
        frames = 0
      f.write(f"{os.path.relpath(os.path.abspath(path), base)}\t{frames}\n")
  return len(paths)


# ------------------------------------------------------------------------ decoding


class VideoInfo:
  """What the container says about the first video stream."""

  def __init__(self, width: int, height: int, frames: int, fps: Fraction):
    self.width, self.height, self.frames, self.fps = width, height, frames, fps

  def __repr__(self) -> str:
    return f"VideoInfo(width={self.width}, height={self.height}, frames={self.frames}, fps={self.fps})"


def _open(path: str) -> av.container.InputContainer:
  if not os.path.exists(path) and "://" not in path:
    raise BadVideo("unreadable", f"{path}: no such file")
  if "://" not in path and os.path.getsize(path) == 0:
    raise BadVideo("unreadable", f"{path}: empty file")
  try:
    return av.open(path, mode="r", metadata_errors="ignore")
  except _AV_ERRORS as e:
    raise BadVideo("unreadable", f"{path}: {e}") from None


_STILLS = (
  av.stream.Disposition.attached_pic | av.stream.Disposition.still_image | av.stream.Disposition.timed_thumbnails
)


def _video_stream(container: av.container.InputContainer, path: str) -> av.video.stream.VideoStream:
  """The first moving-picture stream (cover art and thumbnails, common in mp4/m4v/mkv, are skipped)."""
  for stream in container.streams.video:
    if not stream.disposition & _STILLS:
      return stream
  raise BadVideo("no_video_stream", f"{path}: no video stream")


def _fps(stream: av.video.stream.VideoStream, path: str) -> Fraction:
  for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
    if rate:
      return Fraction(rate)
  raise BadVideo("unreadable", f"{path}: no frame rate")


def _count_packets(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> int:
  """Frames of a stream whose container stores no count (mkv, webm): demux without decoding."""
  return sum(1 for packet in container.demux(stream) if packet.size)


def probe(path: str, frames_hint: int = 0) -> VideoInfo:
  """Size, frame count and rate of the file's first video stream; counts packets if the header has no count."""
  container = _open(path)
  try:
    stream = _video_stream(container, path)
    ctx = stream.codec_context
    info = VideoInfo(int(ctx.width), int(ctx.height), int(frames_hint or stream.frames), _fps(stream, path))
    if info.frames <= 0:
      info.frames = _count_packets(container, stream)
    return info
  except _AV_ERRORS as e:
    raise BadVideo("unreadable", f"{path}: {e}") from None
  finally:
    container.close()


def check_shape(info: VideoInfo, path: str, min_size: int, max_aspect: float) -> None:
  """Rejects frames too elongated or too small to crop a useful view from (SPEC section 6), in that order."""
  short, long = sorted((info.width, info.height))
  if short <= 0:
    raise BadVideo("unreadable", f"{path}: frame size {info.width}x{info.height}")
  if long / short > max_aspect:
    raise BadVideo(
      "bad_aspect", f"{path}: {info.width}x{info.height}, aspect {long / short:.2f} over data.max_aspect={max_aspect}"
    )
  if short < min_size:
    raise BadVideo("too_small", f"{path}: {info.width}x{info.height}, shorter side under data.min_size={min_size}")


# Names the logic of `inspect_file`; bump it when that changes so cached facts are found again.
INSPECT_VERSION = "2"  # 2: facts carry the frame rate (clips of long videos)


def inspect_file(path: str) -> dict:
  """What a file is, independent of any config: {"fault", "detail", "width", "height", "frames"}.

  fault: None, "unreadable" (cannot be opened, or nothing decodes), "no_video_stream",
  or "truncated" (the last frame the header promises does not decode: a file cut
  short). Decodes only the last frames (a seek to the final keyframe); a damaged
  file may cost a decode from the start.
  """
  facts = {"fault": None, "detail": "", "width": 0, "height": 0, "frames": 0, "fps": 0.0}
  try:
    info = probe(path)
  except BadVideo as e:
    return {**facts, "fault": e.reason, "detail": e.detail}
  facts.update(width=info.width, height=info.height, frames=info.frames, fps=float(info.fps))
  if info.frames <= 0 or min(info.width, info.height) <= 0:
    return {**facts, "fault": "unreadable", "detail": f"{path}: {info.width}x{info.height}, {info.frames} frames"}
  try:
    read_clip(path, lambda n: (n - 1, 1, 1), height=1, width=1, frames_hint=info.frames)
  except BadVideo as e:
    return {**facts, "fault": e.reason, "detail": e.detail}
  return facts


def judge(facts: dict, path: str, min_frames: int, min_size: int, max_aspect: float) -> BadVideo | None:
  """Why the inspected file cannot give clips under this config (None when it can), in SKIP_REASONS order."""
  if facts["fault"] in ("unreadable", "no_video_stream"):
    return BadVideo(facts["fault"], facts["detail"] or path)
  info = VideoInfo(facts["width"], facts["height"], facts["frames"], Fraction(1))
  try:
    check_shape(info, path, min_size, max_aspect)
  except BadVideo as e:
    return e
  if facts["frames"] < min_frames:
    return BadVideo(
      "too_short", f"{path}: {facts['frames']} frames < data.num_frames * data.frame_stride = {min_frames}"
    )
  if facts["fault"]:
    return BadVideo(facts["fault"], facts["detail"] or path)
  return None


class _FrameWriter:
  """Decoded frames -> rows of the uint8 [F, H, W, 3] output: bicubic cover-scale, centre crop."""

  def __init__(self, out: np.ndarray, width: int, height: int):
    self.out = out
    new_h, new_w, self.top, self.left = cover_crop(height, width, *out.shape[1:3])
    self.size = (new_w, new_h)
    self.reformatter = VideoReformatter()  # one swscale context for the whole clip

  def write(self, row: int, frame: av.VideoFrame) -> None:
    rgb = self.reformatter.reformat(
      frame, width=self.size[0], height=self.size[1], format="rgb24", interpolation=Interpolation.BICUBIC, threads=1
    ).to_ndarray()
    h, w = self.out.shape[1:3]
    self.out[row] = rgb[self.top : self.top + h, self.left : self.left + w]


def _decode_targets(
  container: av.container.InputContainer,
  stream: av.video.stream.VideoStream,
  fps: Fraction,
  targets: np.ndarray,
  writer: _FrameWriter,
  seek: bool,
) -> tuple[int, int, BaseException | None]:
  """Fills writer rows for frame indices `targets` (sorted); returns (rows filled, frames decoded, error).

  Frame index = round((pts - start) * time_base * fps). Row j gets the first
  decoded frame whose index is >= targets[j]. With `seek`, decoding starts at
  the keyframe at or before targets[0]; a seek that lands after it returns
  (0, -1, None) so the caller decodes from the start instead.
  """
  start = stream.start_time or 0
  time_base = Fraction(stream.time_base) if stream.time_base else Fraction(1, 1)
  if seek:
    container.seek(start + int(Fraction(int(targets[0])) / fps / time_base), stream=stream, backward=True)
  frames_per_tick = float(time_base * fps)  # float: exact enough for indices, cheaper than Fraction per frame
  filled, decoded, index, last = 0, 0, -1, None
  try:
    for frame in container.decode(stream):
      index = index + 1 if frame.pts is None else round((frame.pts - start) * frames_per_tick)
      if seek and decoded == 0 and index > targets[0]:
        return 0, -1, None
      decoded, last = decoded + 1, frame
      if index < targets[filled]:
        continue
      first = filled
      while filled < len(targets) and targets[filled] <= index:
        filled += 1
      writer.write(first, frame)
      writer.out[first + 1 : filled] = writer.out[first]  # a gap in the timestamps: repeat the frame
      if filled == len(targets):
        return filled, decoded, None
  except _AV_ERRORS as e:
    return filled, decoded, e
  # Clean end one frame short of the last target (timestamp rounding): the last frame stands in for it.
  if last is not None and filled == len(targets) - 1 and targets[filled] - index <= 1:
    writer.write(filled, last)
    filled += 1
  return filled, decoded, None


def _open_video(path: str, threads: int) -> tuple[av.container.InputContainer, av.video.stream.VideoStream]:
  """Opened container and its first video stream with the decoder's threading set (before it opens)."""
  container = _open(path)
  try:
    stream = _video_stream(container, path)
    stream.codec_context.thread_count = threads
    stream.codec_context.thread_type = "NONE" if threads == 1 else "AUTO"
  except BaseException:
    container.close()
    raise
  return container, stream


def read_clip(
  path: str,
  window: Window,
  *,
  height: int,
  width: int,
  min_size: int = 1,
  max_aspect: float = float("inf"),
  frames_hint: int = 0,
  threads: int = 1,
  seek: bool = True,
  first_frame: int = 0,
) -> tuple[np.ndarray, int]:
  """uint8 [count, height, width, 3] frames start, start+k, ... of `path`, and the video's frame count.

  `window(frame_count) -> (start, k, count)` picks the frames once the count is
  known (and raises BadVideo("too_short") if none fit). `frames_hint` > 0 replaces
  the container's count (a manifest's); `threads` is FFmpeg's decoder thread
  count (0: FFmpeg decides, 1: none); `seek=False` always decodes from the
  first frame (for tests and benchmarks). `first_frame` > 0 reads a clip of a
  long video: the window indexes the frames from there on (`frames_hint` frames:
  the clip's count). Raises BadVideo; no PyAV exception escapes.
  """
  container, stream = _open_video(path, threads)
  try:
    ctx = stream.codec_context
    info = VideoInfo(int(ctx.width), int(ctx.height), int(frames_hint or stream.frames), _fps(stream, path))
    check_shape(info, path, min_size, max_aspect)
    if info.frames <= 0:
      info.frames = probe(path).frames  # a separate pass, so this container stays at the start
    try:
      start, stride, num_frames = window(info.frames)
    except BadVideo as e:
      raise BadVideo(e.reason, f"{path}: {e.detail}") from None
    targets = first_frame + start + stride * np.arange(num_frames)
    if start < 0 or stride < 1 or num_frames < 1 or targets[-1] >= first_frame + info.frames:
      raise IndexError(
        f"window gave start={start}, stride={stride}, count={num_frames}: outside the {info.frames} frames of {path}"
      )
    writer = _FrameWriter(np.empty((num_frames, height, width, 3), dtype=np.uint8), info.width, info.height)
    filled, decoded, error = 0, -1, None
    if seek and targets[0] > 0:
      try:
        filled, decoded, error = _decode_targets(container, stream, info.fps, targets, writer, seek=True)
      except _AV_ERRORS:
        decoded = -1  # the seek itself failed
      if decoded <= 0:  # nothing came after the seek: read from the start instead
        container.close()
        container, stream = _open_video(path, threads)
    if decoded <= 0:
      filled, decoded, error = _decode_targets(container, stream, info.fps, targets, writer, seek=False)
    if filled < num_frames:
      why = f"decoder error: {error}" if error is not None else "end of stream"
      if decoded <= 0:
        raise BadVideo("unreadable", f"{path}: no frame could be decoded ({why})")
      raise BadVideo(
        "truncated",
        f"{path}: {why} after {decoded} frames; needed frame {int(targets[filled])} of the {info.frames} claimed",
      )
    return writer.out, info.frames
  except _AV_ERRORS as e:
    raise BadVideo("unreadable", f"{path}: {e}") from None
  finally:
    container.close()


# -------------------------------------------------------------------------- source


def _listing(directory: str, manifest: str, extensions: tuple[str, ...]) -> tuple[PathList, str]:
  """The files of a directory or manifest, and a description naming where they came from."""
  if manifest:
    paths, frames, clips = read_manifest(manifest)
    return PathList(paths, frames, clips), f"manifest {manifest}"
  return PathList(
    find_videos(directory, extensions)
  ), f"directory {directory} (recursive, *.{{{','.join(extensions)}}})"


def split_files(data_cfg: Any, split: str) -> tuple[PathList, str]:
  """The files of `split` ("train" or "eval") and a description of them, per the module docstring's rule."""
  if split not in ("train", "eval"):
    raise ValueError(f"Unknown split {split!r}; valid splits are ['train', 'eval'].")
  extensions = _normalise_extensions(data_cfg.extensions)
  files, where = _listing(data_cfg.path, data_cfg.manifest, extensions)
  if not len(files):
    raise ValueError(
      f"no video files in {where}; data.source='video_files' needs files with one of the extensions "
      f"{list(extensions)} (data.extensions) under data.path, or their paths in data.manifest"
    )
  eval_path, eval_manifest = data_cfg.eval_path, data_cfg.eval_manifest
  if eval_path or eval_manifest:
    held_out, eval_where = _listing(eval_path, eval_manifest, extensions)
    if split == "eval":
      if not len(held_out):
        raise ValueError(f"no video files in {eval_where} (data.eval_path / data.eval_manifest)")
      return held_out, f"{eval_where} (eval split)"
    held = {os.path.abspath(p) for p in held_out}
    keep = [i for i, p in enumerate(files) if os.path.abspath(p) not in held]
    if not keep:
      raise ValueError(f"every file of {where} is also in the eval set {eval_where}; nothing is left to train on")
    return (files if len(keep) == len(files) else files.take(keep)), f"{where} (train split, {eval_where} excluded)"
  num_eval = int(data_cfg.num_eval_videos)
  if num_eval >= len(files):
    raise ValueError(
      f"data.num_eval_videos={num_eval} would hold out all {len(files)} videos of {where} for evaluation; "
      "lower data.num_eval_videos or give a separate set with data.eval_path / data.eval_manifest"
    )
  cut = len(files) - num_eval
  if split == "eval":
    return files.take(range(cut, len(files))), f"{where} (eval split: the last {num_eval} of {len(files)} files)"
  return files.take(range(cut)), f"{where} (train split: the first {cut} of {len(files)} files)"


def _cache_location(data_cfg: Any, split: str) -> str:
  """The directory or manifest that lists `split`'s files (where their facts are cached)."""
  if split == "eval":
    eval_location = data_cfg.eval_path or data_cfg.eval_manifest
    if eval_location:
      return eval_location
  return data_cfg.path or data_cfg.manifest


class VideoFileSource(VideoSource):
  """`VideoSource` over video files: index -> uint8 clip [F, H, W, 3] decoded with PyAV.

  Picklable (paths are one bytes blob), so it ships to Grain worker
  processes; each process keeps its own small memo of frame counts and
  rejections.
  """

  def __init__(self, data_cfg: Any, split: str = "train"):
    listed, self._where = split_files(data_cfg, split)
    self.split = split
    self.num_frames = int(data_cfg.num_frames)
    self.height, self.width = int(data_cfg.height), int(data_cfg.width)
    self.clip_shape = (self.num_frames, self.height, self.width, 3)
    self.strides = stride_range(data_cfg)
    self.min_size = int(data_cfg.min_size)
    self.max_aspect = float(data_cfg.max_aspect)
    self.threads = int(data_cfg.decode_threads)
    self.buckets = config_buckets(data_cfg)
    self.bucket_shapes = tuple((b.frames or self.num_frames, b.height, b.width, 3) for b in self.buckets)
    self._memo: dict[int, int | BadVideo] = {}
    self.files, self.bucket_of, self.excluded = self._usable(listed, _cache_location(data_cfg, split))

  def _usable(self, listed: PathList, location: str) -> tuple[PathList, np.ndarray | None, dict[str, int]]:
    """The listed files that can give clips under this config, their buckets (None without data.buckets), and
    how many were excluded per reason.

    Every file is inspected once (in parallel; cached beside the data, see
    file_facts.py), so a bad file is never drawn and the counts are exact.
    Raises NoUsableVideo when no file is usable.
    """
    paths = list(listed)
    unique = list(dict.fromkeys(paths))  # the clips of one long video share its file's facts: probed once
    found = file_facts.collect(
      unique, inspect_file, file_facts.default_cache(location), INSPECT_VERSION, what=f"{self.split} videos"
    )
    by_path = dict(zip(unique, found))
    facts = [by_path[p] for p in paths]
    excluded = dict.fromkeys(SKIP_REASONS, 0)
    examples: dict[str, str] = {}
    keep, frames, starts, buckets = [], [], [], []
    min_frames = min(shape[0] for shape in self.shapes()) * self.strides[0]
    for i, fact in enumerate(facts):
      listed_count = int(listed.frames[i])  # a manifest's count bounds the frames used; a stale larger one is ignored
      fact = {**fact, "frames": min(listed_count, fact["frames"]) if listed_count else fact["frames"]}
      start, end = listed.clips[i]
      first = 0
      if not np.isnan(start):  # a clip: frames [round(start * fps), round(end * fps)) of the file
        first = int(round(start * fact["fps"]))
        fact["frames"] = max(0, min(fact["frames"], int(round(end * fact["fps"]))) - first)
      bad = judge(fact, listed[i], min_frames, self.min_size, self.max_aspect)
      if bad is None:
        keep.append(i)
        frames.append(fact["frames"])
        starts.append(first)
        if self.buckets:  # some bucket's clip fits: judge checked the shortest
          w, h, n = fact["width"], fact["height"], fact["frames"]
          buckets.append(assign(w, h, self.buckets, n, self.num_frames, self.strides[0]))
      else:
        excluded[bad.reason] += 1
        examples.setdefault(bad.reason, str(bad))
    counts = ", ".join(f"{reason}={n}" for reason, n in excluded.items() if n)
    if not keep:
      raise NoUsableVideo(
        f"none of the {len(listed)} videos of {self._where} is usable ({counts}); e.g. "
        + "; ".join(examples.values())
        + ". Check the files, data.min_size, data.max_aspect and data.num_frames * data.frame_stride"
      )
    if counts:
      logging.warning(
        "%s: %d of %d videos are unusable and never drawn (%s); e.g. %s",
        self._where,
        len(listed) - len(keep),
        len(listed),
        counts,
        "; ".join(examples.values())[:2000],
      )
    usable = PathList([listed[i] for i in keep], frames, listed.clips[keep], starts)
    return usable, np.asarray(buckets, np.int64) if self.buckets else None, excluded

  def __len__(self) -> int:
    return len(self.files)

  def __getstate__(self) -> dict:
    return {**self.__dict__, "_memo": {}}

  def describe(self) -> str:
    return self._where

  def name(self, index: int) -> str:
    return self.files[index]

  def read(self, index: int, window: Window) -> np.ndarray:
    """uint8 [count, H, W, 3]: the window's frames of file `index`, cover-scaled and centre-cropped; BadVideo."""
    index = int(index)
    if not 0 <= index < len(self.files):
      raise IndexError(f"Video index {index} out of range [0, {len(self.files)}).")
    known = self._memo.get(index)
    if isinstance(known, BadVideo):
      raise BadVideo(known.reason, known.detail)
    hint = int(self.files.frames[index]) or (known or 0)
    _, height, width, _ = self.shapes()[self.bucket(index)]
    try:
      clip, frames = read_clip(
        self.files[index],
        window,
        height=height,
        width=width,
        min_size=self.min_size,
        max_aspect=self.max_aspect,
        frames_hint=hint,
        threads=self.threads,
        first_frame=int(self.files.starts[index]),
      )
    except BadVideo as e:
      if e.reason != "truncated":  # the others do not depend on the drawn window
        self._remember(index, e)
      raise
    if not hint:
      self._remember(index, frames)
    return clip

  def _remember(self, index: int, fact: int | BadVideo) -> None:
    if len(self._memo) >= _MEMO_LIMIT:
      self._memo.clear()
    self._memo[index] = fact

  def __repr__(self) -> str:
    return f"VideoFileSource({len(self)} videos from {self._where})"


def _check_location(problems: list[str], prefix: str, directory: str, manifest: str, extensions: tuple[str, ...]):
  """Appends what is wrong with data.{prefix}path / data.{prefix}manifest (both empty is the caller's business)."""
  pfield, mfield = f"data.{prefix}path", f"data.{prefix}manifest"
  if directory and manifest:
    problems.append(f"{pfield}={directory!r} and {mfield}={manifest!r} are both set; set one of them")
  elif directory:
    if not os.path.isdir(directory):
      hint = f" (for a file listing videos use {mfield})" if os.path.isfile(directory) else ""
      problems.append(f"{pfield}={directory!r} is not an existing directory{hint}")
    elif extensions and not has_videos(directory, extensions):
      problems.append(
        f"{pfield}={directory!r} holds no video files with extensions {list(extensions)} "
        "(searched recursively; data.extensions sets others)"
      )
  elif manifest:
    if not os.path.isfile(manifest):
      problems.append(f"{mfield}={manifest!r} is not an existing file (it lists one video path per line)")
    elif not manifest_has_entries(manifest):
      problems.append(f"{mfield}={manifest!r} lists no video paths")


def validate_config(data_cfg: Any) -> list[str]:
  """Problems with the video-file fields of a data config (empty when sound); each names its field and fix.

  Cheap: checks that paths exist and that a directory holds at least one
  video (the walk stops at the first), without listing everything.
  """
  problems: list[str] = []
  extensions = _normalise_extensions(data_cfg.extensions)
  if not extensions:
    problems.append(f"data.extensions={data_cfg.extensions!r} is empty; give e.g. ('mp4', 'mov')")
  path, manifest = str(data_cfg.path), str(data_cfg.manifest)
  if not path and not manifest:
    problems.append(
      "data.source='video_files' needs data.path (a directory of videos) or data.manifest "
      "(a text file with one video path per line)"
    )
  _check_location(problems, "", path, manifest, extensions)
  eval_path, eval_manifest = str(data_cfg.eval_path), str(data_cfg.eval_manifest)
  _check_location(problems, "eval_", eval_path, eval_manifest, extensions)
  if not eval_path and not eval_manifest and int(data_cfg.num_eval_videos) < 1:
    problems.append(
      f"data.num_eval_videos={data_cfg.num_eval_videos} must be >= 1 (the last files are held out for "
      "the end-of-run samples), or give held-out videos with data.eval_path / data.eval_manifest"
    )
  min_size, max_aspect = data_cfg.min_size, data_cfg.max_aspect
  if int(min_size) < 1:
    problems.append(f"data.min_size={min_size} must be >= 1 (pixels of the shorter side)")
  if float(max_aspect) < 1.0:
    problems.append(f"data.max_aspect={max_aspect} must be >= 1 (long side / short side)")
  threads = data_cfg.decode_threads
  if int(threads) < 0:
    problems.append(f"data.decode_threads={threads} must be >= 0 (0: FFmpeg decides, 1: no threads)")
  return problems


def _main(argv: Sequence[str] | None = None) -> None:
  """python -m vgpt_jax.data.video_files DIRECTORY MANIFEST: list a collection once, with frame counts."""
  import argparse

  parser = argparse.ArgumentParser(description=_main.__doc__)
  parser.add_argument("directory")
  parser.add_argument("manifest")
  parser.add_argument("--extensions", default=",".join(VIDEO_EXTENSIONS))
  args = parser.parse_args(argv)
  count = write_manifest(args.directory, args.manifest, args.extensions.split(","))
  print(f"wrote {count} videos to {args.manifest}")


if __name__ == "__main__":
  _main()
