"""Knowing when to stop for a preemption, on one host or many, from the first line of the job.

Cloud schedulers send SIGTERM some time before they kill a job; it may come at
any moment, while Python imports JAX or while XLA compiles. Single process: a
handler installed before anything heavy (`catch_sigterm`, first thing in the
main job) only raises a flag; the job reads it at every phase boundary of its
start-up (`requested`) and after every step, and stops cleanly: saving the
current step once training has started, exiting with nothing to save before.
Multi-process: JAX's preemption sync service (started by
jax.distributed.initialize) spreads the notice to every host and picks one
step at which all of them save, so nobody waits on a host that already left.
Its notifier takes SIGTERM over from `catch_sigterm` at initialisation; a
notice that came before is noted here but not acted on (the scheduler's
SIGKILL follows).

This module imports no JAX at load time, so it can run before the heavy imports.
"""

from __future__ import annotations

import signal

_received = False
_previous = None


def _on_sigterm(signum, frame) -> None:
  del signum, frame
  global _received
  _received = True


def catch_sigterm() -> None:
  """From now on SIGTERM raises the flag instead of killing the process (idempotent)."""
  global _previous
  if _previous is None:
    _previous = signal.signal(signal.SIGTERM, _on_sigterm)


def release_sigterm() -> None:
  """Give SIGTERM back to whoever had it before `catch_sigterm`."""
  global _previous
  if _previous is not None:
    signal.signal(signal.SIGTERM, _previous)
    _previous = None


def requested() -> bool:
  """Whether this process got SIGTERM since `catch_sigterm` (start-up phases: no step to agree on yet)."""
  return _received


class PreemptionWatch:
  """Per-step check: the step at which every host should save and stop."""

  def __init__(self) -> None:
    import jax

    self._multi = jax.process_count() > 1
    self._owned = not self._multi and _previous is None
    if self._owned:
      catch_sigterm()

  def reached(self, step: int) -> bool:
    """True at the step where every host should save and stop. Call it after every step."""
    if self._multi:
      from jax.experimental import multihost_utils

      return multihost_utils.reached_preemption_sync_point(step)
    return _received

  def close(self) -> None:
    """Give SIGTERM back if this watch took it."""
    if self._owned:
      release_sigterm()
      self._owned = False
