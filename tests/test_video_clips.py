"""The built-in clips: motion and clicks against a step-by-step simulation, GIF/WAV files through
`omnimoe prepare`, and the clock in the prepared batch (a click's audio at the t of its bounce)."""
import json
import pathlib

import numpy as np
import pytest

from omnimoe.data import records
from omnimoe.data.builtin import clips
from omnimoe.data.builtin.clip_files import CLIP_STREAM, digit_images, synthesize, write_clips
from omnimoe.data.config import DataConfig
from omnimoe.data.prepare import folder as folder_lib
from omnimoe.data.prepare import video_io
from omnimoe.data.prepare import write as prepare
from omnimoe.data.video_layout import Clock

CFG = DataConfig(video_patch=8, seq_len=128, heldout_fraction=0.25)


def simulate(motion: clips.Motion, side: int, frames: int, substeps: int = 600):
  """Oracle: move the digit in small steps, reversing at the walls; (position at each frame,
  the moments it touches a wall, in frames: a crossing's exact moment inside its small step, and
  frame 0 when it starts against a wall)."""
  travel = side - clips.DIGIT_SIDE
  sign = sum(clips.DIRECTIONS[motion.direction])
  x, v, dt = float(motion.start), sign * motion.speed, 1.0 / substeps
  at_frames, contacts = [], [0.0] if motion.start in (0, travel) else []
  for step in range(frames * substeps):
    if step % substeps == 0:
      at_frames.append(x)
    new = x + v * dt
    if new < 0 or new > travel:
      wall = 0.0 if new < 0 else float(travel)
      contacts.append(step * dt + (wall - x) / v)
      new, v = 2 * wall - new, -v
    x = new
  contacts = sorted(set(round(c, 9) for c in contacts))
  return np.array(at_frames), np.array(contacts)


@pytest.mark.parametrize("seed", range(6))
def test_motion_bounces_where_a_simulation_does(seed):
  rng = np.random.default_rng(seed)
  motion = clips.draw_motion(rng, 16)
  digit = np.full((8, 8), 200, np.uint8)
  clip = clips.make_clip(digit, motion, True, rng, side=16, frames=8, fps=10.0, sample_rate=8000)
  pos, contacts = simulate(motion, 16, 8)
  vertical = clips.DIRECTIONS[motion.direction][0] != 0
  for f in range(8):   # the digit's top-left corner in each frame
    ys, xs = np.nonzero(clip.frames_NxHxW[f])
    corner = ys.min() if vertical else xs.min()
    assert corner == round(pos[f]) and (xs.min() if vertical else ys.min()) == motion.across
  assert len(clip.bounces_s) >= 1
  np.testing.assert_allclose(clip.bounces_s * 10, contacts, atol=1e-6)
  np.testing.assert_allclose(clip.clicks_s, clip.bounces_s)   # in sync: a click at every bounce
  np.testing.assert_allclose(contacts, np.round(contacts))     # ... which the picture shows


def click_onsets(wave: np.ndarray, rate: int) -> np.ndarray:
  """Oracle from the waveform alone: the starts of the loud bursts, in seconds."""
  loud = np.abs(wave) > 0.2
  starts = np.flatnonzero(loud & ~np.concatenate([[False], loud[:-1]]))
  keep = [s for i, s in enumerate(starts) if i == 0 or s - starts[i - 1] > 0.02 * rate]
  return np.array(keep) / rate


def test_out_of_sync_clicks_miss_the_bounces_but_keep_their_rhythm():
  for seed in range(10):
    rng = np.random.default_rng(seed)
    motion = clips.draw_motion(rng, 16)
    clip = clips.make_clip(np.full((8, 8), 255, np.uint8), motion, False, rng, side=16, frames=8,
                           fps=10.0, sample_rate=8000)
    period_s = (16 - 8) / motion.speed / 10
    gaps = np.abs(clip.clicks_s[:, None] - clip.bounces_s[None, :]).min(axis=1)
    assert np.all(gaps >= 0.1 - 1e-9)           # a whole frame away from every bounce
    np.testing.assert_allclose(clip.clicks_s * 10, np.round(clip.clicks_s * 10))   # on frames
    np.testing.assert_allclose(np.diff(clip.clicks_s), period_s)    # the same rhythm
    heard = click_onsets(clip.wave, 8000)
    np.testing.assert_allclose(heard, clip.clicks_s, atol=2e-3)


