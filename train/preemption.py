"""Stopping a run cleanly on SIGTERM (a preemption), on one host or many."""
import signal

import jax
from jax.experimental import multihost_utils


def sync_manager_running() -> bool:
  """Whether `jax.distributed.initialize` started the preemption sync manager. jax exposes no
  public query; its absence from jax's internals reads as not running (and a multi-host run is
  then refused, never left to hang)."""
  try:
    from jax._src import distributed
  except ImportError:
    return False
  return getattr(getattr(distributed, "global_state", None), "preemption_sync_manager",
                 None) is not None


class StopFlag:
  """Turns SIGTERM into a checkpoint and an exit at a step boundary.

  One process: a Python handler sets a flag, read at the next step. Several processes (multi-host):
  every process must stop at the same step, or the ones that did not see the signal wait in the
  next step's collectives forever. JAX's preemption sync manager (started by
  `jax.distributed.initialize`; its own SIGTERM handler tells the coordination service) agrees on
  the step: the largest step any process has reached when the notice arrives, plus one. A multi-host
  run without that service (`jax_enable_preemption_service=False`) is refused in one line: it could
  not stop cleanly."""

  def __init__(self):
    self.requested = False
    self._previous = None
    self._mode = "local"

  def __enter__(self):
    if jax.process_count() > 1:
      from omnimoe.train.distributed import check_preemption_service
      check_preemption_service()   # refused at start-up already; here for library callers
      self._mode = "sync"   # its handler must stay the one SIGTERM reaches: install none
      return self
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
    return self.requested

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
