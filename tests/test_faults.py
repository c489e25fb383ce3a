"""Real faults injected into real runs of the main job: damaged checkpoints, preemption and kill -9 at every
phase, bad configs. Each run is `python -m vgpt_jax.train` on the test config, compared with an uninterrupted
run of the same config: the losses must be the same bits.
"""

import json
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import cpu_env, logged_losses, train_command

STEPS = 24
RUN = [
  "--config.train.log_every=1",
  "--config.checkpoint.every_steps=4",
  "--config.checkpoint.keep_last=10",
  "--config.train.num_samples=1",
  "--config.train.tensorboard=false",
]


def run(workdir: Path, *overrides: str, steps: int = STEPS, timeout: float = 300) -> subprocess.CompletedProcess:
  return subprocess.run(
    train_command(workdir, *RUN, f"--config.train.steps={steps}", *overrides),
    env=cpu_env(),
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def start(workdir: Path, steps: int = STEPS) -> subprocess.Popen:
  return subprocess.Popen(
    train_command(workdir, *RUN, f"--config.train.steps={steps}"),
    env=cpu_env(),
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )


def _around(text: str, needle: str, before: int = 2000, after: int = 4000) -> str:
  """The part of a run's output around `needle`, for a failure message (pytest truncates long strings)."""
  i = text.find(needle)
  return text[max(0, i - before) : i + after] if i >= 0 else text[-after:]


def committed(workdir: Path) -> list[int]:
  root = workdir / "checkpoints"
  return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and (p / "commit_success.txt").exists())


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
  """The uninterrupted run's folder: checkpoints every 4 steps, every loss logged."""
  workdir = tmp_path_factory.mktemp("reference")
  result = run(workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  assert committed(workdir) == list(range(4, STEPS + 1, 4))
  return workdir


@pytest.fixture(scope="module")
def reference(reference_run) -> dict[int, float]:
  """Losses of the uninterrupted run, step -> loss."""
  losses = logged_losses(reference_run)
  assert sorted(losses) == list(range(1, STEPS + 1))
  return losses


@pytest.fixture(scope="module")
def stopped_at_12(tmp_path_factory, reference_run) -> Path:
  """The reference run as it stood after step 12: checkpoints 4, 8 and 12 (the faults damage the newest two).
  A checkpoint holds only its step's state, so cutting the later ones and their log lines is that run."""
  workdir = tmp_path_factory.mktemp("stopped_at_12")
  shutil.copytree(reference_run, workdir, dirs_exist_ok=True)
  for step in range(16, STEPS + 1, 4):
    shutil.rmtree(workdir / "checkpoints" / str(step))
  metrics = workdir / "metrics.jsonl"
  lines = metrics.read_text().splitlines(keepends=True)
  metrics.write_text("".join(line for line in lines if json.loads(line)["step"] <= 12))
  for name in ("summary.json", "loss.png", "sample.png", "sample.gif"):  # written at the end of the full run
    (workdir / name).unlink(missing_ok=True)
  assert committed(workdir) == [4, 8, 12]
  return workdir


def largest_data_file(item: Path) -> Path:
  return max((f for f in item.rglob("*") if f.is_file() and f.parent.name == "d"), key=lambda f: f.stat().st_size)


def flip(path: Path, count: int = 24) -> None:
  data = bytearray(path.read_bytes())
  middle = len(data) // 2
  for i in range(middle, min(middle + count, len(data))):
    data[i] ^= 0xFF
  path.write_bytes(bytes(data))


def damage(checkpoint: Path, fault: str) -> None:
  if fault == "params_flipped":
    flip(largest_data_file(checkpoint / "params"))
  elif fault == "optimizer_state_flipped":
    flip(largest_data_file(checkpoint / "train"))
  elif fault == "data_iterator_state_flipped":
    state = checkpoint / "data" / "process_0-of-1.json"
    text = state.read_text()
    digit = next(i for i, c in enumerate(text) if c.isdigit() and c != "9")  # a valid JSON that says another thing
    state.write_text(text[:digit] + str(int(text[digit]) + 1) + text[digit + 1 :])
  elif fault == "file_truncated":
    f = largest_data_file(checkpoint / "params")
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
  elif fault == "manifest_deleted":
    (checkpoint / "params" / "manifest.ocdbt").unlink()
  else:
    raise ValueError(fault)


FAULTS = [
  "params_flipped",
  "optimizer_state_flipped",
  "data_iterator_state_flipped",
  "file_truncated",
  "manifest_deleted",
]


# Faults injected two at a time: the newest checkpoint (12) gets the first, the one before (8) the second; the run
# must set both aside and resume from 4. Every fault is in one pair; the first pair runs by default.
FAULT_PAIRS = [
  ("params_flipped", "manifest_deleted"),
  pytest.param("optimizer_state_flipped", "file_truncated", marks=pytest.mark.slow),
  pytest.param("data_iterator_state_flipped", "params_flipped", marks=pytest.mark.slow),
]
assert {f for pair in FAULT_PAIRS for f in getattr(pair, "values", pair)} == set(FAULTS)


@pytest.mark.parametrize("newest_fault, older_fault", FAULT_PAIRS)
def test_corrupt_checkpoints_are_set_aside_and_training_goes_on_exactly(
  tmp_path, stopped_at_12, reference, newest_fault, older_fault
):
  workdir = tmp_path / "run"
  shutil.copytree(stopped_at_12, workdir)
  damage(workdir / "checkpoints" / "12", newest_fault)
  damage(workdir / "checkpoints" / "8", older_fault)

  result = run(workdir)

  out = result.stderr
  assert result.returncode == 0, out[-3000:]
  for step in (12, 8):
    assert f"checkpoint {step} is corrupt" in out and f"moved it to {workdir}/checkpoints/corrupt/{step}" in out
    assert (workdir / "checkpoints" / "corrupt" / str(step) / "WHY_CORRUPT.txt").exists()
  assert "resuming at step 4" in out
  caught_by = {  # flipped bytes read back without an error: only the checksums catch them
    "params_flipped": "arrays differ from what was saved: params/",
    "optimizer_state_flipped": "arrays differ from what was saved: train/opt_state/",
    "data_iterator_state_flipped": "data iterator state of process 0 does not match its hash",
  }
  assert caught_by.get(newest_fault, "") in out and caught_by.get(older_fault, "") in out
  assert "Event loop is closed" not in out and "Traceback" not in out, _around(out, "Traceback")
  assert {8, 12, STEPS} <= set(committed(workdir))  # steps 8 and 12 saved again: no crash loop
  losses = logged_losses(workdir)  # steps 5.. were run again after the fallback; the last record wins
  assert [losses[s] for s in range(5, STEPS + 1)] == [reference[s] for s in range(5, STEPS + 1)]


def test_every_checkpoint_corrupt_stops_before_compiling_with_one_message(tmp_path, stopped_at_12):
  workdir = tmp_path / "run"
  shutil.copytree(stopped_at_12, workdir)
  damage(workdir / "checkpoints" / "4", "params_flipped")
  damage(workdir / "checkpoints" / "8", "manifest_deleted")
  damage(workdir / "checkpoints" / "12", "optimizer_state_flipped")

  result = run(workdir)

  assert result.returncode == 1
  assert "CheckpointError: none of the 3 checkpoints" in result.stderr
  assert "compiling the train step" not in result.stderr
  assert "Traceback" not in result.stderr, _around(result.stderr, "Traceback")
  assert sorted(p.name for p in (workdir / "checkpoints" / "corrupt").iterdir()) == ["12", "4", "8"]
  again = run(workdir, steps=2)  # a rerun starts from scratch, and says so
  assert again.returncode == 0 and "no usable checkpoint: starting from scratch" in again.stderr


def test_a_checkpoint_of_another_model_is_refused_and_left_in_place(tmp_path, stopped_at_12):
  workdir = tmp_path / "run"
  shutil.copytree(stopped_at_12, workdir)
  result = run(workdir, "--config.model.mlp_dim=40")
  assert result.returncode == 1 and "holds another model's params" in result.stderr
  assert "checkpoint.init_from" in result.stderr and "Traceback" not in result.stderr
  assert committed(workdir) == [4, 8, 12] and not (workdir / "checkpoints" / "corrupt").exists()


def _wait(predicate, proc: subprocess.Popen, what: str, timeout: float = 240) -> None:
  deadline = time.time() + timeout
  while not predicate():
    assert proc.poll() is None, f"the run ended ({proc.returncode}) before {what}"
    assert time.time() < deadline, f"timed out waiting for {what}"
    time.sleep(0.01)


class Output:
  """The merged stdout/stderr of a run, read on a thread so the test can wait for a line."""

  def __init__(self, proc: subprocess.Popen):
    import threading

    self.text = ""
    self._thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
    self._thread.start()

  def _read(self, proc) -> None:
    for line in proc.stdout:
      self.text += line

  def finish(self) -> str:
    self._thread.join(timeout=60)
    return self.text


def _saving(workdir: Path) -> bool:
  root = workdir / "checkpoints"
  return root.exists() and any("orbax-checkpoint-tmp" in p.name for p in root.iterdir())


def _steps_logged(workdir: Path) -> int:
  metrics = workdir / "metrics.jsonl"
  return len(metrics.read_text().splitlines()) if metrics.exists() else 0


# Where a SIGTERM lands: (phase, what to wait for before sending it, the line that says how the run stopped).
PHASES = [
  ("start-up", lambda w, o: True, "SIGTERM during start-up, before the first step"),
  ("compilation", lambda w, o: "compiling the train step" in o.text, "SIGTERM during compilation"),
  # The progress bar's first line: the loop has begun (after "compiled train step" the job still checks for a
  # SIGTERM that came during compilation, so that line alone is a race).
  ("first step", lambda w, o: f"| 0/{STEPS} [" in o.text, "preempted: saved a checkpoint at step"),
  ("mid-run", lambda w, o: _steps_logged(w) >= 13, "preempted: saved a checkpoint at step"),
  ("during a save", lambda w, o: _saving(w), "preempted: saved a checkpoint at step"),
]


def test_sigterm_at_every_phase_then_resume_gives_the_uninterrupted_losses(tmp_path, reference):
  workdir = tmp_path / "run"
  for phase, ready, stopped in PHASES:
    proc = start(workdir)
    output = Output(proc)
    if phase == "start-up":
      time.sleep(1.0)  # inside the imports or the preflight
    _wait(lambda: ready(workdir, output), proc, f"the {phase}")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=240) == 0, output.finish()[-3000:]
    text = output.finish()
    assert stopped in text, f"{phase}: {text[-3000:]}"
    assert "Traceback" not in text
    if "preempted" in stopped:  # the step it stopped at is saved
      assert committed(workdir)[-1] == max(logged_losses(workdir))
  result = run(workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  assert logged_losses(workdir) == reference


@pytest.mark.slow
def test_kill_9_at_random_moments_and_inside_an_async_save_then_resume_exactly(tmp_path, reference):
  workdir = tmp_path / "run"
  rng = random.Random(0)
  moments = ["inside a save"] + [rng.uniform(0.0, 1.5) for _ in range(2)]
  for moment in moments:
    proc = start(workdir)
    output = Output(proc)
    _wait(lambda: "compiled train step" in output.text, proc, "compilation")
    if moment == "inside a save":
      _wait(lambda: _saving(workdir), proc, "an async save")
    else:
      time.sleep(moment)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    output.finish()
    if proc.returncode == 0:  # finished before the kill: nothing left to interrupt
      break
  result = run(workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  assert logged_losses(workdir) == reference