@pytest.mark.parametrize("side, frames", [(12, 4), (16, 8)])
def test_only_sound_and_picture_together_tell_whether_a_clip_is_in_sync(side, frames):
  """The oracle is a classifier that knows nothing of how clips are made (scikit-learn's boosted
  trees), scored by 4-fold cross-validation over 4,000 clips: from the sound alone (the loudness of
  each log-mel frame) or the picture alone (the digit's place along its way in each frame) it must stay near
  chance, and from the two together it must tell. The continuous shift clips had before
  CLIPS_VERSION 2 gave 0.998 from the sound alone at (12, 4)."""
  from sklearn.ensemble import HistGradientBoostingClassifier
  from sklearn.model_selection import cross_val_score

  from omnimoe.data.prepare import audio_io
  cfg = DataConfig(video_side=side, video_frames=frames)
  sound, picture, in_sync = [], [], []
  for k in range(4000):
    rng = np.random.default_rng([3, k])
    motion = clips.draw_motion(rng, side)
    clip = clips.make_clip(np.full((8, 8), 255, np.uint8), motion, k % 2 == 0, rng, side=side,
                           frames=frames, fps=10.0, sample_rate=cfg.sample_rate)
    sound.append(audio_io.frames(clip.wave, cfg.sample_rate, cfg).sum(axis=1))
    corner = np.asarray([[np.nonzero(f)[a].min() for a in (0, 1)] for f in clip.frames_NxHxW])
    picture.append(corner[:, np.argmax(np.ptp(corner, axis=0))])   # the digit's place along its way
    in_sync.append(k % 2 == 0)
  sound, picture, in_sync = map(np.asarray, (sound, picture, in_sync))
  def score(x):
    return cross_val_score(HistGradientBoostingClassifier(random_state=0), x, in_sync, cv=4).mean()
  assert score(sound) < 0.56 and score(picture) < 0.56     # 0.5 +- 0.008 (one standard error)
  assert score(np.concatenate([sound, picture], axis=1)) > 0.95


def test_gif_round_trip_and_tubelets(tmp_path):
  frames = np.random.default_rng(0).integers(0, 256, (5, 16, 16)).astype(np.uint8)
  video_io.write_gif(tmp_path / "a.gif", frames, 10.0)
  back = video_io.load_frames(tmp_path / "a.gif", CFG)
  np.testing.assert_array_equal(back[..., 0], frames.astype(np.float32) / 255.0)   # lossless
  cfg = DataConfig(video_patch=8, video_tubelet=2)
  tok = video_io.tokens(back, cfg)
  assert tok.shape == (3, 4, 2 * 64)
  # Oracle: token u, patch (r, c) is frames 2u and 2u+1 of that 8x8 block (the last frame
  # repeated to fill the last tubelet), frame-major.
  padded = np.concatenate([back, back[-1:]])
  for u in range(3):
    for m, (r, c) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
      want = np.concatenate([padded[2 * u + k, 8 * r:8 * r + 8, 8 * c:8 * c + 8, 0].ravel()
                             for k in range(2)])
      np.testing.assert_array_equal(tok[u, m], want)
  (tmp_path / "bad.gif").write_bytes(b"GIF89a not really")
  with pytest.raises(Exception, match="cannot decode video"):
    video_io.load_frames(tmp_path / "bad.gif", CFG)


