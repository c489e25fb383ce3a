"""Video-file pipeline throughput: raw PyAV clip decoding vs the full Grain pipeline (issue 4).

  python -m vgpt_jax.benchmarks.video_pipeline [--dir=DIR] [--files=16 --size=640x360 --frames=240 --gop=60]
      [--height=176 --width=320 --num_frames=16 --stride=4 --stride_max=4] [--clips=96 --batch_size=4]
      [--workers=0,1,2 --read_threads=2 --decode_threads=1,0 --repeats=3]

Without --dir it first writes a set of H.264 mp4 files (moving texture, so
they compress like real footage) into --cache. It then measures, on the same
clips (the pipeline's samples up to --clips, less the warm-up batches):
  raw       VideoFileSource.clip in a loop: open, keyframe seek, decode to the
            last needed frame, bicubic cover-scale + centre crop; no Grain;
            in one process, and split over as many processes as CPUs;
            output frames per second.
  pipeline  train_dataset(...) for each --workers (Grain worker processes) with
            --read_threads prefetch threads: clips/s and frames/s in steady
            state (worker start-up and the prefetch head start excluded),
            and the ratios to raw.
and prints a markdown table of the best of --repeats interleaved rounds (a
shared machine's other load only ever slows a round down). --decode_threads
lists FFmpeg decoder thread counts to try (1: none, 0: FFmpeg decides).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import tempfile
import time

import av
import numpy as np

from vgpt_jax.data import file_facts
from vgpt_jax.data.pipeline import HostSlice, default_data_config, make_source, train_dataset, train_index_dataset
from vgpt_jax.data.video_files import INSPECT_VERSION, VideoFileSource, find_videos, inspect_file


def texture_frames(seed: int, frames: int, width: int, height: int) -> np.ndarray:
  """uint8 [T, H, W, 3]: a random texture panning diagonally plus a moving bright square (real-ish motion)."""
  rng = np.random.default_rng(seed)
  base = rng.integers(0, 256, (height // 4 + frames, width // 4 + frames, 3), dtype=np.uint8)
  base = np.repeat(np.repeat(base, 4, axis=0), 4, axis=1)  # 4x4 blocks: detail x264 can still compress
  out = np.empty((frames, height, width, 3), np.uint8)
  side = min(height, width) // 4
  for t in range(frames):
    out[t] = base[2 * t : 2 * t + height, 3 * t : 3 * t + width]
    y, x = (t * 5) % (height - side), (t * 7) % (width - side)
    out[t, y : y + side, x : x + side] = 240
  return out


def write_files(directory: str, count: int, width: int, height: int, frames: int, gop: int) -> list[str]:
  """Writes `count` H.264 mp4 files (30 fps, keyframe every `gop` frames) unless they are there already."""
  os.makedirs(directory, exist_ok=True)
  paths = []
  for i in range(count):
    path = os.path.join(directory, f"video_{i:03d}_{width}x{height}_{frames}f_gop{gop}.mp4")
    paths.append(path)
    if os.path.exists(path):
      continue
    with av.open(path + ".tmp", "w", format="mp4") as container:
      stream = container.add_stream("libx264", rate=30, options={"preset": "veryfast", "crf": "23"})
      stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
      stream.codec_context.gop_size = gop
      for frame in texture_frames(i, frames, width, height):
        container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
      container.mux(stream.encode())
    os.replace(path + ".tmp", path)
  return paths


def bench_config(args: argparse.Namespace, directory: str, decode_threads: int, workers: int):
  cfg = default_data_config()
  cfg.source = "video_files"
  cfg.path = directory
  cfg.height, cfg.width = args.height, args.width
  cfg.num_frames = args.num_frames
  cfg.frame_stride, cfg.frame_stride_max = args.stride, args.stride_max
  cfg.min_size = 1
  cfg.num_eval_videos = 1
  cfg.decode_threads = decode_threads
  cfg.worker_count = workers
  cfg.read_threads = args.read_threads
  cfg.prefetch_batches = args.prefetch_batches
  return cfg


def _clips_todo(cfg, args: argparse.Namespace) -> list[tuple[int, int]]:
  """The (global position, video index) pairs that `pipeline_rate` times, for seed 0."""
  elements = train_index_dataset(len(make_source(cfg, "train")), 0, HostSlice(args.batch_size))
  first = (args.prefetch_batches + 2) * args.batch_size
  return [tuple(int(x) for x in elements[i][:2]) for i in range(first, args.clips // args.batch_size * args.batch_size)]


def _decode_clips(cfg, todo: list[tuple[int, int]], barrier=None, results=None) -> float:
  """Seconds to cut `todo`'s clips with VideoFileSource.clip (after one warm-up clip and the barrier)."""
  source = VideoFileSource(cfg)
  source.clip(todo[0][1], np.random.default_rng([0, todo[0][0]]))  # warm the file cache and the imports
  if barrier is not None:
    barrier.wait()
  start = time.perf_counter()
  for position, index in todo:
    source.clip(index, np.random.default_rng([0, position]))
  seconds = time.perf_counter() - start
  if results is not None:
    results.put(seconds)
  return seconds


def raw_rate(cfg, args: argparse.Namespace, processes: int = 1) -> float:
  """Clips/s of VideoFileSource.clip over the pipeline's first --clips samples: no Grain, `processes` processes."""
  todo = _clips_todo(cfg, args)
  if processes == 1:
    return len(todo) / _decode_clips(cfg, todo)
  ctx = multiprocessing.get_context("spawn")
  barrier, results = ctx.Barrier(processes), ctx.Queue()
  workers = [
    ctx.Process(target=_decode_clips, args=(cfg, todo[k::processes], barrier, results)) for k in range(processes)
  ]
  for w in workers:
    w.start()
  seconds = max(results.get() for _ in workers)  # all start together at the barrier; the slowest one ends it
  for w in workers:
    w.join()
  return len(todo) / seconds


