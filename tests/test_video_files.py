"""Users' video files (MP4, WebM, AVI through PyAV) through `omnimoe prepare` into a training batch:
patches against the frames the test drew, the sound track's tone at the t of its frame, the cut of
a long clip, a clip without sound, and bad files named by their manifest line."""
import dataclasses
import json
import pathlib

import av
import numpy as np
import pytest

from omnimoe import data
from omnimoe.data.config import DataConfig, Source
from omnimoe.data.prepare import video_io
from omnimoe.data.prepare import write as prepare

CFG = DataConfig(video_patch=8, seq_len=128, prefetch=0)
FPS, RATE = 10, 16000                 # the file's own rates; the run resamples sound to 8 kHz
TONE_S = (0.30, 0.40)                 # a 1 kHz tone inside frame 3 (300-400 ms), silence elsewhere


def drawn_frames(n: int) -> np.ndarray:
  """uint8 [n, 16, 16], n <= 12: four flat quadrants, quadrant q of frame k at level(k, q), every
  level distinct and 5 apart."""
  out = np.zeros((n, 16, 16), np.uint8)
  for k in range(n):
    for q, (r, c) in enumerate(QUADRANTS):
      out[k, r:r + 8, c:c + 8] = level(k, q)
  return out


QUADRANTS = [(0, 0), (0, 8), (8, 0), (8, 8)]   # patch m of a frame is quadrant m (row-major)


def level(k: int, q: int) -> int:
  return 64 * q + 2 + 5 * k


def tone(seconds: float) -> np.ndarray:
  t = np.arange(int(seconds * RATE)) / RATE
  on = (t >= TONE_S[0]) & (t < TONE_S[1])
  return np.where(on, 0.5 * np.sin(2 * np.pi * 1000.0 * t), 0.0).astype(np.float32)


def write_video(path: pathlib.Path, frames: np.ndarray, sound: np.ndarray | None, vcodec: str,
                acodec: str, options: dict | None = None) -> pathlib.Path:
  """An encoded file, written by PyAV here: `frames` at FPS, `sound` (mono, RATE) if given."""
  with av.open(str(path), "w") as out:
    v = out.add_stream(vcodec, rate=FPS)
    v.width, v.height, v.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
    v.options = options or {}
    a = None
    if sound is not None:
      a = out.add_stream(acodec, rate=RATE)
      a.layout = "mono"
    for f in frames:
      for packet in v.encode(av.VideoFrame.from_ndarray(f, format="gray")):
        out.mux(packet)
    for packet in v.encode():
      out.mux(packet)
    if a is not None:
      frame = av.AudioFrame.from_ndarray(sound[None], format="fltp", layout="mono")
      frame.sample_rate = RATE
      for packet in [*a.encode(frame), *a.encode()]:
        out.mux(packet)
  return path


@pytest.fixture(scope="module")
def mp4(tmp_path_factory):
  """12 frames (1.2 s), H.264 at qp 0, with its sound as ALAC (lossless and without the encoder
  delay that AAC adds and PyAV's muxer does not record)."""
  root = tmp_path_factory.mktemp("mp4")
  return write_video(root / "clip.mp4", drawn_frames(12), tone(1.2), "libx264", "alac", {"qp": "0"})


