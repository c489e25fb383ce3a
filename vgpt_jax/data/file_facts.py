"""Facts about every file of a collection, found once in parallel and cached beside the data.

Used to probe a video collection before training (video_files.py): every file
is opened once, its facts (a dict of JSON values) are stored under its absolute
path with its size and modification time, and a later run re-probes only the
files that are new or changed. The cache is one JSON file, written atomically
(several processes may share it), beside the data when that directory is
writable, else under ~/.cache/vgpt_jax/file_facts/.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import tempfile
import time
from typing import Callable, Sequence

from absl import logging

Facts = dict  # JSON values only


def default_cache(location: str) -> str:
  """Where the facts of the files listed by `location` (a directory or a manifest) are cached."""
  location = os.path.abspath(location)
  beside = os.path.join(location, ".vgpt_file_facts.json") if os.path.isdir(location) else location + ".facts.json"
  if os.access(os.path.dirname(beside), os.W_OK):
    return beside
  digest = hashlib.sha256(location.encode()).hexdigest()[:16]
  return os.path.join(os.path.expanduser("~"), ".cache", "vgpt_jax", "file_facts", f"{digest}.json")


def _stamp(path: str) -> list[int] | None:
  """[size, mtime_ns] of a file, or None when it cannot be stat'ed (missing: never cached)."""
  try:
    st = os.stat(path)
  except OSError:
    return None
  return [st.st_size, st.st_mtime_ns]


def _load(cache: str, version: str) -> dict:
  try:
    with open(cache, encoding="utf-8") as f:
      data = json.load(f)
  except (OSError, ValueError):
    return {}
  return data.get("files", {}) if data.get("version") == version else {}


def _store(cache: str, version: str, files: dict) -> None:
  """Write the cache atomically; a cache that cannot be written only costs a re-probe next time."""
  try:
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(cache), prefix=".facts-", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      json.dump({"version": version, "files": files}, f)
    os.replace(tmp, cache)
  except OSError as e:
    logging.warning("could not write the file-facts cache %s (%s); the next run probes again", cache, e)


def collect(
  paths: Sequence[str],
  inspect: Callable[[str], Facts],
  cache: str,
  version: str,
  threads: int = 0,
  what: str = "files",
) -> list[Facts]:
  """inspect(path) for every path, in order: from the cache when the file is unchanged, else in parallel.

  `version` names the inspection logic: a cache written by another version is
  ignored. threads: 0 = 4 per CPU (inspection waits on I/O and on FFmpeg,
  which runs without the GIL).
  """
  known = _load(cache, version)
  stamps = [_stamp(p) for p in paths]
  keys = [os.path.abspath(p) for p in paths]
  out: list[Facts | None] = [None] * len(paths)
  todo = []
  for i, (key, stamp) in enumerate(zip(keys, stamps)):
    entry = known.get(key)
    if stamp is not None and entry is not None and entry.get("stamp") == stamp:
      out[i] = entry["facts"]
    else:
      todo.append(i)
  if todo:
    start = time.time()
    logging.info("probing %d %s (%d known from %s)", len(todo), what, len(paths) - len(todo), cache)
    workers = threads or 4 * (os.cpu_count() or 1)
    report_every = max(1000, len(todo) // 10)
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(workers, len(todo))) as pool:
      for done, (i, facts) in enumerate(zip(todo, pool.map(lambda j: inspect(paths[j]), todo)), 1):
        out[i] = facts
        if stamps[i] is not None:
          known[keys[i]] = {"stamp": stamps[i], "facts": facts}
        if done % report_every == 0 and done < len(todo):
          logging.info("probed %d of %d %s", done, len(todo), what)
    elapsed = time.time() - start
    logging.info("probed %d %s in %.1fs (%.0f per second)", len(todo), what, elapsed, len(todo) / max(elapsed, 1e-9))
    _store(cache, version, known)
  return out  # type: ignore[return-value]