def pipeline_rate(cfg, args: argparse.Namespace) -> float:
  """Clips/s of the Grain pipeline in steady state.

  The clock starts once the first --prefetch_batches + 2 batches are out: by
  then worker start-up is over and the head start the prefetch buffer got
  while the first batch was made is used up (the consumer here takes batches
  at once, so after that every batch waits for the producers).
  """
  iterator = iter(train_dataset(cfg, 0, HostSlice(args.batch_size)))
  warm = args.prefetch_batches + 2
  timed = args.clips // args.batch_size - warm
  if timed < 4:
    raise ValueError(f"--clips={args.clips} leaves {timed} timed batches after {warm} warm-up ones; raise --clips")
  try:
    for _ in range(warm):
      next(iterator)
    start = time.perf_counter()
    for _ in range(timed):
      next(iterator)
    return timed * args.batch_size / (time.perf_counter() - start)
  finally:
    close = getattr(iterator, "close", None)
    if close:
      close()


def probe_rate(files: list[str]) -> str:
  """How fast the up-front probe of every file runs (VideoFileSource does it once per collection), cold and cached."""
  with tempfile.TemporaryDirectory() as tmp:
    cache = os.path.join(tmp, "facts.json")
    start = time.perf_counter()
    file_facts.collect(files, inspect_file, cache, INSPECT_VERSION)
    cold = time.perf_counter() - start
    start = time.perf_counter()
    file_facts.collect(files, inspect_file, cache, INSPECT_VERSION)
    warm = time.perf_counter() - start
  return (
    f"probe: {len(files)} files in {cold:.2f} s ({len(files) / cold:.1f} files/s, "
    f"{4 * (os.cpu_count() or 1)} threads); from the cache: {warm * 1000:.1f} ms"
  )


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--dir", default="", help="existing video directory (default: generate into --cache)")
  parser.add_argument("--cache", default="/tmp/vgpt_video_bench")
  parser.add_argument("--files", type=int, default=16)
  parser.add_argument("--size", default="640x360")
  parser.add_argument("--frames", type=int, default=240)
  parser.add_argument("--gop", type=int, default=60)
  parser.add_argument("--height", type=int, default=176)
  parser.add_argument("--width", type=int, default=320)
  parser.add_argument("--num_frames", type=int, default=16)
  parser.add_argument("--stride", type=int, default=4)
  parser.add_argument("--stride_max", type=int, default=4)
  parser.add_argument("--clips", type=int, default=96)
  parser.add_argument("--batch_size", type=int, default=4)
  parser.add_argument("--workers", default="0,1,2")
  parser.add_argument("--read_threads", type=int, default=2)
  parser.add_argument("--prefetch_batches", type=int, default=4)
  parser.add_argument("--decode_threads", default="1")
  parser.add_argument("--repeats", type=int, default=3, help="best of this many interleaved rounds")
  args = parser.parse_args(argv)

  directory = args.dir
  if not directory:
    width, height = (int(x) for x in args.size.split("x"))
    directory = os.path.join(args.cache, f"{args.files}x{args.size}x{args.frames}_gop{args.gop}")
    start = time.perf_counter()
    write_files(directory, args.files, width, height, args.frames, args.gop)
    print(f"videos in {directory} ({time.perf_counter() - start:.0f} s to prepare)")
  files = find_videos(directory)
  print(
    f"{len(files)} files, {os.cpu_count()} CPUs, PyAV {av.__version__} (FFmpeg {av.ffmpeg_version_info}); "
    f"clips of {args.num_frames} frames, stride {args.stride}..{max(args.stride, args.stride_max)}, "
    f"out {args.height}x{args.width}, {args.clips} clips per measurement, batch {args.batch_size}, "
    f"{args.read_threads} read threads\n"
  )
  print(probe_rate(files) + "\n")
  cores = os.cpu_count() or 1
  header = f"| decode threads | what | clips/s | frames/s | vs raw, 1 process | vs raw, {cores} processes |"
  rows = [header, "|---|---|---|---|---|---|"]
  for threads in (int(t) for t in args.decode_threads.split(",")):
    workers = [int(w) for w in args.workers.split(",")]
    kinds = ["raw1", "rawN"] + workers
    best = {kind: 0.0 for kind in kinds}  # clips/s, best of --repeats rounds, interleaved
    for _ in range(args.repeats):
      best["raw1"] = max(best["raw1"], raw_rate(bench_config(args, directory, threads, 0), args))
      if cores > 1:
        best["rawN"] = max(best["rawN"], raw_rate(bench_config(args, directory, threads, 0), args, cores))
      for w in workers:
        best[w] = max(best[w], pipeline_rate(bench_config(args, directory, threads, w), args))
    names = {"raw1": "raw PyAV, 1 process", "rawN": f"raw PyAV, {cores} processes"}
    for kind in kinds:
      if kind == "rawN" and cores == 1:
        continue
      clips = best[kind]
      what = names.get(kind, f"Grain pipeline, worker_count={kind}, {args.read_threads} read threads")
      rows.append(
        f"| {threads} | {what} | {clips:.2f} | {clips * args.num_frames:.0f} | {100 * clips / best['raw1']:.0f}% | "
        f"{100 * clips / max(best['rawN'], 1e-9):.0f}% |"
      )
      print(rows[-1], flush=True)
  print("\n" + "\n".join(rows))


if __name__ == "__main__":
  main()
