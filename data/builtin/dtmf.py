"""Synthesized telephone-keypad (DTMF) tones, in numpy; their frames are `prepare.log_mel`'s.

A key's tone is the sum of one low "row" and one high "column" sinusoid (ITU-T Q.23). Each drawn
tone gets a random amplitude, +-1.5% frequency jitter per component, random phases and Gaussian
noise at about 10 dB SNR.

A tone is what a 16-bit recording of it holds: samples on the 16-bit PCM grid (k / 32768), with
headroom (the clean tone peaks at its amplitude, at most 0.5; the noise adds less than 0.4 more),
so a 16-bit WAV of it (data/builtin/files.py) stores it exactly, never clipped, and the file's
log-mel frames equal those of the synthesized waveform bit for bit.
"""
import numpy as np

from omnimoe.data.config import DataConfig

ROW_HZ = (697.0, 770.0, 852.0, 941.0)
COL_HZ = (1209.0, 1336.0, 1477.0)
# digit -> (row frequency, column frequency) on the 4x3 keypad "123 / 456 / 789 / *0#".
KEY_HZ = {d: (ROW_HZ[(d - 1) // 3], COL_HZ[(d - 1) % 3]) for d in range(1, 10)}
KEY_HZ[0] = (ROW_HZ[3], COL_HZ[1])

JITTER = 0.015              # relative frequency jitter (uniform, each component)
SNR_DB = 10.0               # signal-to-noise ratio of the added Gaussian noise
PCM_SCALE = 32768.0         # samples are k / PCM_SCALE (16-bit PCM)
AMPLITUDE = (0.15, 0.5)     # peak amplitude range of the clean tone (headroom: see above)


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
