"""The scorers of generated media (train/media_scores.py) on real media whose digit is known (the
oracle): the classifier on held-out digits, the DTMF detector on fresh tones and on the waveforms
Griffin-Lim recovers from their log-mel frames; and a ceiling through a codebook of the exact
patches is the classifier's own accuracy."""
import numpy as np

from omnimoe.data.builtin import dtmf
from omnimoe.data.config import DataConfig
from omnimoe.data.prepare import image_io
from omnimoe.data.prepare.log_mel import log_mel
from omnimoe.train import media_out, media_scores

CFG = DataConfig()


def test_digit_classifier_and_an_exact_codebook_ceiling():
  classifier = media_scores.DigitClassifier(CFG)
  pixels, digits = media_scores.digit_images("heldout", CFG)
  accuracy = float(np.mean(classifier.predict(pixels) == digits))
  assert accuracy > 0.93
  # A codebook holding every held-out patch exactly: its ceiling is the classifier's accuracy.
  book = np.unique(np.concatenate([image_io.patchify(p, CFG.image_patch) for p in pixels]), axis=0)
  assert media_scores.image_ceiling(CFG, book, classifier) == accuracy
  # A one-code codebook draws every digit alike: about chance.
  assert media_scores.image_ceiling(CFG, book[:1], classifier) < 0.2


def test_dtmf_detector_hears_fresh_tones_and_their_reconstructions():
  rng = np.random.default_rng(11)
  for digit in range(10):
    wave = dtmf.synthesize(digit, rng, CFG)
    assert media_scores.dtmf_digit(wave, CFG) == digit
    assert media_scores.dtmf_digit(media_out.waveform(log_mel(wave, CFG), CFG), CFG) == digit
