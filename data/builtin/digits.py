"""Handwritten digit images (scikit-learn's 1797 8x8 digits) as the bytes of 8-bit image files,
and their fixed train / held-out split.

sklearn's pixel values are integers 0..16; a digit is written as the byte round(value * 255 / 16)
(data/builtin/files.py writes PNGs of them), so the digit value is recoverable exactly
(round(byte * 16 / 255)).
"""
import numpy as np

PIXEL_MAX = 16.0            # sklearn's pixel values are integers 0..PIXEL_MAX
BYTE_MAX = 255              # an 8-bit pixel
SPLIT_SEED = 20240607       # fixed: the held-out images are the same for every run seed


def pixel_bytes(values: np.ndarray) -> np.ndarray:
  """sklearn pixel values (0..16) -> uint8, the nearest 8-bit values: round(value * 255 / 16)."""
  return np.rint(np.asarray(values, np.float64) * (BYTE_MAX / PIXEL_MAX)).astype(np.uint8)


def split_indices(num_images: int, heldout_fraction: float) -> tuple[np.ndarray, np.ndarray]:
  """(train, heldout) indices into `load_digits()`; disjoint, sorted, fixed by SPLIT_SEED."""
  if not 0.0 < heldout_fraction < 1.0:
    raise ValueError(f"data.heldout_fraction must be in (0, 1), got {heldout_fraction}")
  order = np.random.default_rng(SPLIT_SEED).permutation(num_images)
  num_heldout = max(1, int(round(heldout_fraction * num_images)))
  return np.sort(order[num_heldout:]), np.sort(order[:num_heldout])
