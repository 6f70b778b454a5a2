"""The embedded default dataset as files and a manifest, for `omnimoe prepare` (no downloads).

  python -m data.default_manifest DIR [--tones-per-digit N] [--seed S] [--limit N] [--by-kind]
  omnimoe prepare DIR/manifest.jsonl --out OUT
  omnimoe train configs/tiny.yaml 'data.sources=[OUT]'

writes

  DIR/images/digit_IIII.png  every scikit-learn digit (IIII: its row in `load_digits()`), an 8x8
                             grayscale PNG, with one caption drawn from the image templates
  DIR/tones/tone_D_KKK.wav   N synthesized DTMF tones per digit D (data/dtmf.py), mono 16-bit PCM at
                             data.sample_rate, each with a caption drawn from the audio templates
  DIR/manifest.jsonl         one line per image, per tone and per text document of the embedded
                             text corpus (data/text_corpus.py), in that order; every line pins its
                             split ("split": "train" | "heldout")
  DIR/{images,tones,text}.jsonl   with --by-kind: the same lines by kind, to prepare three folders
                             and mix them with the embedded weights (data.weight_image/audio/text)

Splits: images and text documents follow the embedded dataset's own fixed splits
(`digits.split_indices`, `text_corpus.split_documents`, at `heldout_fraction`), so the prepared
folder holds out exactly the images and documents that the default-dataset evals use. The embedded
dataset has no held-out tones (its eval draws fresh ones); here the last round(heldout_fraction * N)
tones of each digit are held out (none when N is 1), for `eval/loss`.

How close the files are to the embedded dataset:
- Images: sklearn's pixels are integers 0..16; the embedded dataset feeds value / 16. A PNG holds
  bytes, and `data.image_io` decodes byte / 255, which can never equal k / 16 for 0 < k < 16 (255 is
  odd). The PNG stores round(value * 255 / 16), so the decoded patch is the 8-bit value nearest to
  the embedded float (at most 1/510 away) and the digit value is recoverable exactly
  (round(byte * 16 / 255)). With the default data.image_side 8 and data.image_channels 1 nothing is
  resized or converted, and the patches are cut as the embedded ones (data.image_patch).
- Tones: fixed draws (one waveform per file) where the embedded dataset synthesizes a fresh tone
  for every example; 16-bit PCM rounds each sample to 1/32768 and clips at full scale (the clean
  tone peaks at 1.0, the noise can push past it), and the prepared frames are the log-mel of that
  quantized waveform.
- Captions: one fixed caption per image or tone, where the embedded dataset draws one per example.
- Text: the documents as they are; `omnimoe prepare` cuts them into data.seq_len - 2 token pieces
  exactly as the embedded text stream does.
- Mixture: one folder draws its training records uniformly, so the kinds come in proportion to
  their counts, not data.weight_image/audio/text (use --by-kind and three weighted sources for that).
"""
import argparse
import dataclasses
import json
import pathlib

import numpy as np

from data import captions as captions_lib
from data import digits as digits_lib
from data import dtmf, text_corpus
from data.config import DataConfig
from data.demo_files import write_png, write_wav

PCM_WIDTH = 2                 # bytes per WAV sample: 16-bit PCM
# Independent random streams: rng = default_rng([seed, stream, ...]).
TONE_STREAM, IMAGE_CAPTION_STREAM, AUDIO_CAPTION_STREAM = 0, 1, 2


def png_bytes(values: np.ndarray) -> np.ndarray:
  """sklearn digit pixels (0..16) -> the uint8 PNG values: the 8-bit values nearest value / 16."""
  return np.rint(np.asarray(values, np.float64) * (255.0 / digits_lib.PIXEL_MAX)).astype(np.uint8)


def tone_waveform(digit: int, k: int, seed: int, cfg: DataConfig) -> np.ndarray:
  """float32 [samples]: tone `k` of `digit`, before it is written as 16-bit PCM."""
  return dtmf.synthesize(digit, np.random.default_rng([seed, TONE_STREAM, digit, k]), cfg)


def heldout_tones(tones_per_digit: int, heldout_fraction: float) -> int:
  """How many of each digit's tones (the last ones) are held out."""
  if tones_per_digit < 2:
    return 0
  return min(tones_per_digit - 1, max(1, round(heldout_fraction * tones_per_digit)))


def _caption(templates, digit: int, rng: np.random.Generator) -> str:
  cumulative, texts = captions_lib.table(templates)
  t = min(int(np.searchsorted(cumulative, rng.random(), side="right")), len(texts) - 1)
  return texts[t][digit]


@dataclasses.dataclass(frozen=True)
class Written:
  manifest: pathlib.Path
  images: int
  tones: int
  documents: int
  heldout: dict               # kind -> held-out lines of that kind


