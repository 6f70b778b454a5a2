"""One training example as arrays: `[BOS] [image patches | audio frames] [text bytes] [EOS]`.

Positions (t, h, w) follow the batch contract and start at 0 at the example's BOS:
- text and specials: t = h = w = running index;
- an image starting at running index s, patch (r, c): (s, s + r, s + c); afterwards the running
  index continues at s + max(rows, cols);
- audio frame j starting at s: t = h = w = s + j;
- a video clip with its sound: one clock for both, interleaved in chunks (data/video_layout.py).
"""
from typing import NamedTuple

import numpy as np

from omnimoe.model.modality import AUDIO, IMAGE, TEXT


class Media(NamedTuple):
  """An image, a tone or a clip, ready to be placed in a sequence."""
  tokens_M: np.ndarray        # int32 [M] unified-vocab ids (codebook id + offset)
  features_MxF: np.ndarray    # float32 [M, F] patch / frame vectors, zero-padded to F
  positions_Mx3: np.ndarray   # int32 [M, 3] (t, h, w) as if the media started at running index 0
  span: int                   # how far the running index advances past the media
  modality: int | np.ndarray  # IMAGE.code or AUDIO.code (model/modality.py), or int8 [M] per
                              # position (a clip mixes video and audio)


class Example(NamedTuple):
  tokens_N: np.ndarray        # int32 [N]
  features_NxF: np.ndarray    # float32 [N, F]
  modality_N: np.ndarray      # int8 [N]; BOS/EOS count as text
  positions_Nx3: np.ndarray   # int32 [N, 3], running index 0 at BOS
  image_loss: bool = True     # False: no loss on this example's image codes (data.image_loss)


def pad_features(x_MxD: np.ndarray, feature_dim: int) -> np.ndarray:
  out = np.zeros((x_MxD.shape[0], feature_dim), np.float32)
  out[:, :x_MxD.shape[1]] = x_MxD
  return out


def image_media(ids_M: np.ndarray, patches_MxD: np.ndarray, grid: tuple[int, int],
                feature_dim: int) -> Media:
  rows, cols = grid
  r, c = np.divmod(np.arange(rows * cols), cols)
  positions = np.stack([np.zeros_like(r), r, c], axis=1).astype(np.int32)
  return Media(np.asarray(ids_M, np.int32), pad_features(patches_MxD, feature_dim), positions,
               max(rows, cols), IMAGE.code)


def audio_media(ids_M: np.ndarray, frames_MxD: np.ndarray, feature_dim: int) -> Media:
  j = np.arange(len(ids_M), dtype=np.int32)
  return Media(np.asarray(ids_M, np.int32), pad_features(frames_MxD, feature_dim),
               np.stack([j, j, j], axis=1), len(ids_M), AUDIO.code)


def _text_positions(start: int, n: int) -> np.ndarray:
  return np.repeat(np.arange(start, start + n, dtype=np.int32)[:, None], 3, axis=1)


def make_example(text_ids: np.ndarray, feature_dim: int, media: Media | None = None,
                 eos: bool = True, *, specials) -> Example:
  """`[BOS] [media] text [EOS]`; `eos=False` for a piece cut out of a longer document.
  `specials`: the run's Vocab (its `bos` and `eos` ids)."""
  bos_id, eos_id = specials.bos, specials.eos
  tail = np.concatenate([text_ids, [eos_id]] if eos else [text_ids]).astype(np.int32)
  if media is None:
    head = np.asarray([bos_id], np.int32)
    tokens = np.concatenate([head, tail])
    return Example(tokens, np.zeros((len(tokens), feature_dim), np.float32),
                   np.full(len(tokens), TEXT.code, np.int8),
                   _text_positions(0, len(tokens)))
  m = len(media.tokens_M)
  tokens = np.concatenate([[bos_id], media.tokens_M, tail]).astype(np.int32)
  features = np.zeros((len(tokens), feature_dim), np.float32)
  features[1:1 + m] = media.features_MxF
  modality = np.full(len(tokens), TEXT.code, np.int8)
  modality[1:1 + m] = np.asarray(media.modality, np.int8)
  positions = np.concatenate([_text_positions(0, 1), media.positions_Mx3 + 1,
                              _text_positions(1 + media.span, len(tail))])
  return Example(tokens, features, modality, positions)


def make_sequence(parts, feature_dim: int, eos: bool = True, *, specials) -> Example:
  """`[BOS] part part ... [EOS]` for parts in any order: int32 text ids or Media.

  Positions follow the same rules as `make_example` (each part starts at the running index, media
  advance it by their span), so `make_sequence([media, text_ids], F)` is `make_example(text_ids,
  F, media)`. `eos=False` for a piece cut out of a longer text. `specials`: the run's Vocab (its
  `bos` and `eos` ids).
  """
  bos_id, eos_id = specials.bos, specials.eos
  tokens = [np.asarray([bos_id], np.int32)]
  features = [np.zeros((1, feature_dim), np.float32)]
  modality = [np.full(1, TEXT.code, np.int8)]
  positions = [_text_positions(0, 1)]
  start = 1
  for part in parts:
    if isinstance(part, Media):
      tokens.append(part.tokens_M)
      features.append(part.features_MxF)
      modality.append(np.broadcast_to(np.asarray(part.modality, np.int8), len(part.tokens_M)))
      positions.append(part.positions_Mx3 + start)
      start += part.span
    else:
      n = len(part)
      tokens.append(np.asarray(part, np.int32))
      features.append(np.zeros((n, feature_dim), np.float32))
      modality.append(np.full(n, TEXT.code, np.int8))
      positions.append(_text_positions(start, n))
      start += n
  if eos:
    tokens.append(np.asarray([eos_id], np.int32))
    features.append(np.zeros((1, feature_dim), np.float32))
    modality.append(np.full(1, TEXT.code, np.int8))
    positions.append(_text_positions(start, 1))
  return Example(np.concatenate(tokens), np.concatenate(features), np.concatenate(modality),
                 np.concatenate(positions).astype(np.int32))
