"""Retrieval accuracy of a `data.task=needle` run, by depth decile and haystack length.

A question counts as retrieved when, teacher-forced, the argmax of the logits equals the target at
every one of its answer positions (the value's digits and the '.'): the same test as greedy
decoding of the answer, without the decoding loop. Metrics:

  eval/retrieval_accuracy                        every question of every held-out length
  eval/retrieval_accuracy/depth_<d>              deciles d = 0..9, every length
  eval/retrieval_accuracy/len_<H>                one haystack length
  eval/retrieval_accuracy/len_<H>/depth_<d>      one length, one decile (the report's heatmap)
"""
import jax
import jax.numpy as jnp
import numpy as np

from omnimoe import data
from omnimoe.data.builtin.needle import DECILES
from omnimoe.train.state import Setup, merge

KEY = "eval/retrieval_accuracy"


def answers_correct(logits_BxLxV, targets_BxL, question_BxL, num_questions: int):
  """bool [num_questions]: question q (1-based ids in `question_BxL`, 0 = no question) has the
  argmax right at every position marked q."""
  right_BxL = (jnp.argmax(logits_BxLxV, axis=-1) == targets_BxL).astype(jnp.int32)
  worst = jax.ops.segment_min(right_BxL.reshape(-1), question_BxL.reshape(-1),
                              num_segments=num_questions + 1)
  return worst[1:] == 1


def make_retrieval_step(setup: Setup):
  """A jitted (params, batch, question_BxL, router=None, *, num_questions) -> bool [questions]."""
  def step(params, batch, question_BxL, router=None, *, num_questions: int):
    logits_BxLxV, _ = merge(setup, params)(batch, router)
    return answers_correct(logits_BxLxV, batch["targets"], question_BxL, num_questions)
  return jax.jit(step, static_argnames="num_questions")


def metrics(results: list[tuple[int, np.ndarray, np.ndarray]]) -> dict:
  """[(haystack length, correct [Q] bool, decile [Q] int)] -> the metrics of the module docstring
  (a key only where it has questions)."""
  out = {}
  if not results:
    return out
  lengths = np.concatenate([np.full(len(c), H) for H, c, _ in results])
  correct = np.concatenate([c for _, c, _ in results]).astype(np.float64)
  decile = np.concatenate([d for _, _, d in results])
  out[KEY] = float(correct.mean())
  for d in range(DECILES):
    if np.any(decile == d):
      out[f"{KEY}/depth_{d}"] = float(correct[decile == d].mean())
  for H in sorted(set(lengths.tolist())):
    at = lengths == H
    out[f"{KEY}/len_{H}"] = float(correct[at].mean())
    for d in range(DECILES):
      if np.any(at & (decile == d)):
        out[f"{KEY}/len_{H}/depth_{d}"] = float(correct[at & (decile == d)].mean())
  return out


class Retrieval:
  """The held-out needle documents of a run and the compiled scorer; `__call__(params, router)`."""

  def __init__(self, cfg, setup: Setup):
    self.sets = data.retrieval_sets(cfg.data, batch_size=cfg.eval.batch_size, seed=cfg.train.seed)
    self.step = make_retrieval_step(setup)

  def __call__(self, params, router=None) -> dict:
    results = []
    for s in self.sets:
      for batch, q_BxL, deciles in zip(s.batches, s.questions, s.deciles):
        correct = self.step(params, {k: jnp.asarray(v) for k, v in batch.items()},
                            jnp.asarray(q_BxL), router, num_questions=len(deciles))
        results.append((s.length, np.asarray(jax.device_get(correct)), deciles))
    return metrics(results)