def write_default_manifest(folder: str | pathlib.Path, *, tones_per_digit: int = 30, seed: int = 0,
                           limit: int | None = None, by_kind: bool = False,
                           cfg: DataConfig = DataConfig()) -> Written:
  """Writes the files and DIR/manifest.jsonl (see the module docstring).

  `limit`: only the first `limit` images (in `load_digits()` order) and the first `limit` text
  documents (corpus order), for quick tests; tones are `tones_per_digit` per digit either way.
  `cfg` gives sample_rate, tone_seconds and heldout_fraction (those you will train with).
  """
  from sklearn.datasets import load_digits
  if tones_per_digit < 0:
    raise ValueError(f"--tones-per-digit must be >= 0, got {tones_per_digit}")
  if limit is not None and limit < 0:
    raise ValueError(f"--limit must be >= 0, got {limit}")
  folder = pathlib.Path(folder)
  (folder / "images").mkdir(parents=True, exist_ok=True)
  (folder / "tones").mkdir(exist_ok=True)
  lines = {"image": [], "audio": [], "text": []}

  sk = load_digits()
  _, heldout_images = digits_lib.split_indices(len(sk.target), cfg.heldout_fraction)
  heldout_images = set(heldout_images.tolist())
  for i in range(len(sk.target) if limit is None else min(limit, len(sk.target))):
    digit = int(sk.target[i])
    name = f"images/digit_{i:04d}.png"
    write_png(folder / name, png_bytes(sk.images[i]))
    rng = np.random.default_rng([seed, IMAGE_CAPTION_STREAM, i])
    lines["image"].append({"image": name, "text": _caption(captions_lib.IMAGE_TEMPLATES, digit, rng),
                           "split": "heldout" if i in heldout_images else "train"})

  held = heldout_tones(tones_per_digit, cfg.heldout_fraction)
  for digit in range(10):
    for k in range(tones_per_digit):
      name = f"tones/tone_{digit}_{k:03d}.wav"
      write_wav(folder / name, tone_waveform(digit, k, seed, cfg), cfg.sample_rate, width=PCM_WIDTH)
      rng = np.random.default_rng([seed, AUDIO_CAPTION_STREAM, digit, k])
      lines["audio"].append({"audio": name, "text": _caption(captions_lib.AUDIO_TEMPLATES, digit, rng),
                             "split": "heldout" if k >= tones_per_digit - held else "train"})

  docs = text_corpus.documents()
  _, heldout_docs = text_corpus.split_documents(docs, cfg.heldout_fraction)
  heldout_docs = set(heldout_docs)
  for j in range(len(docs) if limit is None else min(limit, len(docs))):
    lines["text"].append({"text": docs[j].decode("utf-8"),
                          "split": "heldout" if j in heldout_docs else "train"})

  def dump(path: pathlib.Path, rows) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows),
                    encoding="utf-8")

  manifest = folder / "manifest.jsonl"
  dump(manifest, [row for kind in ("image", "audio", "text") for row in lines[kind]])
  if by_kind:
    for kind, name in (("image", "images"), ("audio", "tones"), ("text", "text")):
      dump(folder / f"{name}.jsonl", lines[kind])
  return Written(manifest, len(lines["image"]), len(lines["audio"]), len(lines["text"]),
                 {kind: sum(row["split"] == "heldout" for row in rows) for kind, rows in lines.items()})


def main(argv=None) -> None:
  p = argparse.ArgumentParser(prog="python -m data.default_manifest",
                              description=__doc__.splitlines()[0])
  p.add_argument("folder")
  p.add_argument("--tones-per-digit", type=int, default=30, help="DTMF tones per digit (default 30)")
  p.add_argument("--seed", type=int, default=0, help="tones and captions (default 0)")
  p.add_argument("--limit", type=int, default=None,
                 help="only the first N images and the first N text documents (quick tests)")
  p.add_argument("--by-kind", action="store_true",
                 help="also write images.jsonl, tones.jsonl and text.jsonl")
  p.add_argument("--heldout-fraction", type=float, default=DataConfig.heldout_fraction,
                 help="the data.heldout_fraction you train with (default %(default)s)")
  args = p.parse_args(argv)
  if not 0 < args.heldout_fraction < 1:
    p.error(f"--heldout-fraction must lie in (0, 1), got {args.heldout_fraction}")
  try:
    w = write_default_manifest(args.folder, tones_per_digit=args.tones_per_digit, seed=args.seed,
                               limit=args.limit, by_kind=args.by_kind,
                               cfg=DataConfig(heldout_fraction=args.heldout_fraction))
  except ValueError as e:
    p.error(str(e))
  print(f"{w.manifest}: {w.images} images, {w.tones} tones, {w.documents} text documents "
        f"(held out: {w.heldout['image']}, {w.heldout['audio']}, {w.heldout['text']})")


if __name__ == "__main__":
  main()
