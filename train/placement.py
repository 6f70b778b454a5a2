"""`omnimoe placement --workdir DIR --groups G [--out DIR2]`: place experts that serve the same
tokens in the same group (one device's or one rack's experts), and write the run's latest
checkpoint with its experts renumbered to match.

Per MoE layer, from the run's co-activation statistics (train/coactivation.py, written at every
evaluation of `omnimoe train`):
  fit    the balanced partition of the E experts into G groups of E / G that maximises the
         co-activation inside groups (train/partition.py), on the counts of the training steps
         before the last evaluation (`train`, all modalities added);
  score  on the held-out eval tokens (`heldout_choices`), token by token: the share of tokens
         whose experts lie in more than one group and the expected all-to-all bytes per token, for
         the identity placement (groups of consecutive experts), the mean of `random` balanced
         placements drawn uniformly, and the learned one.
The learned groups become consecutive experts (`partition.order`), which is how omnimoe maps
experts to devices (the `exp` axis is split in consecutive blocks) and to `model.moe.num_groups`
groups. DIR2 (default: DIR-g<G>) is a run folder: the resolved config, the permuted checkpoint at
the same step (parameters, Adam moments, balance bias; train/permute.py) with the same data
iterator state, so `omnimoe eval` and `omnimoe train` work on it, placement.json (groups,
permutations, scores), the statistics renumbered, and coactivation.png: per layer, the held-out
E x E co-activation in the identity order and in the placement's order, group borders drawn.
"""
import json
import pathlib
import shutil

import numpy as np

from omnimoe.train import coactivation, partition
from omnimoe.train import config as config_lib

RANDOM_PLACEMENTS = 100


class PlacementError(ValueError):
  """Bad input for `omnimoe placement`; the message is one line for the user."""


def check_groups(num_experts: int, groups: int) -> None:
  if groups < 1 or num_experts % groups:
    raise PlacementError(f"--groups {groups} must divide model.moe.num_experts={num_experts} "
                         f"(try one of {[g for g in range(1, num_experts + 1) if num_experts % g == 0]})")


def fit_and_score(stats: dict, groups: int, *, row_bytes: int, seed: int = 0) -> dict:
  """{"groups_MxE": the learned group of each (old) expert [M, E], "layers": per layer
  {"identity", "random", "learned"} scores (partition.score; random: the mean over
  RANDOM_PLACEMENTS), "mean": the same averaged over layers (bytes_per_token: summed)}."""
  train, choices = stats["train"], stats["heldout_choices"]
  M, E = train.shape[0], train.shape[-1]
  check_groups(E, groups)
  learned, layers = [], []
  draws = partition.random_groups(E, groups, RANDOM_PLACEMENTS, seed)
  for m in range(M):
    g_E = partition.partition(train[m].sum(axis=0), groups, seed=seed)
    learned.append(g_E)
    rand = [partition.score(choices[m], d, row_bytes=row_bytes) for d in draws]
    layers.append({
        "identity": partition.score(choices[m], partition.identity_groups(E, groups),
                                    row_bytes=row_bytes),
        "random": {k: float(np.mean([r[k] for r in rand])) for k in rand[0]},
        "learned": partition.score(choices[m], g_E, row_bytes=row_bytes)})
  mean = {}
  for name in ("identity", "random", "learned"):
    mean[name] = {k: float(np.mean([l[name][k] for l in layers])) for k in layers[0][name]}
    mean[name]["bytes_per_token"] = float(np.sum([l[name]["bytes_per_token"] for l in layers]))
  return {"groups_MxE": np.stack(learned), "layers": layers, "mean": mean,
          "heldout_tokens": int(choices.shape[1])}


def _row_bytes(cfg) -> int:
  """Bytes of one token's row in the exchange: d_model activations of model.dtype."""
  return cfg.model.d_model * {"bfloat16": 2, "float16": 2}.get(cfg.model.dtype, 4)


