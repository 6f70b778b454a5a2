"""Codes back to media (train/media_out.py): pixels through the codebook and unpatchify, and the
waveform a tone's log-mel frames are turned back into (librosa's Griffin-Lim) keeps the tone: its
log-mel frames come back close and its two strongest mel bands are the original's."""
import numpy as np
from PIL import Image

from omnimoe.data.builtin import dtmf
from omnimoe.data.config import DataConfig
from omnimoe.data.prepare import image_io
from omnimoe.data.prepare.log_mel import log_mel
from omnimoe.train import media_out

CFG = DataConfig()


def test_image_codes_give_the_pixels_of_their_centroids(tmp_path):
  pixels = np.random.default_rng(0).uniform(size=(8, 8, 1)).astype(np.float32)
  patches = image_io.patchify(pixels, CFG.image_patch)            # [4, 16]
  codebook = np.concatenate([np.zeros((3, 16), np.float32), patches[::-1]])   # codes 3..6 reversed
  got = media_out.image_pixels(np.asarray([6, 5, 4, 3]), codebook, CFG)
  np.testing.assert_allclose(got, pixels, atol=1e-7)
  path = media_out.write_png(tmp_path / "x.png", got, scale=2)
  back = np.asarray(Image.open(path), np.float32) / 255
  assert back.shape == (16, 16)
  np.testing.assert_allclose(back[::2, ::2], pixels[..., 0], atol=1 / 255)


def test_a_tone_survives_log_mel_and_back():
  digit = 7
  wave = dtmf.synthesize(digit, np.random.default_rng(1), CFG)
  frames = log_mel(wave, CFG)
  back = media_out.waveform(frames, CFG)
  assert len(back) >= len(wave) - CFG.frame_hop and np.abs(back).max() <= 1.0
  again = log_mel(back, CFG)
  n = min(len(frames), len(again))
  loud = frames[:n] > np.percentile(frames[:n], 80)                # the tone's bands
  assert np.abs(again[:n][loud] - frames[:n][loud]).mean() < 0.25  # log-mel units (~N(0, 1))
  # The tone's two strongest mel bands (the DTMF pair) are those of the original frames.
  assert set(np.argsort(again.mean(0))[-2:]) == set(np.argsort(frames.mean(0))[-2:])
