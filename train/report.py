"""`omnimoe report`: pictures of a run from its `<workdir>/metrics.jsonl` (no jax, no checkpoint).

  expert_load.png  per MoE layer, an experts x modality heatmap of the share of each modality's
                   assignments that each expert took (rows sum to 1), averaged over the last N
                   logged steps (the title names them)
  loss.png         train loss and held-out eval losses (overall and by modality) against step
  retrieval.png    only for a needle run (docs/needle.md): retrieval accuracy of the last logged
                   eval, depth decile x haystack length, the heatmap of needle-in-a-haystack tests

Figures are drawn with matplotlib's object API (`Figure` + the Agg canvas), so no GUI backend or
global pyplot state is touched.
"""
import json
import math
import pathlib
import re

import numpy as np

from omnimoe.model.modality import NAMES as MODALITIES

LOAD_KEY = re.compile(r"^moe/expert_load/(?P<modality>[a-z]+)/layer_(?P<layer>\d+)$")
EVAL_LOSSES = ("eval/loss", *(f"eval/loss/{m}" for m in MODALITIES))
RETRIEVAL_KEY = re.compile(r"^eval/retrieval_accuracy/len_(?P<length>\d+)/depth_(?P<decile>\d+)$")


class ReportError(ValueError):
  """A workdir that cannot be reported on; the message is one line meant for the user."""


