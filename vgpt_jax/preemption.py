"""Knowing when to stop for a preemption, on one host or many.

Cloud schedulers send SIGTERM some time before they kill a job. Single
process: a SIGTERM handler raises a flag that the loop reads after each step.
Multi-process: JAX's preemption sync service (started by
jax.distributed.initialize) spreads the notice to every host and picks one
step at which all of them save, so nobody waits on a host that already left.
"""

from __future__ import annotations

import signal

import jax
from jax.experimental import multihost_utils


class PreemptionWatch:
  def __init__(self) -> None:
    self._received = False
    self._previous = None
    if jax.process_count() == 1:
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame) -> None:
    del signum, frame
    self._received = True

  def reached(self, step: int) -> bool:
    """True at the step where every host should save and stop. Call it after every step."""
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._received

  def close(self) -> None:
    """Give SIGTERM back to whoever had it before."""
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
