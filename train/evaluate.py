"""Evaluation: held-out loss by modality, text bits per byte, and cross-modal word accuracy.

Cross-modal accuracy: a held-out image (or a freshly drawn tone) followed by the prompt
"the digit " is decoded greedily over text and EOS, with the KV cache; a row counts as correct when the text before the first EOS is
exactly the digit's English word.

Held-out loss covers every source of the run (data.eval_batches_by_source): `eval/loss` over all
of them, `eval/loss/<modality>` by the modality of the target, and `eval/loss/source/<label>` per
source (`default`, or a prepared folder's basename): the per-source losses, weighted by their
target counts, average to `eval/loss`. Bits per byte and cross-modal
accuracy are measured on the default dataset, so a run without a `default` source skips them and
says so in `Evaluator.notes` (see `default_dataset_evals`). A `data.task=needle` run skips them too
and measures retrieval accuracy by depth and length instead (train/retrieval.py); its eval/loss is
the loss on the answers of held-out documents.
"""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from omnimoe import data
from omnimoe.train import coactivation, media_spans
from omnimoe.train.config import Config
from omnimoe.train.state import Setup, merge
from omnimoe.model.modality import NAMES as MODALITIES
from omnimoe.train.retrieval import Retrieval
from omnimoe.train.generate import make_generate
from omnimoe.train.media_evals import MediaEvals
from omnimoe.train.step import make_eval_step
from omnimoe.train import video_eval

PROMPT_KEYS = ("tokens", "features", "modality", "segment_ids", "positions")


NO_DEFAULT_NOTE = ("eval: data.sources has no 'default' source, so eval/text_bits_per_byte and "
                   "eval/{image,audio}_to_text_accuracy (default-dataset metrics) are skipped; "
                   "eval/loss is measured on the held-out records of the prepared sources")
NEEDLE_NOTE = ("eval: data.task=needle reads no default dataset, so eval/text_bits_per_byte and "
               "eval/{image,audio}_to_text_accuracy are skipped; eval/retrieval_accuracy (by "
               "depth and length) and eval/loss on the answers of held-out haystacks are measured")


@dataclasses.dataclass
class EvalData:
  mixed: list            # held-out mixed batches (batch contract), every source of the run
  text: list             # held-out text, weights on text-token targets only (default dataset)
  prompts: dict          # modality name -> data.PromptSet (default dataset)
  notes: tuple = ()      # what was skipped and why, for the user
  mixed_sources: tuple = ()   # the source label of each batch of `mixed` (same length)
  text_bytes: int = 0    # UTF-8 bytes of the held-out text in `text` (bits per byte)


def load_eval_data(cfg: Config) -> EvalData:
  e, seed = cfg.eval, cfg.train.seed
  # Held-out loss weighs every modality 1, whatever weights training uses.
  unit = dataclasses.replace(cfg.data, loss_weight_text=1.0, loss_weight_image=1.0,
                             loss_weight_audio=1.0, loss_weight_video=1.0)
  by_source = data.eval_batches_by_source(unit, batch_size=e.batch_size, seed=seed,
                                          num_batches=e.num_batches)
  mixed = [b for _, batches in by_source for b in batches]
  labels = tuple(label for label, batches in by_source for _ in batches)
  text, prompts, notes = default_dataset_evals(cfg)
  text_bytes = 0
  if text:
    text_bytes = sum(data.heldout_text_bytes(cfg.data, batch_size=e.batch_size)[:len(text)])
  return EvalData(mixed, text, prompts, notes, mixed_sources=labels, text_bytes=text_bytes)


def default_dataset_evals(cfg: Config) -> tuple[list, dict, tuple]:
  """(held-out text batches, cross-modal prompt sets, notes) of the default dataset; empty, with a
  note, when the run does not read the default dataset."""
  if not data.has_default_source(cfg.data):
    return [], {}, (NEEDLE_NOTE if cfg.data.task == "needle" else NO_DEFAULT_NOTE,)
  e, seed = cfg.eval, cfg.train.seed
  text = data.heldout_text_batches(cfg.data, batch_size=e.batch_size, seed=seed)[:e.text_limit or None]
  prompts = {"image": data.prompt_set(cfg.data, modality="image", seed=seed,
                                      max_new_tokens=e.max_new_tokens, limit=e.image_limit or None),
             "audio": data.prompt_set(cfg.data, modality="audio", seed=seed,
                                      max_new_tokens=e.max_new_tokens, limit=e.audio_limit or None)}
  if cfg.data.weight_video > 0:   # the built-in clips: video->text and sync, with the controls
    prompts.update(data.video_prompt_sets(cfg.data, seed=seed, limit=e.video_limit))
  return text, prompts, ()


def make_greedy_decode(setup: Setup, spans: media_spans.Spans, *, prompt_len: int,
                       max_new_tokens: int):
  """(params, batch, next_position, router=None) -> generated ids [N, max_new_tokens]: greedy,
  text and EOS only (the answer is a word), with the KV cache (train/generate.py): the prompt
  (the batch's first `prompt_len` positions) is prefilled once, then one token per step; after a
  row's EOS it writes PAD."""
  # Replicated output: every process can read the generations (multi-host), whatever layout the
  # mesh gives the batch inside.
  generate = make_generate(setup, spans, prompt_len=prompt_len, max_new_tokens=max_new_tokens,
                           out_shardings=setup.shardings["step"])

  def decode(params, batch, next_position_N, router=None):
    prompt = {k: v[:, :prompt_len] for k, v in batch.items() if k in PROMPT_KEYS}
    return generate(params, prompt, next_position_N, jax.random.key(0), router).tokens
  return decode


