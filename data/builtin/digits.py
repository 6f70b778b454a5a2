"""Handwritten digit images (scikit-learn's 1797 8x8 digits): split and patchify.

Pixels are what an 8-bit image file of the digit holds: sklearn's values are integers 0..16, stored
as the byte round(value * 255 / 16) and read as byte / 255 (as `data.image_io` decodes a PNG). So
the embedded dataset and the same digits written as PNG files (data/default_manifest.py) and
prepared give bit-identical patches; the digit value is recoverable exactly
(round(byte * 16 / 255)).
"""
import dataclasses

import numpy as np
from sklearn.datasets import load_digits

from omnimoe.data.config import DataConfig

IMAGE_SIDE = 8
PIXEL_MAX = 16.0            # sklearn's pixel values are integers 0..PIXEL_MAX
BYTE_MAX = 255              # an 8-bit pixel
SPLIT_SEED = 20240607       # fixed: the held-out images are the same for every run seed


@dataclasses.dataclass(frozen=True)
class DigitImages:
  patches_NxPxD: np.ndarray   # float32 [N, rows*cols, patch**2], pixel values in [0, 1]
  labels_N: np.ndarray        # int32 [N], 0..9
  indices_N: np.ndarray       # int64 [N], row in sklearn's `load_digits()` arrays
  grid: tuple[int, int]       # (rows, cols) of patches
  pixels_NxHxW: np.ndarray    # float32 [N, 8, 8], the images the patches were cut from


def pixel_bytes(values: np.ndarray) -> np.ndarray:
  """sklearn pixel values (0..16) -> uint8, the nearest 8-bit values: round(value * 255 / 16)."""
  return np.rint(np.asarray(values, np.float64) * (BYTE_MAX / PIXEL_MAX)).astype(np.uint8)


def unit_pixels(values: np.ndarray) -> np.ndarray:
  """sklearn pixel values (0..16) -> float32 in [0, 1]: byte / 255, as an image file decodes."""
  return pixel_bytes(values).astype(np.float32) / np.float32(BYTE_MAX)


def split_indices(num_images: int, heldout_fraction: float) -> tuple[np.ndarray, np.ndarray]:
  """(train, heldout) indices into `load_digits()`; disjoint, sorted, fixed by SPLIT_SEED."""
  if not 0.0 < heldout_fraction < 1.0:
    raise ValueError(f"data.heldout_fraction must be in (0, 1), got {heldout_fraction}")
  order = np.random.default_rng(SPLIT_SEED).permutation(num_images)
  num_heldout = max(1, int(round(heldout_fraction * num_images)))
  return np.sort(order[num_heldout:]), np.sort(order[:num_heldout])


def patchify(images_NxHxW: np.ndarray, patch: int) -> np.ndarray:
  """[N, H, W] -> [N, (H/p)*(W/p), p*p]; patches in row-major order, pixels row-major inside."""
  n, h, w = images_NxHxW.shape
  if h % patch or w % patch:
    raise ValueError(f"data.image_patch={patch} must divide the image side {h}")
  x = images_NxHxW.reshape(n, h // patch, patch, w // patch, patch)
  return x.transpose(0, 1, 3, 2, 4).reshape(n, (h // patch) * (w // patch), patch * patch)


def load_split(cfg: DataConfig) -> tuple[DigitImages, DigitImages]:
  """(train, heldout) digit images, patchified with `cfg.image_patch`."""
  digits = load_digits()
  images = unit_pixels(digits.images)
  labels = digits.target.astype(np.int32)
  patches = patchify(images, cfg.image_patch)
  side = IMAGE_SIDE // cfg.image_patch
  train, heldout = split_indices(len(labels), cfg.heldout_fraction)
  make = lambda idx: DigitImages(patches[idx], labels[idx], idx, (side, side), images[idx])
  return make(train), make(heldout)
