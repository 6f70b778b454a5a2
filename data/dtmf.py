"""Synthesized telephone-keypad (DTMF) tones and their log-mel frames, all in numpy.

A key's tone is the sum of one low "row" and one high "column" sinusoid (ITU-T Q.23). Each drawn
tone gets a random amplitude, +-1.5% frequency jitter per component, random phases and Gaussian
noise at about 10 dB SNR.

A tone is what a 16-bit recording of it holds: samples on the 16-bit PCM grid (k / 32768), with
headroom (the clean tone peaks at its amplitude, at most 0.5; the noise adds less than 0.4 more),
so a 16-bit WAV of it (data/default_manifest.py) stores it exactly, never clipped, and the file's
log-mel frames equal the embedded dataset's bit for bit.
"""
import functools

import numpy as np

from data.config import DataConfig

ROW_HZ = (697.0, 770.0, 852.0, 941.0)
COL_HZ = (1209.0, 1336.0, 1477.0)
# digit -> (row frequency, column frequency) on the 4x3 keypad "123 / 456 / 789 / *0#".
KEY_HZ = {d: (ROW_HZ[(d - 1) // 3], COL_HZ[(d - 1) % 3]) for d in range(1, 10)}
KEY_HZ[0] = (ROW_HZ[3], COL_HZ[1])

JITTER = 0.015              # relative frequency jitter (uniform, each component)
SNR_DB = 10.0               # signal-to-noise ratio of the added Gaussian noise
PCM_SCALE = 32768.0         # samples are k / PCM_SCALE (16-bit PCM)
AMPLITUDE = (0.15, 0.5)     # peak amplitude range of the clean tone (headroom: see above)

# Log-mel: log(power + LOG_FLOOR), then (x - LOG_MEAN) / LOG_SCALE. Fixed constants (not fitted), so
# a frame's features never depend on other data (audio files are featurized with them too); chosen
# so features over tones were about N(0, 1) when tones peaked at 1 (with the headroom: mean about
# -0.7, standard deviation about 0.9).
LOG_FLOOR = 1e-6
LOG_MEAN = -9.0
LOG_SCALE = 2.0


def num_samples(cfg: DataConfig) -> int:
  return int(round(cfg.tone_seconds * cfg.sample_rate))


def num_frames(cfg: DataConfig) -> int:
  """Frames per tone (the same for every tone: the duration is fixed)."""
  n = num_samples(cfg)
  if n < cfg.frame_len:
    raise ValueError(f"data.tone_seconds={cfg.tone_seconds} is shorter than one frame "
                     f"(data.frame_len={cfg.frame_len} samples at {cfg.sample_rate} Hz)")
  return 1 + (n - cfg.frame_len) // cfg.frame_hop


def synthesize(digit: int, rng: np.random.Generator, cfg: DataConfig) -> np.ndarray:
  """float32 [samples] waveform of one noisy, jittered DTMF tone for `digit`, on the 16-bit grid."""
  t = np.arange(num_samples(cfg)) / cfg.sample_rate
  amplitude = rng.uniform(*AMPLITUDE)
  freqs = np.asarray(KEY_HZ[int(digit)]) * (1.0 + rng.uniform(-JITTER, JITTER, size=2))
  phases = rng.uniform(0.0, 2 * np.pi, size=2)
  clean = 0.5 * amplitude * np.sin(2 * np.pi * freqs[:, None] * t + phases[:, None]).sum(0)
  noise_std = np.sqrt((amplitude ** 2 / 4) / 10 ** (SNR_DB / 10))   # clean power = a^2 / 4
  wave = clean + noise_std * rng.standard_normal(t.shape)
  return (np.rint(wave * PCM_SCALE) / PCM_SCALE).astype(np.float32)


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
  Used for synthesized tones and for audio files (`data.audio_io`) alike.
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


def tone_features(digit: int, rng: np.random.Generator, cfg: DataConfig) -> np.ndarray:
  """float32 [frames, n_mels] for one freshly drawn tone."""
  return log_mel(synthesize(digit, rng, cfg), cfg)
