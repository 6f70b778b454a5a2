"""Drawing one packed row of the image / audio / text mixture, deterministically from an RNG.

Each draw picks a source with probability proportional to `weight_image/audio/text` (per example,
not per token), then an example of it:
- image: a uniformly drawn image of the split with a caption drawn from the image templates;
- audio: a uniformly drawn digit, a freshly synthesized tone, a caption from the audio templates;
- text: a uniformly drawn piece of a document (pieces are at most L-2 bytes; EOS only where the
  document ends).
An example that fits in the space left is appended. A text piece that does not fit is cut to the
space left (without EOS) and ends the row, provided at least MIN_TEXT_FILL positions remain; an
image or tone that does not fit is skipped. The row ends after MAX_MISSES skips in a row.
"""
from typing import NamedTuple

import numpy as np

from data.default_dataset import DefaultDataset, Split
from data.examples import Example, make_example

IMAGE, AUDIO, TEXT = 0, 1, 2
MAX_MISSES = 4
MIN_TEXT_FILL = 8

# Independent random streams: rng = default_rng([stream, seed, index]).
TRAIN_STREAM, EVAL_STREAM, PROMPT_STREAM = 0, 1, 2
MIXED_TRAIN_STREAM, MIXED_EVAL_STREAM = 3, 4   # one example per index (data/mixture.py)


def row_rng(stream: int, seed: int, index: int) -> np.random.Generator:
  return np.random.default_rng([stream, seed % (1 << 63), index])


def mixture_cumulative(ds: DefaultDataset) -> np.ndarray:
  weights = np.asarray([ds.cfg.weight_image, ds.cfg.weight_audio, ds.cfg.weight_text], np.float64)
  return np.cumsum(weights / weights.sum())


def sample_row(ds: DefaultDataset, split: Split, rng: np.random.Generator) -> list[Example]:
  """The examples of one row, in order; together at most `seq_len` tokens.

  Training images (`split is ds.train`) are shifted by up to `image_shift` pixels.
  """
  cumulative = mixture_cumulative(ds)
  f = ds.feature_dim
  examples, space, misses = [], ds.cfg.seq_len, 0
  while space > 0 and misses < MAX_MISSES:
    kind = min(int(np.searchsorted(cumulative, rng.random(), side="right")), TEXT)
    if kind == TEXT:
      ids, ends_document = split.text_pieces[rng.integers(len(split.text_pieces))]
      if 1 + len(ids) + ends_document <= space:
        example = make_example(ids, f, eos=ends_document)
      elif space >= MIN_TEXT_FILL:
        example = make_example(ids[:space - 1], f, eos=False)
      else:
        misses += 1
        continue
    elif kind == IMAGE:
      i = int(rng.integers(len(split.images)))
      digit = int(split.image_labels[i])
      caption = ds.image_captions.draw(digit, rng)
      if 2 + ds.patches_per_image + len(caption) > space:
        misses += 1
        continue
      augment = split is ds.train and ds.cfg.image_shift > 0
      media = ds.shifted_image(split, i, rng) if augment else split.images[i]
      example = make_example(caption, f, media)
    else:
      digit = int(rng.integers(10))
      caption = ds.audio_captions.draw(digit, rng)
      if 2 + ds.frames_per_tone + len(caption) > space:
        misses += 1
        continue
      example = make_example(caption, f, ds.tone(digit, rng))
    examples.append(example)
    space -= len(example.tokens_N)
    misses = 0
  return examples


# One example at a time, for mixing with prepared sources (data/mixture.py): the same kinds, weights
# and captions as `sample_row`, but a text piece is always taken whole and nothing is skipped. The
# length is known from the cheap draws alone (`draw_recipe`), before any tone is synthesized, so a
# packing plan can be made without building examples.

class Recipe(NamedTuple):
  kind: int                   # IMAGE, AUDIO or TEXT
  index: int                  # image index in the split, digit of a tone, or text piece index
  caption: np.ndarray | None  # caption ids (image, audio)
  length: int                 # tokens of the example


def draw_recipe(ds: DefaultDataset, split: Split, rng: np.random.Generator) -> Recipe:
  kind = min(int(np.searchsorted(mixture_cumulative(ds), rng.random(), side="right")), TEXT)
  if kind == TEXT:
    i = int(rng.integers(len(split.text_pieces)))
    ids, ends_document = split.text_pieces[i]
    return Recipe(TEXT, i, None, 1 + len(ids) + ends_document)
  if kind == IMAGE:
    i = int(rng.integers(len(split.images)))
    caption = ds.image_captions.draw(int(split.image_labels[i]), rng)
    return Recipe(IMAGE, i, caption, 2 + ds.patches_per_image + len(caption))
  digit = int(rng.integers(10))
  caption = ds.audio_captions.draw(digit, rng)
  return Recipe(AUDIO, digit, caption, 2 + ds.frames_per_tone + len(caption))


def cook(ds: DefaultDataset, split: Split, recipe: Recipe, rng: np.random.Generator) -> Example:
  """The example of `recipe`; `rng` continues from where `draw_recipe` left it."""
  f = ds.feature_dim
  if recipe.kind == TEXT:
    ids, ends_document = split.text_pieces[recipe.index]
    return make_example(ids, f, eos=ends_document)
  if recipe.kind == IMAGE:
    augment = split is ds.train and ds.cfg.image_shift > 0
    media = ds.shifted_image(split, recipe.index, rng) if augment else split.images[recipe.index]
    return make_example(recipe.caption, f, media)
  return make_example(recipe.caption, f, ds.tone(recipe.index, rng))
