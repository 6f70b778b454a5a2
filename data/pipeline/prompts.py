"""Cross-modal eval prompts: `[BOS] [held-out image | fresh tone] "the digit "` -> the English word.

Every row is one segment of the same prompt length P followed by `max_new_tokens` padding positions
that the trainer fills with greedily generated text (modality 1, segment id 1, t = h = w =
`next_position + j` for the j-th generated token). A generation is right when it ends with EOS and
the prompt's text ids followed by it decode to "the digit <answer>" (with byte-level text: the
generation is exactly the answer word).
"""
import dataclasses

import numpy as np

from omnimoe.data.pipeline import sampler
from omnimoe.data.builtin.captions import EVAL_TEMPLATE, WORDS, render
from omnimoe.data.config import DataConfig
from omnimoe.data.builtin.default_dataset import build
from omnimoe.data.examples import make_example
from omnimoe.data.packing import pack
from omnimoe.data.packing import loss_weight_table

TONES_PER_DIGIT = 30        # default size of the audio prompt set (without `limit`)


@dataclasses.dataclass(frozen=True)
class PromptSet:
  batch: dict[str, np.ndarray]   # the batch contract, [N, P + max_new_tokens]
  prompt_len: int                # P: the prompt fills positions 0..P-1 of every row
  next_position: np.ndarray      # int32 [N]: running index of the first generated token
  answers: list[str]             # the English word each row should produce
  prompt_ids: np.ndarray         # int32: the prompt's text ids (after the media)
  expected: tuple[bytes, ...]    # per row: what prompt_ids + the generation (up to EOS) must
                                 # decode to, e.g. b"the digit seven"


def eval_prompt_ids(vocab) -> np.ndarray:
  """The text ids fed after the media: the longest common prefix of the ids of the ten captions
  "the digit <word>" (with bytes, exactly "the digit "; with a sentencepiece model, the pieces the
  captions share, so the prompt is a prefix of what training showed)."""
  captions = [vocab.encode_text(render(EVAL_TEMPLATE, d)) for d in range(len(WORDS))]
  n = 0
  while all(len(c) > n and c[n] == captions[0][n] for c in captions):
    n += 1
  return captions[0][:n]


def prompt_set(cfg: DataConfig, *, modality: str, seed: int, max_new_tokens: int,
               limit: int | None = None) -> PromptSet:
  """Held-out images (all, or the first `limit`) or fresh tones (30 per digit, or `limit` in all,
  digits cycling 0..9), drawn from the seed's prompt stream (never seen in training)."""
  ds = build(cfg)
  prompt_ids = eval_prompt_ids(ds.vocab)
  if modality == "image":
    count = len(ds.heldout.images) if limit is None else min(limit, len(ds.heldout.images))
    media = ds.heldout.images[:count]
    digits = [int(d) for d in ds.heldout.image_labels[:count]]
  elif modality == "audio":
    count = 10 * TONES_PER_DIGIT if limit is None else limit
    digits = [i % 10 for i in range(count)]
    media = [ds.tone(d, sampler.row_rng(sampler.PROMPT_STREAM, seed, i))
             for i, d in enumerate(digits)]
  else:
    raise ValueError(f"modality must be 'image' or 'audio', got {modality!r}")
  if max_new_tokens < 0:
    raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")

  examples = [make_example(prompt_ids, ds.feature_dim, m, eos=False) for m in media]
  prompt_len = len(examples[0].tokens_N) if examples else 0
  batch = pack([[e] for e in examples], prompt_len + max_new_tokens, ds.feature_dim,
               loss_weight_table(cfg))
  next_position = np.asarray([e.positions_Nx3[-1, 0] + 1 for e in examples], np.int32)
  return PromptSet(batch, prompt_len, next_position, [WORDS[d] for d in digits], prompt_ids,
                   tuple(render(EVAL_TEMPLATE, d).encode() for d in digits))
