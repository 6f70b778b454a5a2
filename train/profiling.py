"""`omnimoe train --profile-steps A:B`: a jax.profiler trace of those steps."""
import pathlib

import jax

from omnimoe.train import config as config_lib
from omnimoe.train.metrics import Progress


def parse_profile_steps(text: str | None, total: int) -> tuple[int, int] | None:
  """`--profile-steps A:B` -> (A, B): steps 1 <= A <= B <= train.steps (None: no trace)."""
  if text is None:
    return None
  try:
    first, last = (int(part) for part in text.split(":"))
  except ValueError:
    raise config_lib.ConfigError(f"--profile-steps must be A:B (two step numbers), got '{text}'") from None
  if not 1 <= first <= last <= total:
    raise config_lib.ConfigError(f"--profile-steps must satisfy 1 <= A <= B <= train.steps={total}, "
                                 f"got '{text}'")
  return first, last


class Profile:
  """A jax.profiler trace of steps first..last into <workdir>/profile (TensorBoard's profile
  plugin reads the .xplane.pb; ui.perfetto.dev opens the .trace.json.gz). The trace stops
  after the last step's results are ready, so it holds the device work of every traced step."""

  def __init__(self, steps: tuple[int, int] | None, workdir: pathlib.Path, bar: Progress):
    self.steps, self.dir, self.bar, self.on = steps, workdir / "profile", bar, False

  def before(self, step: int) -> None:
    if self.steps and step == self.steps[0]:
      jax.profiler.start_trace(str(self.dir))
      self.on = True

  def after(self, step: int, state) -> None:
    if self.on and step == self.steps[1]:
      self.stop(state)

  def stop(self, state) -> None:
    if self.on:
      jax.block_until_ready(state)
      jax.profiler.stop_trace()
      self.on = False
      self.bar.message(f"profile of steps {self.steps[0]}..{self.steps[1]} in {self.dir}")
