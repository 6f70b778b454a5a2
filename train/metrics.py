"""Where metrics go: `<workdir>/metrics.jsonl` (one JSON object per logged step), TensorBoard event
files under `<workdir>/tensorboard/`, and a progress bar (or plain log lines when not on a terminal)."""
import json
import math
import pathlib
import sys

import numpy as np
import tqdm
from tensorboardX import SummaryWriter


def to_python(value):
  """Arrays -> floats or nested lists, so that a metrics dict is JSON."""
  array = np.asarray(value)
  return float(array) if array.ndim == 0 else array.tolist()


class MetricsWriter:
  def __init__(self, workdir: pathlib.Path, *, enabled: bool = True):
    self.enabled = enabled
    self.path = pathlib.Path(workdir) / "metrics.jsonl"
    self.tb_dir = pathlib.Path(workdir) / "tensorboard"
    self.tb = SummaryWriter(str(self.tb_dir)) if enabled else None

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    row = {"step": step, **{k: to_python(v) for k, v in metrics.items()}}
    with self.path.open("a") as f:
      f.write(json.dumps(row) + "\n")
    for k, v in row.items():
      if k != "step" and isinstance(v, float) and math.isfinite(v):
        self.tb.add_scalar(k, v, step)
    self.tb.flush()

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()


class Progress:
  """A tqdm bar on a terminal; elsewhere one line per logged step on stderr."""

  def __init__(self, *, start: int, total: int, enabled: bool = True):
    self.tty = enabled and sys.stderr.isatty()
    self.enabled = enabled
    self.bar = tqdm.tqdm(total=total, initial=start, unit="step", dynamic_ncols=True,
                         disable=not self.tty)

  def update(self, step: int, metrics: dict) -> None:
    if self.tty:
      self.bar.n = step
      self.bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
    elif self.enabled:
      print(f"step {step}: loss {metrics['loss']:.4f}, {metrics['tokens_per_s']:.0f} tokens/s",
            file=sys.stderr, flush=True)

  def message(self, text: str) -> None:
    if self.enabled:
      (self.bar.write(text, file=sys.stderr) if self.tty else print(text, file=sys.stderr, flush=True))

  def close(self) -> None:
    self.bar.close()
