"""WAV files -> log-mel frames: decode (stdlib `wave`), mix to mono, resample, log-mel.

- PCM WAV only (what the stdlib reads): 8-bit unsigned, 16-, 24- or 32-bit signed, any number of
  channels, averaged to mono, scaled to [-1, 1).
- Resampling to `data.sample_rate` is band-limited interpolation in numpy: each output sample is a
  Hann-windowed sinc sum over the input, with the cut-off at the lower of the two Nyquist
  frequencies (so downsampling does not alias), SINC_ZEROS zero crossings each side.
- Frames are `log_mel.log_mel`, the code the default dataset's tones use.
"""
import pathlib
import wave

import numpy as np

from omnimoe.data.prepare.log_mel import log_mel
from omnimoe.data.config import DataConfig
from omnimoe.data.prepare.image_io import MediaError

SINC_ZEROS = 16             # zero crossings of the interpolation kernel kept on each side
CHUNK = 4096                # output samples computed per vectorized block (bounds memory)


def read_wav(path: str | pathlib.Path) -> tuple[np.ndarray, int]:
  """(float32 [samples] mono in [-1, 1), sample rate); raises MediaError for a bad file."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise MediaError("file not found")
  try:
    with wave.open(str(path), "rb") as w:
      channels, width, rate, frames = (w.getnchannels(), w.getsampwidth(), w.getframerate(),
                                       w.getnframes())
      raw = w.readframes(frames)
  except (wave.Error, EOFError, OSError) as e:
    raise MediaError(f"unreadable WAV ({e or type(e).__name__}); only PCM WAV is read") from None
  if width not in (1, 2, 3, 4):
    raise MediaError(f"unreadable WAV ({8 * width}-bit samples)")
  if rate <= 0 or channels <= 0:
    raise MediaError(f"unreadable WAV (sample rate {rate}, {channels} channels)")
  if len(raw) < frames * channels * width:
    raise MediaError(f"WAV data is truncated (header says {frames} frames, file holds "
                     f"{len(raw) // (channels * width)})")
  return _decode_pcm(raw, width).reshape(-1, channels).mean(axis=1, dtype=np.float64).astype(
      np.float32), rate


def _decode_pcm(raw: bytes, width: int) -> np.ndarray:
  """Little-endian PCM bytes -> float64 samples in [-1, 1)."""
  if width == 1:                                   # 8-bit WAV is unsigned
    return (np.frombuffer(raw, np.uint8).astype(np.float64) - 128.0) / 128.0
  if width == 3:                                   # 24-bit: sign-extend 3 bytes into int32
    b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
    x = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
    x = np.where(x >= 1 << 23, x - (1 << 24), x)
    return x / float(1 << 23)
  dtype = {2: "<i2", 4: "<i4"}[width]
  return np.frombuffer(raw, dtype).astype(np.float64) / float(1 << (8 * width - 1))


def resample(x: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
  """float32 [len(x) * rate_out // rate_in]: `x` band-limited and resampled (identity if equal)."""
  x = np.asarray(x, np.float64)
  if rate_in == rate_out:
    return x.astype(np.float32)
  n_out = len(x) * rate_out // rate_in
  cutoff = min(1.0, rate_out / rate_in)          # pass band, as a fraction of the input Nyquist
  half = int(np.ceil(SINC_ZEROS / cutoff))       # kernel half-width in input samples
  taps = np.arange(-half, half + 1)
  out = np.empty(n_out, np.float64)
  padded = np.concatenate([np.zeros(half + 1), x, np.zeros(half + 1)])
  for start in range(0, n_out, CHUNK):
    t_T = np.arange(start, min(start + CHUNK, n_out)) * (rate_in / rate_out)  # input-time of outputs
    base_T = np.floor(t_T).astype(np.int64)
    k_TxK = base_T[:, None] + taps[None, :]                                   # input samples used
    d_TxK = t_T[:, None] - k_TxK
    kernel = cutoff * np.sinc(cutoff * d_TxK) * 0.5 * (1.0 + np.cos(np.pi * np.clip(d_TxK / half, -1, 1)))
    out[start:start + len(t_T)] = (padded[k_TxK + half + 1] * kernel).sum(axis=1)
  return out.astype(np.float32)


def frames(samples: np.ndarray, rate: int, cfg: DataConfig) -> np.ndarray:
  """float32 [frames, n_mels]: mono samples in [-1, 1) at `rate` Hz, resampled to
  `data.sample_rate`, as log-mel frames. What every audio file goes through once decoded."""
  wave_ = resample(samples, rate, cfg.sample_rate)
  if len(wave_) < cfg.frame_len:
    raise MediaError(f"audio too short: {len(wave_)} samples at {cfg.sample_rate} Hz, one frame "
                     f"is data.frame_len={cfg.frame_len}")
  return log_mel(wave_, cfg)


def load_frames(path: str | pathlib.Path, cfg: DataConfig) -> np.ndarray:
  """float32 [frames, n_mels]: the log-mel frames of one WAV file at `data.sample_rate`."""
  return frames(*read_wav(path), cfg)
