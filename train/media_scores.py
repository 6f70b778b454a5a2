"""Scorers of generated media, for the text -> image and text -> audio evaluations to come, and
their ceilings: what the scorers give on real media passed through the codebooks.

- `DigitClassifier`: scikit-learn's logistic regression fitted on the training split of the
  digit images (data/builtin/digits.py, the pixels as the data pipeline reads them: byte / 255);
  `predict(pixels [N, side, side, 1])` -> digits.
- `dtmf_digit(wave, cfg)`: the key whose row and column frequencies are the strongest in the
  waveform's mel power (averaged over frames; a frequency's strength is the mel power weighted by
  the mel filters' response at it, normalised); -1 when the pair names no digit (* or #). It reads
  mel bands, not exact frequencies: a waveform recovered from log-mel frames (Griffin-Lim) keeps
  which bands are loud but not where in a band the tone was (a spectrum peak search within +-2.5%
  of the keypad frequencies heard 1.00 of fresh tones but about 0.5 of their Griffin-Lim
  reconstructions, this detector 1.00 of both, 60 tones).
- `ceilings(cfg, codebooks)`: the held-out real digits coded with the run's image codebook and
  drawn back from the centroids (train/media_out.py), scored by the classifier; fresh tones
  coded with the audio codebook, turned back into waveforms by Griffin-Lim, scored by the
  detector. A generated image or tone can score no better than its codes allow.

    python -m omnimoe.train.media_scores [key=value ...]     # the default dataset's ceilings
"""
import json
import sys

import numpy as np

from omnimoe.data.builtin import digits as digits_lib, dtmf
from omnimoe.data.config import DataConfig
from omnimoe.data.prepare import image_io, kmeans
from omnimoe.data.prepare.log_mel import log_mel, mel_filterbank
from omnimoe.train import media_out

DIGIT_OF = {pair: d for d, pair in dtmf.KEY_HZ.items()}


def digit_images(split: str, cfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
  """(float32 [N, 8, 8, 1] in [0, 1], digits [N]) of the train or held-out split."""
  from sklearn.datasets import load_digits
  sk = load_digits()
  train, held = digits_lib.split_indices(len(sk.target), cfg.heldout_fraction)
  idx = train if split == "train" else held
  pixels = digits_lib.pixel_bytes(sk.images[idx]).astype(np.float32) / digits_lib.BYTE_MAX
  return pixels[..., None], sk.target[idx]


class DigitClassifier:
  def __init__(self, cfg: DataConfig):
    from sklearn.linear_model import LogisticRegression
    pixels, digits = digit_images("train", cfg)
    self.model = LogisticRegression(max_iter=2000).fit(pixels.reshape(len(pixels), -1), digits)

  def predict(self, pixels_NxHxWxC: np.ndarray) -> np.ndarray:
    x = np.asarray(pixels_NxHxWxC, np.float32)
    return self.model.predict(x.reshape(len(x), -1))


def _profiles(cfg: DataConfig) -> dict[float, np.ndarray]:
  """Keypad frequency -> the mel filters' response at it (unit norm)."""
  fb_BxM = mel_filterbank(cfg.sample_rate, cfg.frame_len, cfg.n_mels)
  hz = np.fft.rfftfreq(cfg.frame_len, 1.0 / cfg.sample_rate)
  rows = {f: fb_BxM[np.argmin(np.abs(hz - f))] for f in dtmf.ROW_HZ + dtmf.COL_HZ}
  return {f: r / np.linalg.norm(r) for f, r in rows.items()}


def dtmf_digit(wave: np.ndarray, cfg: DataConfig) -> int:
  power_M = media_out.mel_power(log_mel(np.asarray(wave, np.float32), cfg)).mean(0)
  profiles = _profiles(cfg)
  strength = lambda f: float(profiles[f] @ power_M)
  return DIGIT_OF.get((max(dtmf.ROW_HZ, key=strength), max(dtmf.COL_HZ, key=strength)), -1)


def image_ceiling(cfg: DataConfig, codebook: np.ndarray, classifier: DigitClassifier) -> float:
  pixels, digits = digit_images("heldout", cfg)
  drawn = []
  for p in pixels:
    codes = kmeans.assign(image_io.patchify(p, cfg.image_patch), codebook)
    drawn.append(media_out.image_pixels(codes, codebook, cfg))
  return float(np.mean(classifier.predict(np.stack(drawn)) == digits))


def audio_ceiling(cfg: DataConfig, codebook: np.ndarray, tones_per_digit: int = 10,
                  seed: int = 0) -> float:
  rng = np.random.default_rng([seed, 3])
  right = 0
  for k in range(tones_per_digit * 10):
    digit = k % 10
    codes = kmeans.assign(log_mel(dtmf.synthesize(digit, rng, cfg), cfg), codebook)
    right += dtmf_digit(media_out.audio_waveform(codes, codebook, cfg, seed), cfg) == digit
  return right / (tones_per_digit * 10)


def ceilings(cfg: DataConfig, codebooks: dict) -> dict:
  classifier = DigitClassifier(cfg)
  pixels, digits = digit_images("heldout", cfg)
  return {"classifier_on_real_heldout_digits": float(np.mean(classifier.predict(pixels) == digits)),
          "text_to_image_ceiling": image_ceiling(cfg, codebooks["image"], classifier),
          "text_to_audio_ceiling": audio_ceiling(cfg, codebooks["audio"])}


def main(argv=None) -> None:
  from omnimoe.data.pipeline import sources
  from omnimoe.train import config as config_lib
  cfg = config_lib.load(None, list(sys.argv[1:] if argv is None else argv))
  print(json.dumps(ceilings(cfg.data, sources.resolve(cfg.data).codebooks), indent=1))


if __name__ == "__main__":
  main()
