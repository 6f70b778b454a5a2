"""The video evaluations' scoring (data/pipeline/video_prompts.py builds their rows).

- `eval/video_to_text_accuracy`: greedy decoding after "the digit " must give exactly the digit
  and the direction, then EOS (train/evaluate.py `word_accuracy`).
- `eval/av_sync_accuracy` and its controls `/audio_only`, `/video_only`: a forced choice between
  the two answers. At the prompt's last position ("in sync? ") the model's logit of the first token
  of "yes" is compared with that of "no"; the row is right when the larger one is its answer. The
  chance level is 0.5 by construction (half the rows are in sync), also for a control whose rows
  the model never saw in training: greedy decoding there need not produce "yes" or "no" at all
  (it scored 0.0 on both controls at step 400 of configs/video.yaml), which would say nothing about
  whether the answer leaks through one modality.
"""
import jax
import jax.numpy as jnp
import numpy as np

from omnimoe.data.builtin.clips import SYNC_ANSWERS
from omnimoe.train.state import Setup, merge

# prompt set -> metric key (data/pipeline/video_prompts.py SETS)
GREEDY = (("video", "eval/video_to_text_accuracy"),)
CHOICE = (("sync", "eval/av_sync_accuracy"),
          ("sync_audio_only", "eval/av_sync_accuracy/audio_only"),
          ("sync_video_only", "eval/av_sync_accuracy/video_only"))


def make_last_logits(setup: Setup, prompt_len: int):
  """A jitted (params, batch, router=None) -> float32 [N, V]: the logits at position
  prompt_len - 1 (replicated, so every process can read them)."""
  def last(params, batch, router=None):
    logits_NxLxV, _ = merge(setup, params)(batch, router)
    return logits_NxLxV[:, prompt_len - 1]
  return jax.jit(last, out_shardings=setup.shardings["step"])


def choice_accuracy(last_logits, params, prompts, vocab, router=None) -> float:
  """Share of rows whose answer ("yes" / "no") has the larger first-token logit (module
  docstring)."""
  first = {ok: int(vocab.encode_text(answer)[0]) for ok, answer in SYNC_ANSWERS.items()}
  if first[True] == first[False]:
    raise ValueError("the answers 'yes' and 'no' begin with the same token; a forced choice "
                     "between them needs different first tokens")
  batch = {k: jnp.asarray(v) for k, v in prompts.batch.items()}
  logits_NxV = np.asarray(last_logits(params, batch, router))
  says_yes_N = logits_NxV[:, first[True]] > logits_NxV[:, first[False]]
  is_yes_N = np.asarray([e.endswith(SYNC_ANSWERS[True].encode()) for e in prompts.expected])
  return float(np.mean(says_yes_N == is_yes_N))
