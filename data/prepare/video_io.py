"""Video files -> video tokens on the run's clock, and the sound track -> audio frames.

Read: animated GIF (Pillow) and MP4, WebM, AVI, MKV and MOV (PyAV, whose wheels bundle FFmpeg; no
system install). Every frame is shown from its own start time until the next one starts (a GIF
frame for its `duration`, 100 ms when the file gives none; a container's frames by their
presentation times, the first at 0). The clip is resampled to `data.video_fps`: sample k is the
frame on screen at k / video_fps seconds (the last frame that started at or before it), for k = 0,
1, ... while k / video_fps is inside the clip. **A longer clip is cut**: it keeps the samples of its
first `data.video_max_seconds` seconds (0, the default: `data.video_frames` / video_fps, 0.8 s),
at most `data.video_frames` samples when video_max_seconds is 0. Frames are converted like images
(grayscale or RGB by `data.image_channels`), resized to `data.video_side` (bicubic; a frame of that
size is untouched) and scaled to [0, 1].

Tokens: the frames are grouped in tubelets of `data.video_tubelet` (the last frame repeated to fill
the last tubelet) and cut into `data.video_patch`-sided patches; a token's vector is its patch in
each frame of the tubelet, frame-major (each frame's patch as image_io.patchify lays it out).

The sound: a WAV file given as the part's "sound" (read like any audio part, audio_io.load_frames),
else the container's own first audio track (mixed to mono, placed on the video's time origin,
resampled like a WAV's samples), else none (a clip without sound is fine; a GIF has none). Its
frames that start after the clip's last video token's time span are dropped.
"""
import pathlib

import numpy as np
from PIL import Image, ImageSequence

from omnimoe.data.config import DataConfig
from omnimoe.data.prepare import audio_io, av_io
from omnimoe.data.prepare.image_io import MediaError, PIXEL_MAX, RESAMPLE, patchify

DEFAULT_FRAME_MS = 100.0
GIF_SUFFIXES = (".gif",)
SUFFIXES = GIF_SUFFIXES + av_io.SUFFIXES


def grid(cfg: DataConfig) -> tuple[int, int]:
  side = cfg.video_side // cfg.video_patch
  return side, side


def write_gif(path: str | pathlib.Path, frames_NxHxW: np.ndarray, fps: float) -> None:
  """uint8 [frames, H, W] grayscale -> an animated GIF showing each frame 1 / fps seconds (the
  GIF stores milliseconds: 1000 / fps must be a whole number of them)."""
  frame_ms = 1000.0 / fps
  if abs(frame_ms - round(frame_ms)) > 1e-9:
    raise ValueError(f"a GIF cannot show frames for {frame_ms} ms (data.video_fps={fps})")
  images = [Image.fromarray(np.asarray(f, np.uint8), "L") for f in frames_NxHxW]
  images[0].save(path, save_all=True, append_images=images[1:], duration=int(round(frame_ms)),
                 loop=0, optimize=False, disposal=1)


def max_seconds(cfg: DataConfig) -> float:
  """How much of a clip `omnimoe prepare` keeps (module docstring)."""
  return cfg.video_max_seconds or cfg.video_frames / cfg.video_fps


def _check(path: pathlib.Path) -> None:
  if not path.is_file():
    raise MediaError("file not found")
  if path.suffix.lower() not in SUFFIXES:
    raise MediaError(f"cannot read video '{path.suffix}' files (this omnimoe reads "
                     f"{', '.join(SUFFIXES)})")


def _gif_shown(path: pathlib.Path, mode: str):
  """([frames as PIL images], [start ms], end ms) of an animated GIF."""
  shown, starts, at = [], [], 0.0
  try:
    with Image.open(path) as video:
      for frame in ImageSequence.Iterator(video):
        shown.append(frame.convert(mode))
        starts.append(at)
        at += float(frame.info.get("duration") or DEFAULT_FRAME_MS)
  except Exception as e:  # Pillow's decoders raise many types
    raise MediaError(f"cannot decode video ({type(e).__name__}: {e})") from None
  return shown, starts, at


