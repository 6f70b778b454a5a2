"""Slow, obvious references that tests compare the fast code against (never the code under test)."""
import functools

import numpy as np


def patchify_loop(pixels_HxW: np.ndarray, patch: int) -> np.ndarray:
  """[rows*cols, patch*patch]: patch (r, c) at row r*cols + c, its pixels row by row, by loops."""
  h, w = pixels_HxW.shape
  out = []
  for r in range(h // patch):
    for c in range(w // patch):
      out.append([pixels_HxW[r * patch + i, c * patch + j]
                  for i in range(patch) for j in range(patch)])
  return np.asarray(out, np.float32)


def digit_patches(index: int, patch: int = 4) -> np.ndarray:
  """sklearn digit `index` as an 8-bit image file holds it (round(v * 255 / 16) / 255), patchified."""
  values = _digit_values()[index]
  pixels = np.rint(values * 255 / 16).astype(np.float32) / np.float32(255)
  return patchify_loop(pixels, patch)


@functools.lru_cache(maxsize=1)
def _digit_values() -> np.ndarray:
  from sklearn.datasets import load_digits
  return load_digits().images


def byte_pieces(doc: bytes, max_bytes: int) -> list[tuple[bytes, bool]]:
  """A document cut into pieces of at most `max_bytes` bytes: (piece, ends the document)."""
  starts = list(range(0, len(doc), max_bytes))
  return [(doc[s:s + max_bytes], s == starts[-1]) for s in starts]