def place(workdir: str | pathlib.Path, groups: int, out: str | pathlib.Path | None = None) -> dict:
  """Fits, scores and writes DIR2 (module docstring); returns the report (also placement.json)."""
  workdir = pathlib.Path(workdir).absolute()
  if not (workdir / "config.yaml").is_file():
    raise PlacementError(f"no run in '{workdir}' (no config.yaml; train one there first)")
  cfg = config_lib.load(workdir / "config.yaml")
  check_groups(cfg.model.moe.num_experts, groups)
  stats = coactivation.load(workdir)
  out = pathlib.Path(out).absolute() if out else workdir.with_name(f"{workdir.name}-g{groups}")
  if out == workdir or (out / "checkpoints").exists():
    raise PlacementError(f"--out '{out}' already holds a run; give an empty or new folder")
  from omnimoe.train.checkpoint import Checkpoints   # jax and orbax only once the input is good
  ckpts = Checkpoints(workdir / "checkpoints", keep=cfg.checkpoint.keep, async_save=False)
  step = ckpts.latest_step()
  if step is None:
    ckpts.close()
    raise PlacementError(f"no checkpoint in '{workdir / 'checkpoints'}' to permute")
  report = fit_and_score(stats, groups, row_bytes=_row_bytes(cfg), seed=cfg.train.seed)
  perms_MxE = np.stack([partition.order(g) for g in report.pop("groups_MxE")])
  state, data_state, optimizer = _restore(cfg, ckpts, step)
  ckpts.close()
  from omnimoe.train import permute
  placed = permute.permute_state(state, perms_MxE, num_dense_layers=cfg.model.num_dense_layers,
                                 optimizer=optimizer)
  out.mkdir(parents=True, exist_ok=True)
  shutil.copy(workdir / "config.yaml", out / "config.yaml")
  saver = Checkpoints(out / "checkpoints", keep=cfg.checkpoint.keep, async_save=False)
  saver.save(step, placed, data_state)
  saver.close()
  coactivation.save(out, step=int(stats["step"]), moe_layers=stats["moe_layers"],
                    train=permute.permute_counts(stats["train"], perms_MxE),
                    train_steps=int(stats["train_steps"]),
                    heldout=permute.permute_counts(stats["heldout"], perms_MxE),
                    heldout_choices=permute.permute_choices(stats["heldout_choices"], perms_MxE))
  report.update(workdir=str(workdir), out=str(out), step=step, stats_step=int(stats["step"]),
                groups=groups, permutations=perms_MxE.tolist(),
                moe_layers=[int(i) for i in stats["moe_layers"]])
  (out / "placement.json").write_text(json.dumps(report, indent=1))
  report["picture"] = str(plot(stats["heldout"].sum(axis=1), perms_MxE, groups,
                               report["moe_layers"], out / "coactivation.png"))
  return report


def _restore(cfg, ckpts, step: int):
  """(state, data iterator state, optimizer) of checkpoint `step`, on this process's devices."""
  from omnimoe import data
  from omnimoe.train.mesh import make_mesh
  from omnimoe.train.state import make_setup
  setup = make_setup(cfg, make_mesh(cfg.mesh), data.dataset_info(cfg.data, cfg.train.seed))
  state, data_state = ckpts.restore(step, setup)
  return state, data_state, setup.optimizer


def describe(report: dict) -> str:
  m = report["mean"]
  lines = [f"placement of {report['groups']} groups from {report['workdir']} (checkpoint "
           f"{report['step']}, statistics of step {report['stats_step']}; scored on "
           f"{report['heldout_tokens']} held-out tokens)",
           f"  {'placement':<10s} {'tokens in >1 group':>19s} {'groups/token':>13s} "
           f"{'all-to-all bytes/token':>23s}"]
  for name, label in (("identity", "identity"), ("random", f"random x{RANDOM_PLACEMENTS}"),
                      ("learned", "learned")):
    lines.append(f"  {label:<10s} {m[name]['span_share']:>19.4f} {m[name]['groups_per_token']:>13.3f} "
                 f"{m[name]['bytes_per_token']:>23.1f}")
  for base in ("identity", "random"):
    drop = 1 - m["learned"]["span_share"] / max(m[base]["span_share"], 1e-12)
    lines.append(f"  tokens in >1 group: {100 * drop:.1f}% fewer than {base}")
  lines += [f"  permuted checkpoint  {report['out']}/checkpoints/{report['step']}",
            f"  picture              {report.get('picture', '')}"]
  return "\n".join(lines)


def plot(counts_MxExE: np.ndarray, perms_MxE: np.ndarray, groups: int, layers: list[int],
         path: pathlib.Path) -> pathlib.Path:
  """Per layer (columns), the co-activation counts, each row normalised by its diagonal (the share
  of expert i's tokens that also took j), in the identity order (top) and the placement's (bottom),
  group borders drawn."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  M, E = counts_MxExE.shape[:2]
  fig = Figure(figsize=(3.2 * M, 6.4))
  FigureCanvasAgg(fig)
  axes = fig.subplots(2, M, squeeze=False)
  for m in range(M):
    share = counts_MxExE[m] / np.maximum(np.diag(counts_MxExE[m])[:, None], 1.0)
    np.fill_diagonal(share, 0.0)
    for row, (perm, title) in enumerate(((np.arange(E), "identity"), (perms_MxE[m], "placed"))):
      ax = axes[row, m]
      ax.imshow(share[perm][:, perm], cmap="magma", vmin=0.0, vmax=max(share.max(), 1e-9))
      for b in range(1, groups):
        for line in (ax.axhline, ax.axvline):
          line(b * E / groups - 0.5, color="cyan", lw=0.8)
      ax.set_title(f"layer {layers[m]}, {title}", fontsize=9)
      ax.set_xticks(range(E), [str(e) for e in perm], fontsize=5)
      ax.set_yticks(range(E), [str(e) for e in perm], fontsize=5)
  fig.suptitle("held-out co-activation: share of row expert's tokens that also took column expert",
               fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  return path