def word_accuracy(decode, params, prompts, vocab, router=None) -> float:
  """Share of prompts whose greedy continuation is exactly the answer word, then EOS: the prompt's
  text and the continuation decode to "the digit <word>" (data.PromptSet.expected)."""
  batch = {k: jnp.asarray(v) for k, v in prompts.batch.items()}
  generated = np.asarray(decode(params, batch, jnp.asarray(prompts.next_position), router))
  correct = 0
  for row, expected in zip(generated, prompts.expected, strict=True):
    ends = np.flatnonzero(row == vocab.eos)
    if len(ends) == 0:
      continue
    correct += vocab.decode_text(np.concatenate([prompts.prompt_ids, row[:ends[0]]])) == expected
  return correct / len(prompts.answers)


class Evaluator:
  """Holds the eval sets and compiled functions of one run; `__call__(params, router=None)` ->
  metrics dict (`router`: the train state's router controller state, where it has one)."""

  def __init__(self, cfg: Config, setup: Setup, vocab, sets: EvalData | None = None):
    """`sets`: eval data already loaded for this config's data (else loaded here)."""
    self.cfg, self.setup, self.vocab = cfg, setup, vocab
    self.sets = load_eval_data(cfg) if sets is None else sets
    self.eval_step = make_eval_step(cfg, setup, lambda ids: vocab.modality_of(ids, xp=jnp, specials_as_text=True))
    spans = media_spans.spans_for(vocab, cfg.data)
    choice = dict(video_eval.CHOICE)   # scored by a forced choice (train/video_eval.py)
    self.decoders = {
        name: (video_eval.make_last_logits(setup, p.prompt_len) if name in choice else
               make_greedy_decode(setup, spans, prompt_len=p.prompt_len,
                                  max_new_tokens=p.batch["tokens"].shape[1] - p.prompt_len))
        for name, p in self.sets.prompts.items()}
    self.retrieval = Retrieval(cfg, setup) if cfg.data.task == "needle" else None
    self.media = None       # text -> image / audio, for runs taught to draw and sound
    if cfg.data.caption_first > 0 and data.has_default_source(cfg.data):
      self.media = MediaEvals(cfg, setup)
    self.routing_step = coactivation.make_routing_step(setup)

  def coactivation(self, params, router=None) -> tuple[np.ndarray, np.ndarray]:
    """The held-out mixed batches' co-activation counts [M, 3, E, E] and each valid token's
    experts [M, N, K] (train/coactivation.py)."""
    return coactivation.heldout_statistics(self.routing_step, params, self.sets.mixed, router)

  def _sums(self, params, batches, router, groups=None) -> dict:
    """Sums of the eval step's outputs over `batches`; with `groups` (a label per batch), a dict
    label -> sums as well, under the key `groups`."""
    total: dict = {}
    by_group: dict = {}
    for i, batch in enumerate(batches):
      out = jax.device_get(self.eval_step(params, batch, router))
      group = None if groups is None else by_group.setdefault(groups[i], {})
      for k, v in out.items():
        total[k] = total.get(k, 0.0) + float(v)
        if group is not None:
          group[k] = group.get(k, 0.0) + float(v)
    if groups is not None:
      total["groups"] = by_group
    return total

  @property
  def notes(self) -> tuple:
    """What this run's eval skips and why (one line each)."""
    return self.sets.notes

  def __call__(self, params, router=None) -> dict:
    metrics = {}
    labels = self.sets.mixed_sources or None
    s = self._sums(params, self.sets.mixed, router, labels)
    if s.get("weight_sum", 0.0) > 0:
      metrics["eval/loss"] = s["ce_sum"] / s["weight_sum"]
    for name in MODALITIES:
      if s.get(f"weight_sum/{name}", 0.0) > 0:
        metrics[f"eval/loss/{name}"] = s[f"ce_sum/{name}"] / s[f"weight_sum/{name}"]
    for label, g in s.get("groups", {}).items():
      if g.get("weight_sum", 0.0) > 0:
        metrics[f"eval/loss/source/{label}"] = g["ce_sum"] / g["weight_sum"]
    if self.sets.text:
      t = self._sums(params, self.sets.text, router)
      # Per UTF-8 byte of the held-out text, whatever the tokenizer (a token may span bytes).
      metrics["eval/text_bits_per_byte"] = t["ce_sum"] / max(self.sets.text_bytes, 1) / math.log(2)
    for name, key in (("image", "eval/image_to_text_accuracy"), ("audio", "eval/audio_to_text_accuracy"),
                      *video_eval.GREEDY):
      if name in self.sets.prompts:
        metrics[key] = word_accuracy(self.decoders[name], params, self.sets.prompts[name], self.vocab,
                                     router)
    for name, key in video_eval.CHOICE:
      if name in self.sets.prompts:
        metrics[key] = video_eval.choice_accuracy(self.decoders[name], params,
                                                  self.sets.prompts[name], self.vocab, router)
    if self.retrieval is not None:
      metrics.update(self.retrieval(params, router))
    if self.media is not None:
      metrics.update(self.media(params, router))
    return metrics
