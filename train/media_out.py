"""Generated codes back to media files: image codes -> codebook centroid patches -> pixels -> PNG;
audio codes -> centroid log-mel frames -> waveform -> WAV; a clip's video codes -> centroid tubelets
-> frames -> animated GIF (its audio codes -> WAV).

The waveform is recovered in two steps: the mel power of each frame is mapped back to a linear
power spectrum by non-negative least squares against the run's own mel filterbank
(data/prepare/log_mel.py), then phases are estimated by Griffin-Lim — librosa's
(`librosa.util.nnls`, `librosa.griffinlim`), with the STFT the features were made with (periodic
Hann window of `data.frame_len` samples, hop `data.frame_hop`, no centring). librosa is imported
here only, when a sound is written.
"""
import pathlib

import numpy as np
from PIL import Image

from omnimoe.data.builtin.demo_files import write_wav
from omnimoe.data.config import DataConfig
from omnimoe.data.prepare import image_io, log_mel, video_io

GRIFFIN_LIM_ITERS = 64


def image_pixels(codes: np.ndarray, codebook_KxD: np.ndarray, cfg: DataConfig) -> np.ndarray:
  """float32 [side, side, channels] in [0, 1]: the centroid patches of `codes` (one grid)."""
  patches_MxD = np.asarray(codebook_KxD, np.float32)[np.asarray(codes)]
  pixels = image_io.unpatchify(patches_MxD, image_io.grid(cfg), cfg.image_patch)
  return np.clip(pixels, 0.0, 1.0)


def write_png(path, pixels_HxWxC: np.ndarray, scale: int = 1) -> pathlib.Path:
  """An image in [0, 1] as an 8-bit PNG, each pixel repeated `scale` x `scale` times."""
  x = np.repeat(np.repeat(pixels_HxWxC, scale, axis=0), scale, axis=1)
  x = np.rint(x * 255).astype(np.uint8)
  Image.fromarray(x[..., 0] if x.shape[-1] == 1 else x).save(path)
  return pathlib.Path(path)


def video_frames(codes: np.ndarray, codebook_KxD: np.ndarray, cfg: DataConfig) -> np.ndarray:
  """float32 [frames, side, side, channels] in [0, 1]: a clip's video codes (token-major, each
  token's patches row-major, as data/video_layout.py orders them) drawn back from the centroids;
  a token's vector is its patch in each frame of its tubelet, frame-major (data/prepare/video_io)."""
  grid = video_io.grid(cfg)
  M = grid[0] * grid[1]
  book = np.asarray(codebook_KxD, np.float32)
  x = book[np.asarray(codes)].reshape(-1, M, cfg.video_tubelet, book.shape[1] // cfg.video_tubelet)
  frames = [image_io.unpatchify(x[u, :, f], grid, cfg.video_patch)
            for u in range(x.shape[0]) for f in range(cfg.video_tubelet)]
  return np.clip(np.stack(frames)[:cfg.video_frames], 0.0, 1.0)


def write_gif(path, frames_NxHxWxC: np.ndarray, cfg: DataConfig, scale: int = 1) -> pathlib.Path:
  """Frames in [0, 1] as an 8-bit animated GIF at `data.video_fps` (grayscale or RGB), looping."""
  x = np.repeat(np.repeat(frames_NxHxWxC, scale, axis=1), scale, axis=2)
  x = np.rint(x * 255).astype(np.uint8)
  images = [Image.fromarray(f[..., 0] if f.shape[-1] == 1 else f) for f in x]
  images[0].save(path, save_all=True, append_images=images[1:], loop=0,
                 duration=int(round(1000.0 / cfg.video_fps)))
  return pathlib.Path(path)


def mel_power(frames_NxM: np.ndarray) -> np.ndarray:
  """The mel power of normalised log-mel frames (the inverse of log_mel's last line)."""
  x = np.asarray(frames_NxM, np.float64) * log_mel.LOG_SCALE + log_mel.LOG_MEAN
  return np.maximum(np.exp(x) - log_mel.LOG_FLOOR, 0.0)


def waveform(frames_NxM: np.ndarray, cfg: DataConfig, seed: int = 0) -> np.ndarray:
  """float32 [samples] in [-1, 1]: a waveform whose log-mel frames approximate `frames_NxM`."""
  import librosa
  fb_BxM = log_mel.mel_filterbank(cfg.sample_rate, cfg.frame_len, cfg.n_mels).astype(np.float64)
  window = np.hanning(cfg.frame_len + 1)[:-1]
  power_BxN = librosa.util.nnls(fb_BxM.T, mel_power(frames_NxM).T)   # mel = power @ fb
  magnitude_BxN = np.sqrt(np.maximum(power_BxN, 0.0)) * window.sum()
  n = len(frames_NxM)
  wave = librosa.griffinlim(magnitude_BxN, n_iter=GRIFFIN_LIM_ITERS, hop_length=cfg.frame_hop,
                            win_length=cfg.frame_len, n_fft=cfg.frame_len, window="hann",
                            center=False, length=cfg.frame_len + (n - 1) * cfg.frame_hop,
                            random_state=seed)
  return np.clip(wave, -1.0, 1.0).astype(np.float32)


def audio_waveform(codes: np.ndarray, codebook_KxD: np.ndarray, cfg: DataConfig,
                   seed: int = 0) -> np.ndarray:
  return waveform(np.asarray(codebook_KxD, np.float32)[np.asarray(codes)], cfg, seed)


def write_audio(path, wave: np.ndarray, cfg: DataConfig) -> pathlib.Path:
  write_wav(path, wave, cfg.sample_rate)
  return pathlib.Path(path)
