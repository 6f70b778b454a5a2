"""The built-in default dataset as files and a manifest, for `omnimoe prepare` (no downloads).

  python -m omnimoe.data.builtin.files DIR [--tones-per-digit N] [--seed S] [--limit N] [--by-kind]
  omnimoe prepare DIR/images.jsonl --out IMAGES   # and tones.jsonl, text.jsonl (--by-kind)
  omnimoe train configs/tiny.yaml 'data.sources=[{path: IMAGES, weight: 0.7}, ...]'

or, in one call, `omnimoe.data.builtin.cache.ensure(cfg)` (built once, cached), which is what
`data.sources: []` trains and evaluates from. Writes

  DIR/images/digit_IIII.png  every scikit-learn digit (IIII: its row in `load_digits()`), an 8x8
                             grayscale PNG of its 8-bit pixels (`digits.pixel_bytes`)
  DIR/tones/tone_D_KKK.wav   N synthesized DTMF tones per digit D (data/builtin/dtmf.py), mono
                             16-bit PCM at data.sample_rate
  DIR/manifest.jsonl         the image lines, the tone lines and one line per text document of the
                             text corpus (data/builtin/text_corpus.py), in that order; every line
                             pins its split ("split": "train" | "heldout")
  DIR/{images,tones,text}.jsonl   with --by-kind: the same lines by kind, to prepare three folders
                             and mix them with data.weight_image/audio/text

Captions: every image and every tone appears once per caption template, repeated
`captions.copies` times (images 2, 1, 1, 1; tones 4, 3, 3), so a folder whose records are drawn
uniformly gives each template exactly its probability. All the lines of one image or tone share its
split, and they are consecutive.

Splits: images and text documents follow fixed splits (`digits.split_indices`,
`text_corpus.split_documents`, at `heldout_fraction`): the same for every run seed. The last
round(heldout_fraction * N) tones of each digit are held out (none when N is 1), for `eval/loss`;
the cross-modal eval synthesizes fresh tones instead (data/pipeline/prompts.py).

What the files hold:
- Images: with the default data.image_side 8 and data.image_channels 1 nothing is resized or
  converted: a prepared patch is exactly byte / 255 of sklearn's digit.
- Tones: a written tone is exact (the synthesis is on the 16-bit grid and leaves headroom: nothing
  clips), so the log-mel of the file equals the log-mel of the synthesized waveform.
- Text: the documents as they are; `omnimoe prepare` cuts them into data.seq_len - 2 token pieces.
- Mixture: one folder draws its training records uniformly, so the kinds would come in proportion
  to their line counts; --by-kind and three sources weighted data.weight_image/audio/text give the
  default mixture.
"""
import argparse
import dataclasses
import json
import pathlib

import numpy as np

from omnimoe.data.builtin import captions as captions_lib
from omnimoe.data.builtin import digits as digits_lib
from omnimoe.data.builtin import dtmf
from omnimoe.data.builtin import text_corpus
from omnimoe.data.config import DataConfig
from omnimoe.data.builtin.demo_files import write_png, write_wav

TONES_PER_DIGIT = 200         # default (writing and preparing all of it: ~9 s on 2 cores)
PCM_WIDTH = 2                 # bytes per WAV sample: 16-bit PCM
PCM_FULL_SCALE = 32767 / 32768  # the largest 16-bit sample; a tone reaching it would clip
TONE_STREAM = 0               # rng = default_rng([seed, TONE_STREAM, digit, k])
KINDS = (("image", "images"), ("audio", "tones"), ("text", "text"))   # (kind, file name)


def tone_waveform(digit: int, k: int, seed: int, cfg: DataConfig) -> np.ndarray:
  """float32 [samples]: tone `k` of `digit`, before it is written as 16-bit PCM."""
  return dtmf.synthesize(digit, np.random.default_rng([seed, TONE_STREAM, digit, k]), cfg)


def check_headroom(wave: np.ndarray, what: str) -> None:
  """Raises ValueError when `wave` would clip as 16-bit PCM (the file would not hold it exactly)."""
  peak = float(np.abs(wave).max())
  if peak >= PCM_FULL_SCALE:
    raise ValueError(f"{what} peaks at {peak:.4f}: it would clip as 16-bit PCM "
                     f"(data/builtin/dtmf.py must leave headroom)")


def heldout_tones(tones_per_digit: int, heldout_fraction: float) -> int:
  """How many of each digit's tones (the last ones) are held out."""
  if tones_per_digit < 2:
    return 0
  return min(tones_per_digit - 1, max(1, round(heldout_fraction * tones_per_digit)))


def caption_lines(templates, digit: int) -> list[str]:
  """The captions one image or tone of `digit` is written with: each template, `copies` times."""
  return [captions_lib.render(template, digit)
          for (template, _), n in zip(templates, captions_lib.copies(templates)) for _ in range(n)]


