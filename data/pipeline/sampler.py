"""Drawing default-dataset examples deterministically from an RNG: its held-out side (the
training side is its prepared folders, data/default_prepared.py).

Each draw picks a kind with probability proportional to `weight_image/audio/text` (per example,
not per token), then an example of it:
- image: a uniformly drawn image of the split with a caption drawn from the image templates;
- audio: a uniformly drawn digit, a freshly synthesized tone, a caption from the audio templates;
- text: a uniformly drawn piece of a document (pieces are at most L-2 tokens; EOS only where the
  document ends).
"""
from typing import NamedTuple

import numpy as np

from omnimoe.data.builtin.default_dataset import DefaultDataset, Split
from omnimoe.data.examples import Example, make_example

IMAGE, AUDIO, TEXT = 0, 1, 2

# Independent random streams: rng = default_rng([stream, seed, index]).
PROMPT_STREAM = 2            # (0, 1 and 3 were streams of the former in-memory training draws)
MIXED_EVAL_STREAM = 4       # one held-out example per index (data/mixture.py)
SHIFT_STREAM = 5            # image shifts of training records, per stream position (data/mixture.py)


def row_rng(stream: int, seed: int, index: int) -> np.random.Generator:
  return np.random.default_rng([stream, seed % (1 << 63), index])


def mixture_cumulative(ds: DefaultDataset) -> np.ndarray:
  weights = np.asarray([ds.cfg.weight_image, ds.cfg.weight_audio, ds.cfg.weight_text], np.float64)
  return np.cumsum(weights / weights.sum())


# One example at a time: the default dataset's held-out draws (data/mixture.py). The length is
# known from the cheap draws alone (`draw_recipe`), before any tone is synthesized, so a packing
# plan can be made without building examples.

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
    return make_example(recipe.caption, f, split.images[recipe.index])
  return make_example(recipe.caption, f, ds.tone(recipe.index, rng))
