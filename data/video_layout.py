"""A clip in a row: its video tokens and its audio frames on one clock, interleaved in chunks.

The clock: t counts steps of `data.time_step_ms` from the start of the clip. A video token (a frame,
or a tubelet of `data.video_tubelet` frames) at time u * unit_ms (unit_ms = tubelet * 1000 /
video_fps) has t = floor(u * unit_ms / time_step_ms); an audio frame (log-mel frame j starts at
j * hop_ms, hop_ms = frame_hop * 1000 / sample_rate) has t = floor(j * hop_ms / time_step_ms). So a
frame and the audio frames heard during it share t: multimodal RoPE sees them at the same moment.

Positions (t, h, w), relative to the running index s where the clip starts:
- video patch (r, c) of token u: (s + t_u, s + r, s + c)   (like an image's, with t moving on);
- audio frame j: (s + t_j, s + t_j, s + t_j)                (audio's own rule, t from the clock);
  with `data.audio_time_ids=decoupled` (the ablation) t_j + d instead, where the offset d is drawn
  per clip from its codes (`decoupling_offset`), uniform in [0, 2 T) for an audio track of T ticks:
  the audio keeps its own timing, but where it sits against the video's clock says nothing; the
  order of tokens does not change.
- afterwards the running index continues at s + 1 + the largest position component of the clip.

The order: the clip is cut into chunks of `data.video_chunk_ms`; chunk k holds the video tokens
whose time lies in [k * chunk_ms, (k + 1) * chunk_ms) (patches row-major), then the audio frames
whose start lies there. docs/video.md has a worked example.
"""
import math
import zlib
from typing import NamedTuple

import numpy as np

from omnimoe.data.examples import Media, pad_features
from omnimoe.model.modality import AUDIO, VIDEO

AUDIO_TIME_IDS = ("shared", "decoupled")


class Clock(NamedTuple):
  unit_ms: float              # time between consecutive video tokens
  audio_hop_ms: float         # time between consecutive audio frames
  step_ms: float              # one step of t
  chunk_ms: float             # the interleaving chunk
  decoupled: bool = False     # audio t = the clock's + a per-clip offset (the ablation)

  @classmethod
  def from_config(cls, cfg) -> "Clock":
    return cls(1000.0 * cfg.video_tubelet / cfg.video_fps, 1000.0 * cfg.frame_hop / cfg.sample_rate,
               float(cfg.time_step_ms), float(cfg.video_chunk_ms),
               cfg.audio_time_ids == "decoupled")


def config_problems(cfg) -> list[tuple[str, str]]:
  """(key, problem) for every video setting that cannot work (empty when all is well)."""
  out = []
  for key in ("video_codebook", "video_side", "video_patch", "video_frames"):
    if getattr(cfg, key) <= 0:
      out.append((f"data.{key}", f"must be positive, got {getattr(cfg, key)}"))
  if cfg.video_patch > 0 and cfg.video_side % cfg.video_patch:
    out.append(("data.video_patch", f"must divide data.video_side={cfg.video_side}, got "
                                    f"{cfg.video_patch}"))
  if cfg.video_tubelet not in (1, 2):
    out.append(("data.video_tubelet", f"must be 1 or 2 frames, got {cfg.video_tubelet}"))
  for key in ("video_fps", "time_step_ms", "video_chunk_ms"):
    value = getattr(cfg, key)
    if not (math.isfinite(value) and value > 0):
      out.append((f"data.{key}", f"must be a positive number, got {value}"))
  if not (math.isfinite(cfg.video_max_seconds) and cfg.video_max_seconds >= 0):
    out.append(("data.video_max_seconds", f"must be >= 0, got {cfg.video_max_seconds}"))
  if cfg.audio_time_ids not in AUDIO_TIME_IDS:
    out.append(("data.audio_time_ids", f"must be one of {', '.join(AUDIO_TIME_IDS)}, got "
                                       f"{cfg.audio_time_ids!r}"))
  if not cfg.weight_video >= 0:
    out.append(("data.weight_video", f"must be >= 0, got {cfg.weight_video}"))
  return out