@dataclasses.dataclass(frozen=True)
class Written:
  manifest: pathlib.Path
  images: int                 # image files
  tones: int                  # tone files
  documents: int              # text documents (one line each)
  lines: dict                 # kind -> manifest lines of that kind
  heldout: dict               # kind -> held-out lines of that kind


def _image_lines(folder: pathlib.Path, cfg: DataConfig, limit: int | None) -> list[dict]:
  """Writes the digit PNGs; their manifest lines, each image's captions together."""
  from sklearn.datasets import load_digits
  sk = load_digits()
  heldout = set(digits_lib.split_indices(len(sk.target), cfg.heldout_fraction)[1].tolist())
  lines = []
  for i in range(len(sk.target) if limit is None else min(limit, len(sk.target))):
    name = f"images/digit_{i:04d}.png"
    write_png(folder / name, digits_lib.pixel_bytes(sk.images[i]))
    split = "heldout" if i in heldout else "train"
    lines += [{"image": name, "text": caption, "split": split}
              for caption in caption_lines(captions_lib.IMAGE_TEMPLATES, int(sk.target[i]))]
  return lines


def _tone_lines(folder: pathlib.Path, cfg: DataConfig, tones_per_digit: int,
                seed: int) -> list[dict]:
  """Writes the tone WAVs; their manifest lines, each tone's captions together."""
  held, lines = heldout_tones(tones_per_digit, cfg.heldout_fraction), []
  for digit in range(10):
    for k in range(tones_per_digit):
      name = f"tones/tone_{digit}_{k:03d}.wav"
      wave = tone_waveform(digit, k, seed, cfg)
      check_headroom(wave, f"tone {k} of digit {digit}")
      write_wav(folder / name, wave, cfg.sample_rate, width=PCM_WIDTH)
      split = "heldout" if k >= tones_per_digit - held else "train"
      lines += [{"audio": name, "text": caption, "split": split}
                for caption in caption_lines(captions_lib.AUDIO_TEMPLATES, digit)]
  return lines


def _text_lines(cfg: DataConfig, limit: int | None) -> list[dict]:
  docs = text_corpus.documents()
  heldout = set(text_corpus.split_documents(docs, cfg.heldout_fraction)[1])
  return [{"text": docs[j].decode("utf-8"), "split": "heldout" if j in heldout else "train"}
          for j in range(len(docs) if limit is None else min(limit, len(docs)))]


def _dump(path: pathlib.Path, rows) -> None:
  path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows),
                  encoding="utf-8")


def write_default_manifest(folder: str | pathlib.Path, *, tones_per_digit: int = TONES_PER_DIGIT,
                           seed: int = 0, limit: int | None = None, by_kind: bool = False,
                           cfg: DataConfig = DataConfig()) -> Written:
  """Writes the files and DIR/manifest.jsonl (see the module docstring).

  `limit`: only the first `limit` images (in `load_digits()` order) and the first `limit` text
  documents (corpus order), for quick tests; tones are `tones_per_digit` per digit either way.
  `cfg` gives sample_rate, tone_seconds and heldout_fraction (those you will train with).
  """
  if tones_per_digit < 0:
    raise ValueError(f"--tones-per-digit must be >= 0, got {tones_per_digit}")
  if limit is not None and limit < 0:
    raise ValueError(f"--limit must be >= 0, got {limit}")
  folder = pathlib.Path(folder)
  (folder / "images").mkdir(parents=True, exist_ok=True)
  (folder / "tones").mkdir(exist_ok=True)
  lines = {"image": _image_lines(folder, cfg, limit),
           "audio": _tone_lines(folder, cfg, tones_per_digit, seed),
           "text": _text_lines(cfg, limit)}
  manifest = folder / "manifest.jsonl"
  _dump(manifest, [row for kind, _ in KINDS for row in lines[kind]])
  if by_kind:
    for kind, name in KINDS:
      _dump(folder / f"{name}.jsonl", lines[kind])
  return Written(manifest, len({row["image"] for row in lines["image"]}), 10 * tones_per_digit,
                 len(lines["text"]), {kind: len(rows) for kind, rows in lines.items()},
                 {kind: sum(row["split"] == "heldout" for row in rows)
                  for kind, rows in lines.items()})


def main(argv=None) -> None:
  p = argparse.ArgumentParser(prog="python -m omnimoe.data.builtin.files",
                              description=__doc__.splitlines()[0])
  p.add_argument("folder")
  p.add_argument("--tones-per-digit", type=int, default=TONES_PER_DIGIT,
                 help="DTMF tones per digit (default %(default)s)")
  p.add_argument("--seed", type=int, default=0, help="which tones are synthesized (default 0)")
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
  print(f"{w.manifest}: {w.images} images, {w.tones} tones, {w.documents} text documents in "
        f"{w.lines['image']} + {w.lines['audio']} + {w.lines['text']} lines (held out: "
        f"{w.heldout['image']}, {w.heldout['audio']}, {w.heldout['text']})")


if __name__ == "__main__":
  main()
