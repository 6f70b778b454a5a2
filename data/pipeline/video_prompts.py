"""Eval prompts of the built-in clips: what moves (video -> text) and whether sound and picture match.

Every clip is fresh: a held-out digit image of the default dataset (never in a training clip) with
a motion, a sync flag (every other clip in sync) and noise drawn from the seed's prompt stream,
synthesized by data/builtin/clips.py and featurized as a GIF and a WAV are by `omnimoe prepare`
(data/prepare/video_io.py), then laid out on the run's clock (data/video_layout.py).

Sets (name -> what the row holds after BOS, what greedy decoding must produce):
- `video`:   the clip with its sound, "the digit " -> "four moves right" (digit and direction);
- `sync`:    the clip with its sound, "in sync? " -> "yes" / "no";
- `sync_audio_only`: the same clips with the video removed, the same question (a control: the
  answer should not be readable from the sound alone, so about 0.5);
- `sync_video_only`: the same clips with the sound removed (the other control).
"""
import numpy as np

from omnimoe.data import records
from omnimoe.data.builtin import clip_files, clips as clips_lib
from omnimoe.data.builtin.captions import WORDS
from omnimoe.data.config import DataConfig
from omnimoe.data.examples import make_sequence
from omnimoe.data.packing import loss_weight_table, pack
from omnimoe.data.pipeline import sources as sources_lib
from omnimoe.data.pipeline.mixture import stream_rng
from omnimoe.data.pipeline.prompts import PromptSet
from omnimoe.data.prepare import audio_io, video_io
from omnimoe.data.prepare import folder as folder_lib
from omnimoe.data.prepare.image_io import PIXEL_MAX
from omnimoe.data.video_layout import Clock

VIDEO_PROMPT_STREAM = 8     # rng = default_rng([VIDEO_PROMPT_STREAM, seed, i]): the i-th clip
SETS = ("video", "sync", "sync_audio_only", "sync_video_only")


def common_prefix(id_lists) -> np.ndarray:
  n = 0
  while all(len(c) > n and c[n] == id_lists[0][n] for c in id_lists):
    n += 1
  return np.asarray(id_lists[0][:n], np.int32)


def fresh_clip(cfg: DataConfig, i: int, seed: int, pixels, labels) -> tuple:
  """(VideoPart with its sound, digit, motion, in_sync) of the i-th eval clip."""
  rng = stream_rng(VIDEO_PROMPT_STREAM, seed, i)
  j = int(rng.integers(len(labels)))
  in_sync = i % 2 == 0
  clip, motion = clip_files.synthesize(cfg, rng, pixels[j], in_sync)
  frames = clip.frames_NxHxW.astype(np.float32)[..., None] / PIXEL_MAX
  tokens = video_io.tokens(frames, cfg)
  sound = video_io.cut_sound(audio_io.frames(clip.wave, cfg.sample_rate, cfg), len(tokens), cfg)
  part = records.VideoPart(tokens, video_io.grid(cfg), sound)
  return part, int(labels[j]), motion, in_sync


def video_prompt_sets(cfg: DataConfig, *, seed: int, limit: int) -> dict[str, PromptSet]:
  """The four sets of the module docstring over `limit` fresh clips."""
  if limit <= 0:
    raise ValueError(f"eval.video_limit must be positive, got {limit}")
  mix = sources_lib.resolve(cfg)
  clock = Clock.from_config(cfg)
  pixels, labels = clip_files.digit_images(True, cfg.heldout_fraction)
  clips = [fresh_clip(cfg, i, seed, pixels, labels) for i in range(limit)]
  motions = [clips_lib.motion_caption(d, w) for d in range(len(WORDS)) for w in clips_lib.DIRECTIONS]
  syncs = [clips_lib.sync_caption(s) for s in (True, False)]
  prompt = {"video": common_prefix([mix.vocab.encode_text(c) for c in motions]),
            "sync": common_prefix([mix.vocab.encode_text(c) for c in syncs])}
  longest = {"video": max(len(mix.vocab.encode_text(c)) for c in motions),
             "sync": max(len(mix.vocab.encode_text(c)) for c in syncs)}
  out = {}
  for name in SETS:
    question = "video" if name == "video" else "sync"
    rows, expected = [], []
    for part, digit, motion, in_sync in clips:
      if name == "sync_audio_only":
        part = records.VideoPart(part.tokens_UxMxD[:0], part.grid, part.sound_AxD)
      elif name == "sync_video_only":
        part = records.VideoPart(part.tokens_UxMxD, part.grid, part.sound_AxD[:0])
      media = folder_lib.media_of(part, mix.vocab, mix.codebooks, mix.feature_dim, clock)
      rows.append(make_sequence([media, prompt[question]], mix.feature_dim, eos=False,
                                specials=mix.vocab))
      expected.append((clips_lib.motion_caption(digit, motion.direction) if question == "video"
                       else clips_lib.sync_caption(in_sync)).encode())
    out[name] = _prompt_set(cfg, mix, rows, prompt[question], expected,
                            longest[question] - len(prompt[question]) + 2)
  return out


def _prompt_set(cfg, mix, examples, prompt_ids, expected, max_new_tokens) -> PromptSet:
  """Right-aligns nothing: every row is its own prompt, padded to the longest (the controls'
  prompts are shorter than the full clips'), then `max_new_tokens` positions to generate into."""
  lengths = {len(e.tokens_N) for e in examples}
  if len(lengths) != 1:
    raise ValueError(f"eval clips of different lengths {sorted(lengths)}: every built-in clip must "
                     f"have as many tokens (data/builtin/clips.py)")
  prompt_len = lengths.pop()
  batch = pack([[e] for e in examples], prompt_len + max_new_tokens, mix.feature_dim,
               loss_weight_table(cfg))
  next_position = np.asarray([e.positions_Nx3[-1, 0] + 1 for e in examples], np.int32)
  return PromptSet(batch, prompt_len, next_position, [x.decode() for x in expected], prompt_ids,
                   tuple(expected))