def ticks(times_ms: np.ndarray, step_ms: float) -> np.ndarray:
  """int32 floor(time / step), robust to float rounding (300 / 100 is 3, never 2.999...)."""
  return np.floor(np.round(np.asarray(times_ms, np.float64) / step_ms, 9)).astype(np.int32)


def clip_order(num_units: int, tokens_per_unit: int, num_audio: int,
               clock: Clock) -> list[tuple[str, int]]:
  """The clip's tokens in row order: ("video", u) once per patch of token u, ("audio", j)."""
  unit_chunk = ticks(np.arange(num_units) * clock.unit_ms, clock.chunk_ms)
  audio_chunk = ticks(np.arange(num_audio) * clock.audio_hop_ms, clock.chunk_ms)
  last = max([-1, *unit_chunk.tolist(), *audio_chunk.tolist()])
  order = []
  for k in range(last + 1):
    order += [("video", int(u)) for u in np.flatnonzero(unit_chunk == k)
              for _ in range(tokens_per_unit)]
    order += [("audio", int(j)) for j in np.flatnonzero(audio_chunk == k)]
  return order


def decoupling_offset(video_ids: np.ndarray, audio_ids: np.ndarray, ticks_: int) -> int:
  """The ablation's offset of a clip's audio clock: uniform in [0, 2 * ticks_), drawn from a hash
  of the clip's codes, so the same clip always gets the same one and clips differ."""
  key = zlib.crc32(np.ascontiguousarray(video_ids, np.int64).tobytes()
                   + np.ascontiguousarray(audio_ids, np.int64).tobytes())
  return int(np.random.default_rng(key).integers(2 * ticks_))


def clip_media(video_ids_UxM: np.ndarray, video_UxMxD: np.ndarray, grid: tuple[int, int],
               audio_ids_A: np.ndarray, audio_AxD: np.ndarray, clock: Clock,
               feature_dim: int) -> Media:
  """A clip (U video tokens of rows*cols patches each, A audio frames) as one Media part whose
  positions start at running index 0 (see the module docstring)."""
  U, M = video_ids_UxM.shape[:2]
  rows, cols = grid
  if M != rows * cols:
    raise ValueError(f"a video token has {M} patches; the grid {rows}x{cols} needs {rows * cols}")
  A = len(audio_ids_A)
  t_unit = ticks(np.arange(U) * clock.unit_ms, clock.step_ms)
  t_audio = ticks(np.arange(A) * clock.audio_hop_ms, clock.step_ms)
  if clock.decoupled and A:
    t_audio = t_audio + decoupling_offset(video_ids_UxM, audio_ids_A, int(t_audio[-1]) + 1)
  r, c = np.divmod(np.arange(M), cols)
  ids, feats, mods, pos = [], [], [], []
  patch = {}
  for kind, i in clip_order(U, M, A, clock):
    if kind == "video":
      m = patch.get(i, 0)
      patch[i] = m + 1
      ids.append(video_ids_UxM[i, m])
      feats.append(pad_features(video_UxMxD[i, m][None], feature_dim)[0])
      mods.append(VIDEO.code)
      pos.append((t_unit[i], r[m], c[m]))
    else:
      ids.append(audio_ids_A[i])
      feats.append(pad_features(audio_AxD[i][None], feature_dim)[0])
      mods.append(AUDIO.code)
      pos.append((t_audio[i],) * 3)
  positions = np.asarray(pos, np.int32).reshape(-1, 3)
  span = int(positions.max()) + 1 if len(positions) else 0
  return Media(np.asarray(ids, np.int32), np.asarray(feats, np.float32).reshape(-1, feature_dim),
               positions, span, np.asarray(mods, np.int8))
