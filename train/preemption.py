"""Stopping a run cleanly on SIGTERM (a preemption), on one host or many."""
import signal

import jax
import numpy as np
from jax.experimental import multihost_utils


class StopFlag:
  """Turns SIGTERM into a checkpoint and an exit at a step boundary.

  One process: a Python handler sets a flag, read at the next step. Several processes (multi-host):
  every process must stop at the same step, or the ones that did not see the signal wait in the
  next step's collectives forever. JAX's preemption sync manager (started by
  `jax.distributed.initialize`; its own SIGTERM handler tells the coordination service) agrees on
  the step: the largest step any process has reached when the notice arrives, plus one. Where that
  service is turned off (`jax_enable_preemption_service=False`) the processes all-gather their flags
  every step instead, which costs a host round trip per step."""

  def __init__(self):
    self.requested = False
    self._previous = None
    self._mode = "local"

  def __enter__(self):
    if jax.process_count() > 1:
      from jax._src import distributed as jax_distributed
      if jax_distributed.global_state.preemption_sync_manager is not None:
        self._mode = "sync"   # its handler must stay the one SIGTERM reaches: install none
        return self
      self._mode = "gather"
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread
      self._previous = None
    return self

  def _handle(self, signum, frame):
    self.requested = True

  def at(self, step: int) -> bool:
    """Whether to stop after `step`. Every process calls this at every step, with the same steps."""
    if self._mode == "sync":
      self.requested = multihost_utils.reached_preemption_sync_point(step)
    elif self._mode == "gather":
      self.requested = bool(np.any(multihost_utils.process_allgather(np.array([self.requested]))))
    return self.requested

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
