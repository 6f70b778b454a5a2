"""Synthetic clips with sound: a handwritten digit bounces across a small canvas, and clicks.

A clip is `data.video_frames` frames at `data.video_fps` of a `data.video_side`-pixel black canvas
on which one 8x8 digit image (data/builtin/digits.py bytes) moves in a straight line, left, right,
up or down, SPEEDS pixels per frame, reflecting off the walls (its position along the motion is a
triangle wave over [0, side - 8]; across the motion it stays put). Every moment the digit touches a
wall (a bounce, between frames) the sound track has a click: a short decaying CLICK_HZ tone. Speeds
and the canvas are chosen so that every clip bounces at least once.

Out of sync: the clicks of another motion at the same speed, one whose bounces fall elsewhere.
A speed's bounces fall on a lattice of 1/speed frames; which lattice points (the click train's
phase, `click_phases`) depends on where the motion starts, and over `draw_motion`'s starts every
phase of the speed is equally likely. An out-of-sync clip takes a phase drawn uniformly among the
speed's other phases, so its clicks miss the bounces by at least 1/speed frames and keep their
rhythm, and in both cases the sound alone is a click train whose phase is uniform over the same
set: only sound and picture together tell whether they match. (Clicks moved by a continuous share
of the time between bounces, as before CLIPS_VERSION 2 of data/builtin/cache.py, leave the lattice,
and a classifier on the sound alone told the two apart 99.8% of the time.)

Captions: "the digit four moves right" (its first move, `MOTION_PROMPT` + answer for
eval/video_to_text_accuracy) and "in sync? yes" / "in sync? no" (`SYNC_PROMPT`; eval/av_sync_accuracy).
Waveforms are on the 16-bit PCM grid with headroom, as the DTMF tones are.
"""
from typing import NamedTuple

import numpy as np

from omnimoe.data.builtin.captions import WORDS

DIGIT_SIDE = 8
DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
SPEEDS = (2, 3)              # pixels per frame
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
  if travel <= max(SPEEDS):
    raise ValueError(f"data.video_side={side} is too small for out-of-sync clicks: at speed "
                     f"{max(SPEEDS)} every motion bounces at the same moments (needs a side over "
                     f"{DIGIT_SIDE + max(SPEEDS)})")
  if (frames - 1) * min(SPEEDS) <= travel:
    raise ValueError(f"data.video_frames={frames} is too few for a digit to bounce on a "
                     f"{side}-pixel canvas (needs more than {travel / min(SPEEDS) + 1:.0f})")


def draw_motion(rng: np.random.Generator, side: int) -> Motion:
  """A motion whose first move (frame 0 to 1) goes the way its direction names: no wall is
  reached before frame 1."""
  travel = side - DIGIT_SIDE
  direction, speed = str(rng.choice(list(DIRECTIONS))), int(rng.choice(SPEEDS))
  lo, hi = (0, travel - speed) if sum(DIRECTIONS[direction]) > 0 else (speed, travel)
  return Motion(direction, speed, int(rng.integers(lo, hi + 1)), int(rng.integers(0, travel + 1)))


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
  p = -s mod travel, one of sign -1 has p = s mod travel; `draw_motion`'s starts give each phase
  exactly once per sign."""
  return np.asarray([0, *range(speed, travel)])


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
    clicks = (p + travel * np.arange(-(-frames * motion.speed // travel) + 1)) / motion.speed
    clicks = clicks[clicks < frames]
  return Clip(render(digit_pixels, motion, side, frames),
              click_track(clicks / fps, seconds, sample_rate, rng), bounces / fps, clicks / fps)
