"""One way to time a call, for every benchmark: warm it up (compile, caches), then time each call
with `time.perf_counter`, waiting for its result (`sync`, e.g. `jax.block_until_ready`; torch and
host work need none), and report the median.

No jax here, so a torch-only benchmark process can use it too.
"""
import statistics
import time


def seconds(fn, sync=None) -> float:
  """Wall seconds of one call of `fn`, its result synced."""
  t0 = time.perf_counter()
  out = fn()
  if sync is not None:
    sync(out)
  return time.perf_counter() - t0


def median_seconds(fn, repeats: int, warmup: int = 1, sync=None) -> tuple[float, list[float]]:
  """(median, every time) of `repeats` timed calls of `fn` after `warmup` untimed ones."""
  for _ in range(warmup):
    out = fn()
    if sync is not None:
      sync(out)
  times = [seconds(fn, sync) for _ in range(repeats)]
  return statistics.median(times), times
