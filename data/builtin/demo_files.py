"""Small image and audio files and a manifest, written on the spot (no downloads).

The tests, `bench/data.py` and anyone trying `omnimoe prepare` use these:

  python -m omnimoe.data.builtin.demo_files DIR [--examples N]     # DIR/manifest.jsonl plus PNG/WAV files

The demo examples are the default dataset's kinds, as files: a digit image (scikit-learn's 8x8
digits, upscaled to 16x16 PNG) with a caption, a DTMF tone for a digit (16 kHz, 16-bit WAV) with a
caption, and a text-only line.
"""
import argparse
import json
import pathlib
import wave

import numpy as np
from PIL import Image

from omnimoe.data.builtin import captions
from omnimoe.data.builtin import dtmf
from omnimoe.data.config import DataConfig

WAV_RATE = 16000


def write_png(path: str | pathlib.Path, pixels: np.ndarray) -> None:
  """uint8 [H, W] (grayscale) or [H, W, 3] (RGB) -> PNG (or JPEG, by the file's suffix)."""
  Image.fromarray(np.asarray(pixels, np.uint8)).save(path)


def write_wav(path: str | pathlib.Path, samples: np.ndarray, rate: int, *, width: int = 2) -> None:
  """float [n] or [n, channels] in [-1, 1] -> PCM WAV with `width` bytes per sample (1, 2 or 4)."""
  x = np.asarray(samples, np.float64)
  x = x[:, None] if x.ndim == 1 else x
  scale = float(1 << (8 * width - 1))
  ints = np.clip(np.round(x * scale), -scale, scale - 1)
  data = (ints + 128).astype(np.uint8) if width == 1 else ints.astype({2: "<i2", 4: "<i4"}[width])
  with wave.open(str(path), "wb") as w:
    w.setnchannels(x.shape[1])
    w.setsampwidth(width)
    w.setframerate(rate)
    w.writeframes(data.tobytes())


def write_demo(folder: str | pathlib.Path, examples: int = 30, seed: int = 0) -> pathlib.Path:
  """Writes `examples` lines (image, tone, text in turn) and their files; returns the manifest."""
  from sklearn.datasets import load_digits
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  digits = load_digits()
  tone_cfg = DataConfig(sample_rate=WAV_RATE)
  lines = []
  for i in range(examples):
    digit = int(rng.integers(10))
    word = captions.WORDS[digit]
    if i % 3 == 0:
      image = digits.images[rng.choice(np.flatnonzero(digits.target == digit))]
      pixels = np.kron(image * (255 / 16), np.ones((2, 2)))   # 8x8 -> 16x16
      write_png(folder / f"image_{i:04d}.png", pixels)
      lines.append({"image": f"image_{i:04d}.png", "text": f"a handwritten {word}"})
    elif i % 3 == 1:
      write_wav(folder / f"tone_{i:04d}.wav", dtmf.synthesize(digit, rng, tone_cfg), WAV_RATE)
      lines.append({"audio": f"tone_{i:04d}.wav", "text": f"the tone of {word}"})
    else:
      lines.append({"text": f"Example {i}: {word} is the digit {digit}."})
  manifest = folder / "manifest.jsonl"
  manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
  return manifest


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("folder")
  p.add_argument("--examples", type=int, default=30)
  args = p.parse_args()
  print(write_demo(args.folder, args.examples))


if __name__ == "__main__":
  main()