def test_mp4_to_batch_patches_and_the_tone_at_the_t_of_its_frame(mp4, tmp_path):
  manifest = tmp_path / "m.jsonl"
  manifest.write_text(json.dumps({"video": str(mp4), "text": "a clip", "split": "train"}) + "\n")
  card = prepare.prepare(manifest, tmp_path / "out", CFG)
  assert card["media"]["video"] == 1
  cfg = dataclasses.replace(CFG, sources=(Source(str(tmp_path / "out"), 1.0),))
  batch = next(data.train_iterator(cfg, batch_size=2, seed=0))
  seg, mod, pos, feats = (batch[k][0] for k in ("segment_ids", "modality", "positions", "features"))
  at = np.flatnonzero(seg == 1)
  video, audio = at[mod[at] == 4], at[mod[at] == 3]
  # The cut: 8 frames (video_frames / video_fps = 0.8 s of the 1.2 s file), 4 patches each, and
  # the log-mel frames that start inside those 0.8 s: j * 16 ms < 800 ms, j = 0..49 (the file's
  # sound goes on, so the last one is whole).
  assert len(video) == 32 and len(audio) == 50
  # Oracle for the patches: the drawn frames, cut by hand (patch m = quadrant m, row-major);
  # H.264 at qp 0 through 4:2:0 and back to gray is within 2 levels of 255.
  want = drawn_frames(8).astype(np.float32) / 255.0
  got = feats[video, :64].reshape(8, 4, 8, 8)
  for m, (r, c) in enumerate(QUADRANTS):
    np.testing.assert_allclose(got[:, m], want[:, r:r + 8, c:c + 8], atol=2 / 255)
  # The clock: frame f at t = 1 + f (BOS is t = 0); audio frame j starts at 16 j ms.
  np.testing.assert_array_equal(pos[video, 0], 1 + np.repeat(np.arange(8), 4))
  np.testing.assert_array_equal(pos[audio, 0], 1 + np.arange(50) * 16 // 100)
  # The tone: the audio frames whose 32 ms window lies inside 300-400 ms (j = 19..23, counted by
  # hand) are loud, frames away from it are quiet, and the loud ones share t with frame 3's tokens,
  # found by their pixels.
  loudness = feats[audio, :CFG.n_mels].max(axis=1)
  cut = (loudness.max() + loudness.min()) / 2
  inside, away = np.arange(19, 24), np.r_[0:17, 26:50]
  assert (loudness[inside] > cut).all() and (loudness[away] < cut).all()
  frame3 = video[np.abs(feats[video, 0] - level(3, 0) / 255.0) < 2 / 255]
  assert len(frame3) == 1 and set(pos[audio[inside], 0]) == {pos[frame3[0], 0]} == {4}


def test_the_cut_keeps_the_first_max_seconds_and_the_sound_follows(mp4):
  frames = video_io.load_frames(mp4, dataclasses.replace(CFG, video_max_seconds=1.0))
  assert frames.shape == (10, 16, 16, 1)
  np.testing.assert_allclose(frames[9, 0, 0, 0], level(9, 0) / 255.0, atol=2 / 255)
  cfg = dataclasses.replace(CFG, video_max_seconds=0.25)       # 0, 100, 200 ms: 3 frames
  frames = video_io.load_frames(mp4, cfg)
  assert frames.shape == (3, 16, 16, 1)
  sound = video_io.own_sound_frames(mp4, len(frames), cfg)
  assert len(sound) == 1 + (300 - 1) // 16                     # frames starting before 300 ms


@pytest.mark.parametrize("suffix,vcodec,acodec,options", [
    (".webm", "libvpx-vp9", "libopus", {"lossless": "1"}),
    (".avi", "ffv1", "pcm_s16le", {})])
def test_webm_and_avi_decode_to_the_drawn_frames(tmp_path, suffix, vcodec, acodec, options):
  path = write_video(tmp_path / f"clip{suffix}", drawn_frames(8), tone(0.8), vcodec, acodec, options)
  frames = video_io.load_frames(path, CFG)[..., 0]
  # Lossless video codecs; gray -> 4:2:0 -> gray rounds by at most 2 levels.
  np.testing.assert_allclose(frames, drawn_frames(8) / 255.0, atol=2 / 255)
  sound = video_io.own_sound_frames(path, len(frames), CFG)
  assert sound.shape == (49, CFG.n_mels)


def test_a_clip_without_sound_and_bad_files_name_their_line(tmp_path):
  silent = write_video(tmp_path / "silent.mp4", drawn_frames(8), None, "libx264", "", {"qp": "0"})
  assert video_io.own_sound_frames(silent, 8, CFG).shape == (0, CFG.n_mels)
  (tmp_path / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not a real file")
  only_sound = tmp_path / "sound.mp4"
  with av.open(str(only_sound), "w") as out:
    a = out.add_stream("alac", rate=RATE)
    a.layout = "mono"
    frame = av.AudioFrame.from_ndarray(tone(0.5)[None], format="fltp", layout="mono")
    frame.sample_rate = RATE
    for packet in [*a.encode(frame), *a.encode()]:
      out.mux(packet)
  manifest = tmp_path / "m.jsonl"
  manifest.write_text("".join(json.dumps({"video": name, "text": "x"}) + "\n" for name in
                              ("silent.mp4", "corrupt.mp4", "sound.mp4", "missing.webm")))
  with pytest.raises(prepare.BadData, match=r"m.jsonl:2: corrupt.mp4: cannot decode video"):
    prepare.prepare(manifest, tmp_path / "out", CFG)
  card = prepare.prepare(manifest, tmp_path / "out", CFG, skip_bad=True)
  assert card["media"]["video"] == 1 and card["skipped"]["count"] == 3
  reasons = [x["reason"] for x in card["skipped"]["lines"]]
  assert "no video stream" in reasons[1] and "file not found" in reasons[2]
