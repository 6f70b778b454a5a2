"""Log-mel frames of a waveform, in numpy: what every audio position's `features` hold.

One function for audio files (`prepare/audio_io.py`) and synthesized tones (`builtin/dtmf.py`) alike.
"""
import functools

import numpy as np

from omnimoe.data.config import DataConfig

# Log-mel: log(power + LOG_FLOOR), then (x - LOG_MEAN) / LOG_SCALE. Fixed constants (not fitted), so
# a frame's features never depend on other data (audio files are featurized with them too); chosen
# so features over tones were about N(0, 1) when tones peaked at 1 (with the headroom: mean about
# -0.7, standard deviation about 0.9).
LOG_FLOOR = 1e-6
LOG_MEAN = -9.0
LOG_SCALE = 2.0


def _hz_to_mel(hz):
  return 2595.0 * np.log10(1.0 + np.asarray(hz) / 700.0)


def _mel_to_hz(mel):
  return 700.0 * (10.0 ** (np.asarray(mel) / 2595.0) - 1.0)


@functools.lru_cache(maxsize=8)
def mel_filterbank(sample_rate: int, frame_len: int, n_mels: int) -> np.ndarray:
  """float32 [frame_len//2+1, n_mels] triangular (HTK-mel) filters, each summing to 1."""
  bin_hz = np.fft.rfftfreq(frame_len, 1.0 / sample_rate)
  edges = _mel_to_hz(np.linspace(0.0, _hz_to_mel(sample_rate / 2), n_mels + 2))
  lo, mid, hi = edges[:-2], edges[1:-1], edges[2:]
  up = (bin_hz[:, None] - lo) / (mid - lo)
  down = (hi - bin_hz[:, None]) / (hi - mid)
  weights = np.maximum(0.0, np.minimum(up, down))
  empty = weights.sum(0) == 0
  # A band narrower than the bin spacing takes the bin nearest its centre.
  weights[np.abs(bin_hz[:, None] - mid[empty]).argmin(0), np.flatnonzero(empty)] = 1.0
  return (weights / weights.sum(0)).astype(np.float32)


def log_mel(wave: np.ndarray, cfg: DataConfig) -> np.ndarray:
  """float32 [frames, n_mels] normalised log-mel of a waveform (Hann window, no padding).

  frames = 1 + (len(wave) - frame_len) // frame_hop: every whole window; the tail is dropped.
  Used for synthesized tones and for audio files (`audio_io.load_frames`) alike.
  """
  if len(wave) < cfg.frame_len:
    raise ValueError(f"a waveform of {len(wave)} samples is shorter than one frame "
                     f"(data.frame_len={cfg.frame_len})")
  frames = 1 + (len(wave) - cfg.frame_len) // cfg.frame_hop
  starts = np.arange(frames) * cfg.frame_hop
  window = np.hanning(cfg.frame_len + 1)[:-1].astype(np.float32)   # periodic Hann
  segments = wave[starts[:, None] + np.arange(cfg.frame_len)] * window
  power = np.abs(np.fft.rfft(segments, axis=-1)) ** 2 / window.sum() ** 2
  mel = power @ mel_filterbank(cfg.sample_rate, cfg.frame_len, cfg.n_mels)
  return ((np.log(mel + LOG_FLOOR) - LOG_MEAN) / LOG_SCALE).astype(np.float32)
