"""Cross-modal eval prompts: `[BOS] [held-out image | fresh tone] "the digit "` -> the English word.

Both come through the code a user's data goes through, against the run's vocabulary and codebooks
(data/pipeline/sources.py):
- images: the held-out records of the built-in images folder whose caption is "the digit <word>",
  each image once (its caption's copies are consecutive lines), in file order; the word is the label;
- tones: freshly synthesized for the seed's prompt stream (never written to any folder, so never
  seen in training), featurized by `audio_io.frames` as a decoded WAV file is.

Every row is one segment of the same prompt length P followed by `max_new_tokens` padding positions
that the trainer fills with greedily generated text (modality text, segment id 1, t = h = w =
`next_position + j` for the j-th generated token). A generation is right when it ends with EOS and
the prompt's text ids followed by it decode to "the digit <answer>" (with byte-level text: the
generation is exactly the answer word).
"""
import dataclasses

import numpy as np

from omnimoe.data import records
from omnimoe.data.builtin import cache, dtmf
from omnimoe.data.builtin.captions import EVAL_TEMPLATE, WORDS, render
from omnimoe.data.config import DataConfig
from omnimoe.data.examples import Media, make_sequence
from omnimoe.data.packing import loss_weight_table, pack
from omnimoe.data.pipeline import sources as sources_lib
from omnimoe.data.pipeline.mixture import stream_rng
from omnimoe.data.prepare import audio_io
from omnimoe.data.prepare import folder as folder_lib

TONES_PER_DIGIT = 30        # default size of the audio prompt set (without `limit`)
PROMPT_STREAM = 2           # rng = default_rng([PROMPT_STREAM, seed, i]): the i-th prompt tone


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


def heldout_images(cfg: DataConfig, limit: int | None) -> tuple[list[records.ImagePart], list[int]]:
  """(image parts, digits) of the built-in held-out images captioned "the digit <word>"."""
  folder = folder_lib.open_folder(cache.path(cfg, "images"))
  digit_of = {render(EVAL_TEMPLATE, d).encode(): d for d in range(len(WORDS))}
  images, digits, last = [], [], None
  for key in folder.heldout_ids:
    if limit is not None and len(images) >= limit:
      break
    record = folder.record(int(key))
    image, text = record.parts
    if text not in digit_of:
      continue
    pixels = image.patches_MxD.tobytes()
    if last is not None and last == (record.line - 1, pixels):   # another copy of that caption
      last = (record.line, pixels)
      continue
    last = (record.line, pixels)
    images.append(image)
    digits.append(digit_of[text])
  return images, digits


def fresh_tone(digit: int, rng: np.random.Generator, cfg: DataConfig) -> records.AudioPart:
  """A newly synthesized tone of `digit`, featurized as a decoded WAV file is."""
  return records.AudioPart(audio_io.frames(dtmf.synthesize(digit, rng, cfg), cfg.sample_rate, cfg))


def prompt_set(cfg: DataConfig, *, modality: str, seed: int, max_new_tokens: int,
               limit: int | None = None) -> PromptSet:
  """Held-out images (all, or the first `limit`) or fresh tones (30 per digit, or `limit` in all,
  digits cycling 0..9), see the module docstring."""
  if modality == "image":
    parts, digits = heldout_images(cfg, limit)
  elif modality == "audio":
    digits = [i % 10 for i in range(10 * TONES_PER_DIGIT if limit is None else limit)]
    parts = [fresh_tone(d, stream_rng(PROMPT_STREAM, seed, i), cfg) for i, d in enumerate(digits)]
  else:
    raise ValueError(f"modality must be 'image' or 'audio', got {modality!r}")
  if max_new_tokens < 0:
    raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
  mix = sources_lib.resolve(cfg)
  prompt_ids = eval_prompt_ids(mix.vocab)
  media: list[Media] = [folder_lib.media_of(p, mix.vocab, mix.codebooks, mix.feature_dim)
                        for p in parts]
  examples = [make_sequence([m, prompt_ids], mix.feature_dim, eos=False, specials=mix.vocab) for m in media]
  prompt_len = len(examples[0].tokens_N) if examples else 0
  batch = pack([[e] for e in examples], prompt_len + max_new_tokens, mix.feature_dim,
               loss_weight_table(cfg))
  next_position = np.asarray([e.positions_Nx3[-1, 0] + 1 for e in examples], np.int32)
  return PromptSet(batch, prompt_len, next_position, [WORDS[d] for d in digits], prompt_ids,
                   tuple(render(EVAL_TEMPLATE, d).encode() for d in digits))