def test_clips_prepare_and_put_each_click_at_the_t_of_its_moment(tmp_path):
  manifest = write_clips(tmp_path / "files", CFG, clips=8)
  lines = [json.loads(x) for x in manifest.read_text().splitlines()]
  assert len(lines) == 16 and {x["split"] for x in lines} == {"train", "heldout"}
  card = prepare.prepare(manifest, tmp_path / "clips", CFG)
  assert card["media"]["video"] == 16 and card["codebooks"]["video"] == CFG.video_codebook
  folder = folder_lib.open_folder(tmp_path / "clips")
  assert set(folder.codebooks) == {"audio", "video"}
  record = folder.record(0)
  clip, text = record.parts
  assert isinstance(clip, records.VideoPart) and text.startswith(b"the digit ")
  assert clip.tokens_UxMxD.shape == (8, 4, 64) and clip.sound_AxD.shape == (49, CFG.n_mels)
  from omnimoe.data.vocab import Vocab
  ex = folder_lib.to_example(record, Vocab.from_config(CFG), folder.codebooks, 64,
                             Clock.from_config(CFG))
  assert len(ex.tokens_N) == 1 + 32 + 49 + len(text) + 1
  # Oracle for the clock: audio frame j starts at j * 16 ms (128 samples at 8 kHz), counted by
  # hand, so its t is 1 + floor(16 j / 100); every frame of the clip follows that rule.
  audio = np.flatnonzero(ex.modality_N == 3)
  np.testing.assert_array_equal(ex.positions_Nx3[audio, 0], 1 + (np.arange(49) * 16) // 100)
  # ... and the loudest frame (a click) starts within a frame length of a click of clip 0, drawn
  # again here as write_clips drew it.
  rng = np.random.default_rng([0, CLIP_STREAM, 0])
  pixels, _ = digit_images(False, CFG.heldout_fraction)
  clip0, _ = synthesize(CFG, rng, pixels[int(rng.integers(len(pixels)))], True)
  j = int(np.argmax(ex.features_NxF[audio, :CFG.n_mels].sum(axis=1)))
  assert np.min(np.abs(clip0.clicks_s * 1000 - j * 16)) <= 32
  video = np.flatnonzero(ex.modality_N == 4)
  np.testing.assert_array_equal(ex.positions_Nx3[video, 0], 1 + np.repeat(np.arange(8), 4))


def test_manifest_video_lines_and_bad_videos_name_their_line(tmp_path):
  from omnimoe.data.prepare import manifest
  short = manifest.parse_line(1, '{"video": "c.gif", "sound": "c.wav", "text": "hi"}')
  parts = manifest.parse_line(2, '{"parts": [{"video": "c.gif", "sound": "c.wav"}, {"text": "hi"}]}')
  assert short.parts == parts.parts == (manifest.Part("video", "c.gif", "c.wav"),
                                        manifest.Part("text", "hi"))
  assert manifest.parse_line(3, '{"video": "c.gif"}').parts == (manifest.Part("video", "c.gif"),)
  for bad, why in (('{"audio": "a.wav", "sound": "c.wav"}', "unknown key 'sound'"),
                   ('[{"video": "a.gif"}, {"video": "b.gif"}]', "more than one video")):
    with pytest.raises(manifest.BadLine, match=why):
      manifest.parse_line(4, bad)
  (tmp_path / "bad.gif").write_bytes(b"GIF89a broken")
  video_io.write_gif(tmp_path / "ok.gif", np.zeros((3, 16, 16), np.uint8), 10.0)
  (tmp_path / "m.jsonl").write_text('{"video": "ok.gif", "text": "fine"}\n'
                                    '{"video": "bad.gif", "text": "x"}\n'
                                    '{"video": "ok.gif", "sound": "missing.wav", "text": "y"}\n')
  with pytest.raises(prepare.BadData, match=r"m.jsonl:2: bad.gif: cannot decode video"):
    prepare.prepare(tmp_path / "m.jsonl", tmp_path / "out", CFG)
  card = prepare.prepare(tmp_path / "m.jsonl", tmp_path / "out", CFG, skip_bad=True)
  assert card["skipped"]["count"] == 2 and card["media"]["video"] == 1
  assert "missing.wav: file not found" in card["skipped"]["lines"][1]["reason"]


def test_data_video_clips_sets_how_many_clips_are_written_and_keys_the_cache(tmp_path,
                                                                            monkeypatch):
  import dataclasses

  from omnimoe.data.builtin import cache
  cfg = dataclasses.replace(CFG, video_clips=6, weight_video=0.25)
  lines = write_clips(tmp_path / "files", cfg).read_text().splitlines()
  assert len(lines) == 12 and sum('"heldout"' in x for x in lines) == 2 * round(0.25 * 6)
  assert len(list((tmp_path / "files" / "clips").glob("*.gif"))) == 6
  keys = {cache.cache_key(cache.build_inputs(dataclasses.replace(cfg, video_clips=n), 4, None))
          for n in (2000, 4000)}
  assert len(keys) == 2
  # The clips' code is in the key: an edit to how clips are drawn (here a copy of clips.py with one
  # more line) builds a new folder.
  before = cache.cache_key(cache.build_inputs(cfg, 4, None))
  edited = tmp_path / "clips_edited.py"
  edited.write_text(pathlib.Path(clips.__file__).read_text() + "# an edit\n")
  monkeypatch.setattr(clips, "__file__", str(edited))
  assert cache.cache_key(cache.build_inputs(cfg, 4, None)) != before
  with pytest.raises(ValueError, match="data.video_clips must be >= 2"):
    cache.check(dataclasses.replace(cfg, video_clips=1))
