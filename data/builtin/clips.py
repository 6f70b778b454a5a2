"""Synthetic clips with sound: a handwritten digit bounces across a small canvas, and clicks.

A clip is `data.video_frames` frames at `data.video_fps` of a `data.video_side`-pixel black canvas
on which one 8x8 digit image (data/builtin/digits.py bytes) moves in a straight line, left, right,
up or down, `speeds(side)` pixels per frame, reflecting off the walls (its position along the motion
is a triangle wave over [0, travel], travel = side - 8; across the motion it stays put). The speed
divides the travel and the digit starts on a multiple of it, so it touches a wall exactly in a frame,
never between two: every bounce is on screen. At every bounce the sound track has a click (a short
decaying CLICK_HZ tone) at the time of that frame. Every clip bounces at least once.

Out of sync: the clicks of another motion at the same speed, one that bounces in other frames. The
bounce frames recur every travel / speed frames; where the motion starts decides which (the train's
phase, `click_phases`), and over `draw_motion`'s starts every phase of a speed is equally likely.
An out-of-sync clip takes one of the speed's other phases, uniformly: its clicks fall on frames
where the digit is off the walls and keep the rhythm, and in both classes the sound alone is a
click train whose phase is uniform over the same set. The picture alone is a bouncing digit: only
sound and picture together tell whether they match. (Before CLIPS_VERSION 2 of
data/builtin/cache.py, bounces fell between frames and out-of-sync clicks moved by a continuous
share of the period; in-sync clicks sat on a lattice the shifted ones left, and a classifier on the
sound alone told the classes apart 99.8% of the time.)

Captions: "the digit four moves right" (its first move, `MOTION_PROMPT` + answer for
eval/video_to_text_accuracy) and "in sync? yes" / "in sync? no" (`SYNC_PROMPT`; eval/av_sync_accuracy).
Waveforms are on the 16-bit PCM grid with headroom, as the DTMF tones are.
"""
from typing import NamedTuple

import numpy as np

from omnimoe.data.builtin.captions import WORDS

DIGIT_SIDE = 8
DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
SPEEDS = (2, 3)              # pixels per frame: those that divide the travel (`speeds`)
CLICK_HZ = 1000.0
CLICK_SECONDS = 0.03
CLICK_DECAY = 0.008          # seconds: the click's amplitude envelope exp(-t / decay)
CLICK_AMPLITUDE = 0.5
NOISE_STD = 0.01
PCM_SCALE = 32768.0
MOTION_PROMPT = "the digit "
SYNC_PROMPT = "in sync? "
SYNC_ANSWERS = {True: "yes", False: "no"}


class Motion(NamedTuple):
  direction: str
  speed: int                 # pixels per frame
  start: int                 # position along the motion at frame 0, in [0, side - 8]
  across: int                # position across the motion, in [0, side - 8]


class Clip(NamedTuple):
  frames_NxHxW: np.ndarray   # uint8 [frames, side, side]
  wave: np.ndarray           # float32 [samples] on the 16-bit grid
  bounces_s: np.ndarray      # float64: the moments the digit touches a wall, within the clip
  clicks_s: np.ndarray       # float64: the moments of the clicks, within the clip


def motion_caption(digit: int, direction: str) -> str:
  return f"{MOTION_PROMPT}{WORDS[digit]} moves {direction}"


def sync_caption(in_sync: bool) -> str:
  return f"{SYNC_PROMPT}{SYNC_ANSWERS[in_sync]}"


def check(side: int, frames: int) -> None:
  travel = side - DIGIT_SIDE
  if travel <= 0:
    raise ValueError(f"data.video_side={side} leaves no room for an {DIGIT_SIDE}-pixel digit to move")
  if not speeds(side):
    raise ValueError(f"data.video_side={side}: the built-in clips need a travel (side - "
                     f"{DIGIT_SIDE} = {travel}) that one of the speeds {SPEEDS} divides at least "
                     f"twice, so that bounces fall on frames and can be out of sync (e.g. 12, 14, 16)")
  if (frames - 1) * min(speeds(side)) <= travel:
    raise ValueError(f"data.video_frames={frames} is too few for a digit to bounce on a "
                     f"{side}-pixel canvas (needs more than {travel / min(speeds(side)) + 1:.0f})")


def speeds(side: int) -> tuple[int, ...]:
  """The speeds a clip on this canvas may take: those of SPEEDS that divide the travel at least
  twice (a speed equal to the travel bounces in every frame: no clip could be out of sync)."""
  travel = side - DIGIT_SIDE
  return tuple(v for v in SPEEDS if travel > v and travel % v == 0)


