"""Co-activation statistics: how often each pair of experts serves the same token, per MoE layer.

Each MoE layer returns its counts as data (model/router.py `balance_stats`:
`coactivation_by_modality` [3, E, E]; [m, i, j] = valid tokens of modality m (text, image, audio)
that took both expert i and expert j, the diagonal = those that took i) and each token's experts
(model/moe.py `expert_choice`). The training loop adds up the train steps' counts and, at every
evaluation, writes them with the held-out batches' counts to `<workdir>/coactivation.npz`:

  step             int: the step evaluated (its checkpoint is the one `omnimoe placement` permutes)
  moe_layers       int [M]: block index of each MoE layer
  train            float64 [M, 3, E, E]: counts over the training steps since the previous evaluation
  train_steps      int: how many training steps `train` adds up (0: none in this process)
  heldout          float64 [M, 3, E, E]: counts over the held-out eval batches (eval/loss's)
  heldout_choices  int16 [M, N, K]: the experts each of the N valid held-out tokens took (-1: slot
                   unused), so a placement can be scored token by token

`omnimoe placement` (train/placement.py) fits on `train` and scores on `heldout_choices`.
"""
import pathlib

import jax
import numpy as np

from omnimoe.train.state import Setup, merge

FILENAME = "coactivation.npz"


class StatisticsError(ValueError):
  """A workdir without usable co-activation statistics; the message is one line for the user."""


def make_routing_step(setup: Setup):
  """A jitted (params, batch, router) -> (coactivation [M, 3, E, E], expert_choice [M, B*L, K]),
  both replicated so that every process can read them."""
  def routing(params, batch, router):
    _, aux = merge(setup, params)(batch, router)
    return aux["coactivation_by_modality"], aux["expert_choice"]
  return jax.jit(routing, out_shardings=setup.shardings["step"])


def heldout_statistics(routing_step, params, batches: list, router) -> tuple[np.ndarray, np.ndarray]:
  """(counts float64 [M, 3, E, E] summed over `batches`, choices int16 [M, N, K] of their N valid
  tokens). A valid token takes at least one expert, in slot 0; padding takes none."""
  counts, choices = 0.0, []
  for batch in batches:
    c_Mx3xExE, choice_MxTxK = jax.device_get(routing_step(params, batch, router))
    counts = counts + np.asarray(c_Mx3xExE, np.float64)
    choice_MxTxK = np.asarray(choice_MxTxK)
    choices.append(choice_MxTxK[:, choice_MxTxK[0, :, 0] >= 0])
  return counts, np.concatenate(choices, axis=1).astype(np.int16)


class TrainCounts:
  """The train steps' co-activation counts, added up between evaluations."""

  def __init__(self):
    self.counts, self.steps = None, 0

  def add(self, counts_Mx3xExE) -> None:
    if counts_Mx3xExE is None:
      return
    counts = np.asarray(counts_Mx3xExE, np.float64)
    self.counts = counts if self.counts is None else self.counts + counts
    self.steps += 1

  def take(self, shape: tuple) -> tuple[np.ndarray, int]:
    """(the counts so far, or zeros of `shape` if none; steps) and starts again from zero."""
    out = (np.zeros(shape) if self.counts is None else self.counts, self.steps)
    self.counts, self.steps = None, 0
    return out


def save(workdir: str | pathlib.Path, *, step: int, moe_layers, train: np.ndarray,
         train_steps: int, heldout: np.ndarray, heldout_choices: np.ndarray) -> pathlib.Path:
  path = pathlib.Path(workdir) / FILENAME
  tmp = path.with_suffix(".tmp.npz")                      # never a half-written file
  np.savez(tmp, step=step, moe_layers=np.asarray(moe_layers), train=train,
           train_steps=train_steps, heldout=heldout, heldout_choices=heldout_choices)
  tmp.replace(path)
  return path


def load(workdir: str | pathlib.Path) -> dict:
  """The statistics of `workdir` as a dict of numpy arrays; StatisticsError if there are none."""
  path = pathlib.Path(workdir) / FILENAME
  if not path.is_file():
    raise StatisticsError(f"no co-activation statistics in '{workdir}' ({FILENAME} is written at "
                          f"each evaluation of omnimoe train; train or resume the run there)")
  with np.load(path) as f:
    stats = {k: f[k] for k in f.files}
  if int(stats["train_steps"]) == 0:
    raise StatisticsError(f"{path} holds no training-step counts (train_steps=0); resume the run "
                          "with omnimoe train so that an evaluation follows some training steps")
  return stats
