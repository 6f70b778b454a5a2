"""One clock for sound and picture: a clip's layout in a row against hand-written examples."""
import numpy as np
import pytest

from omnimoe.data import vocab as vocab_lib
from omnimoe.data.config import DataConfig
from omnimoe.data.examples import make_sequence
from omnimoe.data.video_layout import Clock, clip_media, config_problems, ticks

V, A = 4, 3   # modality codes of video and audio


def small_clip(num_frames=2, num_audio=4):
  """Frames of a 1x2 grid (video ids 100 + 10 * frame + patch) and audio frames (ids 200 + j)."""
  vid = np.array([[100 + 10 * f, 101 + 10 * f] for f in range(num_frames)], np.int32)
  vfeat = np.arange(num_frames * 2 * 2, dtype=np.float32).reshape(num_frames, 2, 2) + 1
  aid = 200 + np.arange(num_audio, dtype=np.int32)
  afeat = -np.arange(num_audio * 3, dtype=np.float32).reshape(num_audio, 3) - 1
  return vid, vfeat, aid, afeat


def test_the_worked_example_of_docs_video():
  """docs/video.md: 2 frames at 10 fps, audio frames every 50 ms, t in 100 ms steps, chunks of
  100 ms, after BOS (running index 1) and followed by the text "ok"."""
  vid, vfeat, aid, afeat = small_clip()
  clock = Clock(unit_ms=100, audio_hop_ms=50, step_ms=100, chunk_ms=100)
  media = clip_media(vid, vfeat, (1, 2), aid, afeat, clock, feature_dim=4)
  ex = make_sequence([media, np.array([111, 107])], 4,
                     specials=vocab_lib.Vocab.from_config(DataConfig()))
  # Hand-written: BOS | frame 0 (2 patches), audio 0, 1 | frame 1, audio 2, 3 | "o" "k" EOS
  expected_tokens = [vocab_lib.BOS, 100, 101, 200, 201, 110, 111, 202, 203, 111, 107, vocab_lib.EOS]
  expected_modality = [1, V, V, A, A, V, V, A, A, 1, 1, 1]
  expected_positions = [(0, 0, 0),
                        (1, 1, 1), (1, 1, 2), (1, 1, 1), (1, 1, 1),    # t = 1 + 0
                        (2, 1, 1), (2, 1, 2), (2, 2, 2), (2, 2, 2),    # t = 1 + 1
                        (3, 3, 3), (4, 4, 4), (5, 5, 5)]               # text: 1 + span 2
  np.testing.assert_array_equal(ex.tokens_N, expected_tokens)
  np.testing.assert_array_equal(ex.modality_N, expected_modality)
  np.testing.assert_array_equal(ex.positions_Nx3, expected_positions)
  # Features travel with their token: frame 1's second patch, audio frame 2.
  np.testing.assert_array_equal(ex.features_NxF[6], [7, 8, 0, 0])
  np.testing.assert_array_equal(ex.features_NxF[7], [-7, -8, -9, 0])


def test_longer_chunks_put_all_frames_before_all_audio():
  vid, vfeat, aid, afeat = small_clip()
  clock = Clock(unit_ms=100, audio_hop_ms=50, step_ms=100, chunk_ms=200)
  media = clip_media(vid, vfeat, (1, 2), aid, afeat, clock, feature_dim=4)
  np.testing.assert_array_equal(media.tokens_M, [100, 101, 110, 111, 200, 201, 202, 203])
  np.testing.assert_array_equal(media.positions_Mx3[:, 0], [0, 0, 1, 1, 0, 0, 1, 1])


def test_decoupled_audio_keeps_the_layout_and_its_own_timing_at_a_per_clip_offset():
  vid, vfeat, aid, afeat = small_clip()
  shared = clip_media(vid, vfeat, (1, 2), aid, afeat, Clock(100, 50, 100, 100), 4)
  offsets = []
  for k in range(200):      # clips that differ in one audio code
    a = aid.copy()
    a[0] = 1000 + k
    ref = clip_media(vid, vfeat, (1, 2), a, afeat, Clock(100, 50, 100, 100), 4)
    apart = clip_media(vid, vfeat, (1, 2), a, afeat, Clock(100, 50, 100, 100, decoupled=True), 4)
    again = clip_media(vid, vfeat, (1, 2), a, afeat, Clock(100, 50, 100, 100, decoupled=True), 4)
    np.testing.assert_array_equal(apart.tokens_M, ref.tokens_M)
    np.testing.assert_array_equal(apart.modality, ref.modality)
    np.testing.assert_array_equal(apart.positions_Mx3, again.positions_Mx3)   # the same clip: same
    is_audio = ref.modality == A
    np.testing.assert_array_equal(apart.positions_Mx3[~is_audio], ref.positions_Mx3[~is_audio])
    shift = apart.positions_Mx3[is_audio] - ref.positions_Mx3[is_audio]
    assert np.all(shift == shift[0, 0])          # one offset for the whole track: its timing stays
    offsets.append(int(shift[0, 0]))
    assert apart.span == 1 + int(apart.positions_Mx3.max())
  np.testing.assert_array_equal(ref.positions_Mx3, shared.positions_Mx3)
  # The track has 2 ticks (t 0 and 1): offsets are uniform over 0..3 (200 draws, +-5 SE)
  assert set(offsets) == {0, 1, 2, 3} and all(25 <= offsets.count(d) <= 75 for d in range(4))


def test_the_clock_of_the_default_settings():
  """10 fps, hop 128 samples at 8 kHz (16 ms), t in 100 ms steps: frame f has t = f, and the audio
  frames starting in [100 f, 100 f + 100) ms share it (a loop over exact times as oracle)."""
  clock = Clock.from_config(DataConfig())
  assert clock == Clock(100.0, 16.0, 100.0, 400.0, False)
  audio_t = [int(j * 16 // 100) for j in range(49)]   # integer ms: exact
  np.testing.assert_array_equal(ticks(np.arange(49) * clock.audio_hop_ms, clock.step_ms), audio_t)
  np.testing.assert_array_equal(ticks(np.arange(8) * 100.0, 100.0), np.arange(8))
  # Float rounding never moves a boundary: 0.3 s is step 3.
  assert ticks(np.array([3 * (1000 / 10.0)]), 100.0)[0] == 3
  tubelets = Clock.from_config(DataConfig(video_tubelet=2))
  assert tubelets.unit_ms == 200.0


@pytest.mark.parametrize("key, value", [("video_tubelet", 3), ("video_patch", 3),
                                        ("time_step_ms", 0.0), ("audio_time_ids", "apart"),
                                        ("video_fps", float("nan"))])
def test_bad_video_settings_name_their_key(key, value):
  problems = config_problems(DataConfig(**{key: value}))
  assert [k for k, _ in problems] == [f"data.{key}"]
  assert config_problems(DataConfig()) == []