def draw_motion(rng: np.random.Generator, side: int) -> Motion:
  """A motion whose first move (frame 0 to 1) goes the way its direction names (no wall is
  reached before frame 1) and which starts on a multiple of its speed (it bounces in frames)."""
  travel = side - DIGIT_SIDE
  direction, speed = str(rng.choice(list(DIRECTIONS))), int(rng.choice(speeds(side)))
  lo, hi = (0, travel - speed) if sum(DIRECTIONS[direction]) > 0 else (speed, travel)
  start = speed * int(rng.integers(lo // speed, hi // speed + 1))
  return Motion(direction, speed, start, int(rng.integers(0, travel + 1)))


def along(motion: Motion, frame: np.ndarray, travel: int) -> np.ndarray:
  """Position along the motion at (fractional) frames: a triangle wave over [0, travel]."""
  sign = sum(DIRECTIONS[motion.direction])
  u = np.mod(motion.start + sign * motion.speed * np.asarray(frame, np.float64), 2 * travel)
  return travel - np.abs(travel - u)


def bounce_frames(motion: Motion, travel: int, lo: float, hi: float) -> np.ndarray:
  """The (fractional) frames in [lo, hi) at which the digit touches a wall."""
  sign = sum(DIRECTIONS[motion.direction])
  # start + sign * speed * f = k * travel  for an integer k.
  k = np.arange(np.floor((motion.start + min(sign * motion.speed * lo, sign * motion.speed * hi))
                         / travel) - 1,
                np.ceil((motion.start + max(sign * motion.speed * lo, sign * motion.speed * hi))
                        / travel) + 2)
  f = (k * travel - motion.start) / (sign * motion.speed)
  return np.sort(f[(f >= lo) & (f < hi)])


def click_phases(travel: int, speed: int) -> np.ndarray:
  """The phases an in-sync click train can have at this speed: p in [0, travel) such that the
  bounces are the frames f with f * speed = p (mod travel). A motion of sign +1 from start s has
  p = -s mod travel, one of sign -1 has p = s mod travel; `draw_motion`'s starts (multiples of the
  speed) give each multiple of the speed exactly once per sign."""
  return np.arange(0, travel, speed)


def phase(motion: Motion, travel: int) -> int:
  """The phase (`click_phases`) of a motion's bounces."""
  return int(-sum(DIRECTIONS[motion.direction]) * motion.start % travel)


def render(digit_pixels: np.ndarray, motion: Motion, side: int, frames: int) -> np.ndarray:
  """uint8 [frames, side, side]: the digit pasted at its position in every frame."""
  travel = side - DIGIT_SIDE
  out = np.zeros((frames, side, side), np.uint8)
  pos = np.rint(along(motion, np.arange(frames), travel)).astype(int)
  vertical = DIRECTIONS[motion.direction][0] != 0
  for f in range(frames):
    y, x = (pos[f], motion.across) if vertical else (motion.across, pos[f])
    out[f, y:y + DIGIT_SIDE, x:x + DIGIT_SIDE] = digit_pixels
  return out


def click_track(clicks_s: np.ndarray, seconds: float, sample_rate: int,
                rng: np.random.Generator) -> np.ndarray:
  t = np.arange(int(round(seconds * sample_rate))) / sample_rate
  wave = NOISE_STD * rng.standard_normal(t.shape)
  for c in clicks_s:
    d = t - c
    on = (d >= 0) & (d < CLICK_SECONDS)
    wave[on] += CLICK_AMPLITUDE * np.exp(-d[on] / CLICK_DECAY) * np.sin(2 * np.pi * CLICK_HZ * d[on])
  return (np.rint(np.clip(wave, -0.9, 0.9) * PCM_SCALE) / PCM_SCALE).astype(np.float32)


def make_clip(digit_pixels: np.ndarray, motion: Motion, in_sync: bool, rng: np.random.Generator,
              *, side: int, frames: int, fps: float, sample_rate: int) -> Clip:
  """One clip (see the module docstring); `rng` draws the clicks' phase (out of sync) and the
  noise."""
  check(side, frames)
  travel = side - DIGIT_SIDE
  seconds = frames / fps
  bounces = bounce_frames(motion, travel, 0.0, frames)
  if in_sync:
    clicks = bounces
  else:
    phases = click_phases(travel, motion.speed)
    p = int(rng.choice(phases[phases != phase(motion, travel)]))
    f = np.arange(frames)
    clicks = f[(f * motion.speed - p) % travel == 0].astype(np.float64)   # that phase's bounces
  return Clip(render(digit_pixels, motion, side, frames),
              click_track(clicks / fps, seconds, sample_rate, rng), bounces / fps, clicks / fps)
