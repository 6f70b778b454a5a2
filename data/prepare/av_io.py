"""Video container files (MP4, WebM, AVI, MKV, MOV) through PyAV, whose wheels bundle FFmpeg: the
frames on screen with their times, and the file's own sound track as mono samples.

Times are seconds from the first video frame: a frame's time is its presentation time minus the
first frame's, and the sound track is placed on the same origin (samples before the first frame are
dropped; a track that starts later is preceded by silence), so picture and sound keep the offset
the file gives them. Decoding stops at the first frame past `until_s`: a long file is not read to
its end.
"""
import pathlib

import numpy as np

from omnimoe.data.prepare.image_io import MediaError

SUFFIXES = (".mp4", ".webm", ".avi", ".mkv", ".mov")


def _open(path: pathlib.Path):
  import av
  try:
    return av.open(str(path))
  except Exception as e:   # av.error.* for a file FFmpeg cannot open or probe
    raise MediaError(f"cannot decode video ({type(e).__name__}: {e})") from None


def _seconds(frame, stream) -> float | None:
  if frame.pts is None:
    return None
  return float(frame.pts * stream.time_base)


def frames(path: pathlib.Path, *, gray: bool, until_s: float):
  """([uint8 [H, W] or [H, W, 3] frames], [start seconds], end seconds of the last frame, origin
  seconds): the frames shown up to `until_s` after the first one. Raises MediaError."""
  fmt = "gray" if gray else "rgb24"
  shown, starts = [], []
  with _open(path) as container:
    if not container.streams.video:
      raise MediaError("the file has no video stream")
    stream = container.streams.video[0]
    rate = float(stream.average_rate or stream.guessed_rate or 0) or None
    origin = None
    try:
      for frame in container.decode(stream):
        at = _seconds(frame, stream)
        at = (len(starts) / rate if rate else 0.0) if at is None else at
        if origin is None:
          origin = at
        if at - origin > until_s + 1e-9:
          break
        shown.append(frame.to_ndarray(format=fmt))
        starts.append(at - origin)
    except Exception as e:   # a corrupt stream fails in the middle of decoding
      raise MediaError(f"cannot decode video ({type(e).__name__}: {e})") from None
  if not shown:
    raise MediaError("video has no frames")
  step = (1.0 / rate) if rate else (starts[-1] - starts[-2] if len(starts) > 1 else 0.1)
  return shown, starts, starts[-1] + step, origin


def sound(path: pathlib.Path, origin_s: float, until_s: float):
  """(float32 mono samples from `origin_s` to at least `origin_s + until_s`, their rate) of the
  file's first audio stream, or None when it has none. Channels are averaged, as a WAV's are."""
  with _open(path) as container:
    if not container.streams.audio:
      return None
    stream = container.streams.audio[0]
    pieces, first, rate = [], None, None
    try:
      for frame in container.decode(stream):
        raw = frame.to_ndarray()      # planar: [channels, n]; packed: [1, n * channels]
        x = raw.astype(np.float32)
        if np.issubdtype(raw.dtype, np.integer):
          x /= float(np.iinfo(raw.dtype).max) + 1.0
        planar = frame.format.is_planar
        channels = len(frame.layout.channels)
        x = x.reshape(channels, -1) if planar else x.reshape(-1, channels).T
        pieces.append(x.mean(axis=0))
        rate = frame.sample_rate
        if first is None:
          first = _seconds(frame, stream) or 0.0
        if first + sum(map(len, pieces)) / rate > origin_s + until_s:
          break
    except Exception as e:
      raise MediaError(f"cannot decode the sound track ({type(e).__name__}: {e})") from None
  if not pieces:
    return None
  samples = np.concatenate(pieces)
  shift = int(round((first - origin_s) * rate))     # > 0: the track starts after the first frame
  samples = (np.concatenate([np.zeros(shift, np.float32), samples]) if shift >= 0
             else samples[-shift:])
  return samples.astype(np.float32), int(rate)
