"""DTMF tones: the spectrum peaks at the keypad frequencies; log-mel frames have a fixed count and
O(1) values."""
import numpy as np
import pytest

from omnimoe.data.builtin import dtmf
from omnimoe.data.prepare import log_mel as log_mel_lib
from omnimoe.data.config import DataConfig

CFG = DataConfig()


def test_keypad_table():
  assert dtmf.KEY_HZ[1] == (697.0, 1209.0)
  assert dtmf.KEY_HZ[5] == (770.0, 1336.0)
  assert dtmf.KEY_HZ[9] == (852.0, 1477.0)
  assert dtmf.KEY_HZ[0] == (941.0, 1336.0)
  assert len(set(dtmf.KEY_HZ.values())) == 10


@pytest.mark.parametrize("digit", range(10))
def test_spectrum_peaks_at_key_frequencies(digit):
  rng = np.random.default_rng(digit)
  wave = dtmf.synthesize(digit, rng, CFG)
  assert wave.shape == (dtmf.num_samples(CFG),) and wave.dtype == np.float32
  spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
  freqs = np.fft.rfftfreq(len(wave), 1.0 / CFG.sample_rate)
  low_band, high_band = freqs < 1100, freqs >= 1100
  low_peak = freqs[low_band][spectrum[low_band].argmax()]
  high_peak = freqs[high_band][spectrum[high_band].argmax()]
  row_hz, col_hz = dtmf.KEY_HZ[digit]
  resolution = CFG.sample_rate / len(wave)   # 5 Hz
  assert abs(low_peak - row_hz) <= dtmf.JITTER * row_hz + resolution
  assert abs(high_peak - col_hz) <= dtmf.JITTER * col_hz + resolution
  # The peaks stand well above the noise floor (10 dB SNR spread over the whole band).
  assert spectrum.max() > 10 * np.median(spectrum)


def test_tones_differ_per_draw_and_repeat_per_seed():
  a = dtmf.synthesize(3, np.random.default_rng(0), CFG)
  b = dtmf.synthesize(3, np.random.default_rng(0), CFG)
  c = dtmf.synthesize(3, np.random.default_rng(1), CFG)
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)


def test_tones_are_on_the_16_bit_grid_with_headroom():
  """A tone is what a 16-bit WAV stores exactly: samples k / 32768, far from full scale."""
  rng = np.random.default_rng(0)
  waves = np.stack([dtmf.synthesize(d % 10, rng, CFG) for d in range(1000)]).astype(np.float64)
  ints = waves * 32768
  np.testing.assert_array_equal(ints, np.rint(ints))
  assert np.abs(waves).max() < 0.9
  assert np.abs(waves).max(1).min() > 0.1   # and not silent: the quietest tone peaks above 0.1


def test_log_mel_shape_and_scale():
  assert dtmf.num_frames(CFG) == 1 + (1600 - 256) // 128
  rng = np.random.default_rng(0)
  frames = np.stack([log_mel_lib.log_mel(dtmf.synthesize(d % 10, rng, CFG), CFG) for d in range(100)])
  assert frames.shape == (100, dtmf.num_frames(CFG), CFG.n_mels)
  assert frames.dtype == np.float32
  assert abs(frames.mean()) < 1.0 and 0.3 < frames.std() < 2.0
  assert np.abs(frames).max() < 6.0


def test_log_mel_peak_band_matches_tone():
  """The loudest mel band of a clean tone contains the (high) column frequency of its key."""
  edges = log_mel_lib._mel_to_hz(np.linspace(0, log_mel_lib._hz_to_mel(CFG.sample_rate / 2), CFG.n_mels + 2))
  for digit in range(10):
    t = np.arange(dtmf.num_samples(CFG)) / CFG.sample_rate
    col_hz = dtmf.KEY_HZ[digit][1]
    frames = log_mel_lib.log_mel(np.sin(2 * np.pi * col_hz * t).astype(np.float32), CFG)
    band = frames.mean(0).argmax()
    assert edges[band] <= col_hz <= edges[band + 2]


def test_filterbank_has_no_empty_band():
  for n_mels in (24, 40, 80):
    bank = log_mel_lib.mel_filterbank(CFG.sample_rate, CFG.frame_len, n_mels)
    np.testing.assert_allclose(bank.sum(0), 1.0, rtol=1e-5)


def test_too_short_tone_is_refused():
  with pytest.raises(ValueError, match="tone_seconds"):
    dtmf.num_frames(DataConfig(tone_seconds=0.01))