def _av_shown(path: pathlib.Path, mode: str, cfg: DataConfig):
  """The same for a container file (av_io.frames), decoding only what the cut keeps."""
  arrays, starts_s, end_s, _ = av_io.frames(path, gray=mode == "L", until_s=max_seconds(cfg))
  return ([Image.fromarray(a, mode) for a in arrays], [1000.0 * t for t in starts_s],
          1000.0 * end_s)


def load_frames(path: str | pathlib.Path, cfg: DataConfig) -> np.ndarray:
  """float32 [frames, side, side, channels] in [0, 1] at data.video_fps (module docstring);
  raises MediaError for a missing, corrupt, unsupported or empty file."""
  path = pathlib.Path(path)
  _check(path)
  mode = "L" if cfg.image_channels == 1 else "RGB"
  if path.suffix.lower() in GIF_SUFFIXES:
    shown, starts, end = _gif_shown(path, mode)
  else:
    shown, starts, end = _av_shown(path, mode, cfg)
  if not shown:
    raise MediaError("video has no frames")
  step_ms = 1000.0 / cfg.video_fps
  count = (int(np.ceil(np.round(max_seconds(cfg) * 1000.0 / step_ms, 9)))   # k / fps < max
           if cfg.video_max_seconds else cfg.video_frames)
  times = np.arange(count) * step_ms
  times = times[times < end - 1e-9]
  pick = np.searchsorted(np.asarray(starts), times + 1e-9, side="right") - 1
  frames = []
  for i in pick:
    image = shown[i]
    if image.size != (cfg.video_side, cfg.video_side):
      image = image.resize((cfg.video_side, cfg.video_side), RESAMPLE)
    frames.append(np.asarray(image, np.float32) / PIXEL_MAX)
  return np.stack(frames).reshape(len(frames), cfg.video_side, cfg.video_side, cfg.image_channels)


def tokens(frames_NxHxWxC: np.ndarray, cfg: DataConfig) -> np.ndarray:
  """float32 [U, rows*cols, tubelet*patch*patch*channels]: tubelets of patches (module docstring)."""
  n = len(frames_NxHxWxC)
  pad = -n % cfg.video_tubelet
  frames = np.concatenate([frames_NxHxWxC, np.repeat(frames_NxHxWxC[-1:], pad, axis=0)])
  per_frame = np.stack([patchify(f, cfg.video_patch) for f in frames])      # [N', M, p*p*C]
  U = len(frames) // cfg.video_tubelet
  x = per_frame.reshape(U, cfg.video_tubelet, *per_frame.shape[1:]).swapaxes(1, 2)
  return np.ascontiguousarray(x.reshape(U, per_frame.shape[1], -1), np.float32)


def sound_frames(path: str | pathlib.Path, num_units: int, cfg: DataConfig) -> np.ndarray:
  """float32 [A, n_mels]: the sound's log-mel frames that start within the clip's time span."""
  return cut_sound(audio_io.load_frames(path, cfg), num_units, cfg)


def own_sound_frames(path: str | pathlib.Path, num_units: int, cfg: DataConfig) -> np.ndarray:
  """float32 [A, n_mels]: a container file's own sound track, cut like `sound_frames` ([0, n_mels]
  for a GIF or a file without sound)."""
  path = pathlib.Path(path)
  none = np.zeros((0, cfg.n_mels), np.float32)
  if path.suffix.lower() in GIF_SUFFIXES:
    return none
  _, _, _, origin = av_io.frames(path, gray=True, until_s=0.0)
  span_s = num_units * cfg.video_tubelet / cfg.video_fps
  track = av_io.sound(path, origin, until_s=span_s + 1.0)   # a long file: its clip's span only
  if track is None:
    return none
  samples, rate = track
  if len(samples) * cfg.sample_rate < cfg.frame_len * rate:
    return none                        # shorter than one frame: no sound in the clip's span
  return cut_sound(audio_io.frames(samples, rate, cfg), num_units, cfg)


def cut_sound(frames: np.ndarray, num_units: int, cfg: DataConfig) -> np.ndarray:
  """The log-mel frames that start within the time span of `num_units` video tokens."""
  span_ms = num_units * cfg.video_tubelet * 1000.0 / cfg.video_fps
  starts_ms = np.arange(len(frames)) * (1000.0 * cfg.frame_hop / cfg.sample_rate)
  return np.ascontiguousarray(frames[starts_ms < span_ms - 1e-9], np.float32)
