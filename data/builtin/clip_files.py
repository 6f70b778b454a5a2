"""The built-in clips as files and a manifest, for `omnimoe prepare` (no downloads).

  DIR/clips/clip_KKKK.gif   the frames (data/builtin/clips.py), an animated grayscale GIF
  DIR/clips/clip_KKKK.wav   its sound, mono 16-bit PCM at data.sample_rate
  DIR/clips.jsonl           two lines per clip, the clip with its sound each time: its motion
                            caption ("the digit four moves right") and its sync caption
                            ("in sync? yes" / "in sync? no")

Clip k takes a digit image of its split (training clips: the default dataset's training images;
held-out clips: its held-out images, `digits.split_indices`), a motion and in-sync or not (every
other clip) drawn from rng([seed, CLIP_STREAM, k]). The last `heldout_fraction` of the clips are
held out (eval/loss); the eval sets of eval/video_to_text_accuracy and eval/av_sync_accuracy draw
fresh motions instead (data/pipeline/video_prompts.py).
"""
import json
import pathlib

import numpy as np

from omnimoe.data.builtin import clips as clips_lib
from omnimoe.data.builtin import digits as digits_lib
from omnimoe.data.builtin.demo_files import write_wav
from omnimoe.data.config import DataConfig
from omnimoe.data.prepare import video_io

CLIP_STREAM = 7             # rng = default_rng([seed, CLIP_STREAM, k])


def digit_images(heldout: bool, heldout_fraction: float) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 [N, 8, 8] digit bytes, int [N] labels) of the default dataset's train or held-out
  images."""
  from sklearn.datasets import load_digits
  sk = load_digits()
  train, held = digits_lib.split_indices(len(sk.target), heldout_fraction)
  rows = held if heldout else train
  return digits_lib.pixel_bytes(sk.images[rows]), sk.target[rows].astype(int)


def synthesize(cfg: DataConfig, rng: np.random.Generator, pixels: np.ndarray,
               in_sync: bool) -> tuple[clips_lib.Clip, clips_lib.Motion]:
  motion = clips_lib.draw_motion(rng, cfg.video_side)
  clip = clips_lib.make_clip(pixels, motion, in_sync, rng, side=cfg.video_side,
                             frames=cfg.video_frames, fps=cfg.video_fps,
                             sample_rate=cfg.sample_rate)
  return clip, motion


def write_clips(folder: str | pathlib.Path, cfg: DataConfig, *, clips: int | None = None,
                seed: int = 0) -> pathlib.Path:
  """Writes `clips` (default data.video_clips) clip files and DIR/clips.jsonl; returns the
  manifest's path."""
  clips = cfg.video_clips if clips is None else clips
  folder = pathlib.Path(folder)
  (folder / "clips").mkdir(parents=True, exist_ok=True)
  held = max(1, round(cfg.heldout_fraction * clips)) if clips > 1 else 0
  pools = {False: digit_images(False, cfg.heldout_fraction),
           True: digit_images(True, cfg.heldout_fraction)}
  lines = []
  for k in range(clips):
    heldout = k >= clips - held
    rng = np.random.default_rng([seed, CLIP_STREAM, k])
    pixels, labels = pools[heldout]
    i = int(rng.integers(len(labels)))
    in_sync = k % 2 == 0
    clip, motion = synthesize(cfg, rng, pixels[i], in_sync)
    name = f"clips/clip_{k:04d}"
    video_io.write_gif(folder / f"{name}.gif", clip.frames_NxHxW, cfg.video_fps)
    write_wav(folder / f"{name}.wav", clip.wave, cfg.sample_rate)
    split = "heldout" if heldout else "train"
    for caption in (clips_lib.motion_caption(int(labels[i]), motion.direction),
                    clips_lib.sync_caption(in_sync)):
      lines.append({"video": f"{name}.gif", "sound": f"{name}.wav", "text": caption,
                    "split": split})
  manifest = folder / "clips.jsonl"
  manifest.write_text("".join(json.dumps(row) + "\n" for row in lines), encoding="utf-8")
  return manifest