def load_metrics(workdir: str | pathlib.Path) -> list[dict]:
  """The rows of `<workdir>/metrics.jsonl`, in file order."""
  workdir = pathlib.Path(workdir)
  if not workdir.is_dir():
    raise ReportError(f"workdir '{workdir}' does not exist")
  path = workdir / "metrics.jsonl"
  if not path.is_file():
    raise ReportError(f"no metrics.jsonl in '{workdir}' (train a run there first: "
                      f"omnimoe train --workdir {workdir})")
  rows = []
  for n, line in enumerate(path.read_text().splitlines(), start=1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      raise ReportError(f"'{path}' line {n} is not JSON") from None
    if not isinstance(row, dict) or "step" not in row:
      raise ReportError(f"'{path}' line {n} is not a metrics row (no 'step')")
    rows.append(row)
  return rows


def _latest_per_step(rows: list[dict], key: str) -> list[dict]:
  """Rows holding `key`, one per step (a resumed run may log a step twice: the later row wins),
  sorted by step."""
  by_step = {r["step"]: r for r in rows if key in r}
  return [by_step[s] for s in sorted(by_step)]


def expert_load(rows: list[dict], last: int = 10) -> tuple[dict, list[int]]:
  """Mean per-modality expert load over the last `last` logged steps that have MoE load keys.

  Returns ({layer: {modality: load_E}}, steps averaged). A modality absent from some of those steps
  (no key there) is averaged over the steps that have it; one absent from all is left out."""
  load_rows = {}
  for r in rows:
    if any(LOAD_KEY.match(k) for k in r):
      load_rows[r["step"]] = r   # a step logged twice (resume): the later row wins
  if not load_rows:
    raise ReportError("metrics.jsonl has no per-modality expert-load keys "
                      "(moe/expert_load/<modality>/layer_<i>); is it from an MoE run of this version?")
  steps = sorted(load_rows)[-last:]
  sums: dict = {}
  for s in steps:
    for k, v in load_rows[s].items():
      if (m := LOAD_KEY.match(k)):
        entry = sums.setdefault(int(m["layer"]), {}).setdefault(m["modality"], [0.0, 0])
        entry[0] = entry[0] + np.asarray(v, np.float64)
        entry[1] += 1
  loads = {layer: {mod: total / count for mod, (total, count) in per_mod.items()}
           for layer, per_mod in sorted(sums.items())}
  return loads, steps


def _modalities(per_layer: dict) -> list[str]:
  known = [m for m in MODALITIES if m in per_layer]
  return known + sorted(set(per_layer) - set(known))


def plot_expert_load(loads: dict, steps: list[int], path: pathlib.Path) -> pathlib.Path:
  """One heatmap per MoE layer: modalities (rows) x experts (columns), share of the modality's
  assignments; cells annotated in percent when there are few experts."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  layers = sorted(loads)
  num_experts = max(len(v) for per in loads.values() for v in per.values())
  cols = min(len(layers), 2 if num_experts <= 8 else 1)
  rows = math.ceil(len(layers) / cols)
  fig = Figure(figsize=(max(6.0, 1.2 + 0.55 * num_experts * cols), 0.8 + 1.5 * rows),
               layout="constrained")
  FigureCanvasAgg(fig)
  vmax = max(float(np.max(v)) for per in loads.values() for v in per.values())
  image = None
  for n, layer in enumerate(layers):
    ax = fig.add_subplot(rows, cols, n + 1)
    mods = _modalities(loads[layer])
    grid_MxE = np.stack([loads[layer][m] for m in mods])
    image = ax.imshow(grid_MxE, cmap="viridis", vmin=0.0, vmax=vmax, aspect="auto")
    ax.set_title(f"layer {layer}", fontsize=9)
    ax.set_yticks(range(len(mods)), mods, fontsize=8)
    ax.set_xticks(range(grid_MxE.shape[1]), [str(e) for e in range(grid_MxE.shape[1])], fontsize=7)
    ax.set_xlabel("expert", fontsize=8)
    if num_experts <= 16:
      for (m, e), share in np.ndenumerate(grid_MxE):
        ax.text(e, m, f"{100 * share:.0f}", ha="center", va="center", fontsize=6,
                color="black" if share > 0.6 * vmax else "white")
  span = f"step {steps[0]}" if len(steps) == 1 else f"steps {steps[0]}-{steps[-1]}"
  fig.suptitle(f"expert load: share of each modality's assignments (%)\n"
               f"mean of the last {len(steps)} logged steps ({span})", fontsize=9)
  fig.colorbar(image, ax=fig.axes, shrink=0.8, label="share")
  fig.savefig(path, dpi=120)
  return path


def plot_losses(rows: list[dict], path: pathlib.Path) -> pathlib.Path:
  """Train loss and eval losses against step; log y when the curves span more than 5x."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  fig = Figure(figsize=(7, 4), layout="constrained")
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  values = []
  for key, style in (("loss", "-"), *((k, "o-") for k in EVAL_LOSSES)):
    curve = [(r["step"], r[key]) for r in _latest_per_step(rows, key)
             if isinstance(r[key], (int, float)) and math.isfinite(r[key])]
    if curve:
      x, y = zip(*curve)
      ax.plot(x, y, style, markersize=3, linewidth=1.2, label="train loss" if key == "loss" else key)
      values += y
  if not values:
    ax.text(0.5, 0.5, "no loss logged yet", ha="center", va="center", transform=ax.transAxes)
  elif min(values) > 0 and max(values) / min(values) > 5:
    ax.set_yscale("log")
  ax.set_xlabel("step")
  ax.set_ylabel("loss (nats per target)")
  ax.set_title("train and held-out loss", fontsize=10)
  ax.grid(True, which="both", alpha=0.3)
  if values:
    ax.legend(fontsize=8)
  fig.savefig(path, dpi=120)
  return path


def retrieval_grid(rows: list[dict]) -> tuple[np.ndarray, list[int], int] | None:
  """Accuracy [10 deciles, lengths] of the last logged eval with retrieval keys (NaN where a cell
  has no key), the lengths (ascending) and its step; None when no row has such keys."""
  last = None
  for r in rows:
    if any(RETRIEVAL_KEY.match(k) for k in r):
      last = r     # file order: the last eval logged (a resumed run's later row wins)
  if last is None:
    return None
  cells = {(int(m["length"]), int(m["decile"])): float(v) for k, v in last.items()
           if (m := RETRIEVAL_KEY.match(k))}
  lengths = sorted({length for length, _ in cells})
  grid = np.full((10, len(lengths)), np.nan)
  for (length, decile), v in cells.items():
    if decile < 10:
      grid[decile, lengths.index(length)] = v
  return grid, lengths, last["step"]


def plot_retrieval(grid: np.ndarray, lengths: list[int], step: int,
                   path: pathlib.Path) -> pathlib.Path:
  """Depth decile (rows, 0 = start of the haystack at the top) x haystack length (columns), cells
  annotated in percent."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  fig = Figure(figsize=(2.2 + 1.1 * len(lengths), 5.0), layout="constrained")
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  image = ax.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
  ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=8)
  ax.set_yticks(range(10), [f"{10 * d}-{10 * d + 10}%" for d in range(10)], fontsize=8)
  ax.set_xlabel("haystack length (tokens)", fontsize=9)
  ax.set_ylabel("depth of the fact in the haystack", fontsize=9)
  for (d, j), v in np.ndenumerate(grid):
    ax.text(j, d, "-" if np.isnan(v) else f"{100 * v:.0f}", ha="center", va="center", fontsize=8)
  ax.set_title(f"retrieval accuracy (%), held-out haystacks, step {step}", fontsize=10)
  fig.colorbar(image, ax=ax, shrink=0.8, label="exact-match accuracy")
  fig.savefig(path, dpi=120)
  return path


def report(workdir: str | pathlib.Path, out: str | pathlib.Path | None = None,
           last: int = 10) -> list[pathlib.Path]:
  """Writes expert_load.png and loss.png into `out` (default: the workdir), and retrieval.png for a
  needle run; returns their paths."""
  if last < 1:
    raise ReportError(f"--last must be at least 1, got {last}")
  workdir = pathlib.Path(workdir)
  rows = load_metrics(workdir)
  loads, steps = expert_load(rows, last)
  out = pathlib.Path(out) if out is not None else workdir
  try:
    out.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise ReportError(f"cannot write to '{out}': {e.strerror or e}") from None
  paths = [plot_expert_load(loads, steps, out / "expert_load.png"),
           plot_losses(rows, out / "loss.png")]
  if (retrieval := retrieval_grid(rows)) is not None:
    paths.append(plot_retrieval(*retrieval, out / "retrieval.png"))
  return paths
