"""Image files -> patch vectors in the config's layout, decoded with Pillow.

An image is turned upright (EXIF orientation), converted to grayscale (`data.image_channels=1`) or
RGB (3), resized to `data.image_side` x `data.image_side` pixels (bicubic; an image already of that
size is left untouched, aspect ratio is not kept), scaled to [0, 1] and cut into
`data.image_patch`-sided patches: patches in row-major order, pixels row-major inside a patch,
channels innermost.
"""
import pathlib

import numpy as np
from PIL import Image, ImageOps

from omnimoe.data.config import DataConfig

RESAMPLE = Image.Resampling.BICUBIC
PIXEL_MAX = 255.0


class MediaError(ValueError):
  """A media file that is missing or cannot be decoded; the message is the reason, for the user."""


def check_layout(cfg: DataConfig) -> None:
  """Raises ValueError naming the key when the image layout is impossible."""
  if cfg.image_channels not in (1, 3):
    raise ValueError(f"data.image_channels must be 1 (grayscale) or 3 (RGB), got {cfg.image_channels}")
  if cfg.image_side <= 0 or cfg.image_patch <= 0 or cfg.image_side % cfg.image_patch:
    raise ValueError(f"data.image_patch={cfg.image_patch} must divide data.image_side="
                     f"{cfg.image_side}")


def grid(cfg: DataConfig) -> tuple[int, int]:
  """(rows, cols) of patches of every prepared image."""
  side = cfg.image_side // cfg.image_patch
  return side, side


def load_pixels(path: str | pathlib.Path, cfg: DataConfig) -> np.ndarray:
  """float32 [side, side, channels] in [0, 1]; raises MediaError for a missing or corrupt file."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise MediaError("file not found")
  mode = "L" if cfg.image_channels == 1 else "RGB"
  try:
    with Image.open(path) as image:
      image = ImageOps.exif_transpose(image).convert(mode)
      if image.size != (cfg.image_side, cfg.image_side):
        image = image.resize((cfg.image_side, cfg.image_side), RESAMPLE)
      pixels = np.asarray(image, np.float32) / PIXEL_MAX
  except Exception as e:  # Pillow's decoders raise many types (OSError, SyntaxError, zlib.error, ...)
    raise MediaError(f"cannot decode image ({type(e).__name__}: {e})") from None
  return pixels.reshape(cfg.image_side, cfg.image_side, cfg.image_channels)


def patchify(pixels_HxWxC: np.ndarray, patch: int) -> np.ndarray:
  """[H, W, C] -> [(H/p)*(W/p), p*p*C]: patches row-major, pixels row-major, channels innermost."""
  h, w, c = pixels_HxWxC.shape
  x = pixels_HxWxC.reshape(h // patch, patch, w // patch, patch, c)
  return x.transpose(0, 2, 1, 3, 4).reshape((h // patch) * (w // patch), patch * patch * c)


def unpatchify(patches_MxD: np.ndarray, grid: tuple[int, int], patch: int) -> np.ndarray:
  """The inverse of `patchify`: [rows*cols, p*p*C] -> [rows*p, cols*p, C]."""
  rows, cols = grid
  c = patches_MxD.shape[1] // (patch * patch)
  x = patches_MxD.reshape(rows, cols, patch, patch, c)
  return x.transpose(0, 2, 1, 3, 4).reshape(rows * patch, cols * patch, c)


def shift(pixels_HxW: np.ndarray, dy: int, dx: int) -> np.ndarray:
  """The image ([H, W] or [H, W, C]) moved by (dy, dx) pixels; what moves out is lost, what moves
  in is zero (background)."""
  h, w = pixels_HxW.shape[:2]
  out = np.zeros_like(pixels_HxW)
  out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = (
      pixels_HxW[max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)])
  return out


def shift_patches(patches_MxD: np.ndarray, grid: tuple[int, int], patch: int, dy: int,
                  dx: int) -> np.ndarray:
  """The image behind `patches_MxD` moved by (dy, dx) pixels (zero fill), as patches again."""
  return patchify(shift(unpatchify(patches_MxD, grid, patch), dy, dx), patch)


def load_patches(path: str | pathlib.Path, cfg: DataConfig) -> np.ndarray:
  """float32 [rows*cols, channels*patch**2]: the patch vectors of one image file."""
  return np.ascontiguousarray(patchify(load_pixels(path, cfg), cfg.image_patch), np.float32)
