"""Clips through the training stream and the eval sets; a checkpoint from before video is refused."""
import dataclasses
import types

import jax
import numpy as np
import pytest

from omnimoe import data
from omnimoe.data.builtin.clip_files import write_clips
from omnimoe.data.config import DataConfig, Source
from omnimoe.data.prepare import write as prepare
from omnimoe.train.checkpoint import Checkpoints
from omnimoe.train.config import ConfigError

CFG = DataConfig(video_patch=8, seq_len=128, heldout_fraction=0.25, prefetch=0)


@pytest.fixture(scope="module")
def clips_cfg(tmp_path_factory):
  root = tmp_path_factory.mktemp("clips")
  prepare.prepare(write_clips(root / "files", CFG, clips=12), root / "clips", CFG)
  return dataclasses.replace(CFG, sources=(Source(str(root / "clips"), 1.0),))


def test_training_batches_hold_whole_clips_on_the_clock(clips_cfg):
  batch = next(data.train_iterator(clips_cfg, batch_size=4, seed=0))
  mod, seg, pos = batch["modality"], batch["segment_ids"], batch["positions"]
  assert (mod == 4).any() and (mod == 3).any()
  for b in range(4):
    for s in set(seg[b][seg[b] > 0].tolist()):
      at = np.flatnonzero(seg[b] == s)
      video, audio = at[mod[b, at] == 4], at[mod[b, at] == 3]
      assert len(video) == 32 and len(audio) == 49    # the clip is whole in its segment
      # One clock: frame f (4 patches) at t = 1 + f; audio frame j at 1 + floor(16 j / 100).
      np.testing.assert_array_equal(pos[b, video, 0], 1 + np.repeat(np.arange(8), 4))
      np.testing.assert_array_equal(pos[b, audio, 0], 1 + np.arange(49) * 16 // 100)
      # Chunks of 400 ms: frames 0-3, the audio of 0-400 ms, frames 4-7, the rest of the audio.
      kinds = mod[b, at[1:1 + 81]].tolist()
      assert kinds == [4] * 16 + [3] * 25 + [4] * 16 + [3] * 24
  assert batch["loss_weights"][mod == 4].max() <= 1.0


def digit_centre(features: np.ndarray, modality: np.ndarray, frame: int):
  """The digit's centre (y, x) in one frame, from the row's video features (oracle: the pixels)."""
  video = features[modality == 4][4 * frame:4 * frame + 4, :64]     # 4 patches of 8x8
  canvas = np.zeros((16, 16))
  for m, (r, c) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
    canvas[8 * r:8 * r + 8, 8 * c:8 * c + 8] = video[m].reshape(8, 8)
  ys, xs = np.nonzero(canvas > 0.05)
  return ys.mean(), xs.mean()


def test_eval_sets_ask_the_right_questions_and_the_controls_drop_a_modality(clips_cfg):
  sets = data.video_prompt_sets(clips_cfg, seed=0, limit=8)
  assert set(sets) == {"video", "sync", "sync_audio_only", "sync_video_only"}
  v, s = sets["video"], sets["sync"]
  assert [e.decode() for e in s.expected] == ["in sync? yes", "in sync? no"] * 4
  assert data.Vocab.from_config(CFG).decode_text(v.prompt_ids) == b"the digit "
  for i, expected in enumerate(v.expected):
    # The caption's direction is the digit's first move, read from the pixels of frames 0 and 1.
    y0, x0 = digit_centre(v.batch["features"][i], v.batch["modality"][i], 0)
    y1, x1 = digit_centre(v.batch["features"][i], v.batch["modality"][i], 1)
    dy, dx = y1 - y0, x1 - x0
    seen = ("down" if dy > 0 else "up") if abs(dy) > abs(dx) else ("right" if dx > 0 else "left")
    assert expected.decode().endswith(f"moves {seen}")
  audio_only, video_only = sets["sync_audio_only"].batch, sets["sync_video_only"].batch
  assert not (audio_only["modality"] == 4).any() and (audio_only["modality"] == 3).any()
  assert not (video_only["modality"] == 3).any() and (video_only["modality"] == 4).any()
  np.testing.assert_array_equal(  # the same clips: the sound of the audio-only rows is the full's
      audio_only["features"][audio_only["modality"] == 3], s.batch["features"][s.batch["modality"] == 3])


def test_a_checkpoint_from_before_video_is_refused_in_one_line(tmp_path):
  old = {"params": {"embed": {"proj_MxFxD": np.zeros((2, 4, 8), np.float32)}}}
  ckpts = Checkpoints(tmp_path / "ckpt", keep=1, async_save=False)
  ckpts.save(5, old, {"next_example": 0})
  ckpts.wait()
  now = {"params": {"embed": {"proj_MxFxD": jax.ShapeDtypeStruct((3, 4, 8), np.float32)}}}
  setup = types.SimpleNamespace(abstract_state=now, shardings=jax.tree.map(lambda _: None, now))
  with pytest.raises(ConfigError, match="embedders for 2 media; this omnimoe has 3"):
    ckpts.restore(5, setup)
  ckpts.close()


def test_sync_is_scored_by_a_forced_choice_between_yes_and_no():
  from omnimoe.train.video_eval import choice_accuracy
  vocab = data.Vocab.from_config(CFG)
  y, n = int(vocab.encode_text("y")[0]), int(vocab.encode_text("n")[0])
  logits = np.zeros((4, vocab.size), np.float32)
  logits[:, 7] = 9.0                      # another token is the argmax: a forced choice ignores it
  logits[[0, 1], y], logits[[0, 1], n] = 2.0, 1.0     # rows 0, 1 say yes
  logits[[2, 3], y], logits[[2, 3], n] = 1.0, 3.0     # rows 2, 3 say no
  prompts = types.SimpleNamespace(batch={"tokens": np.zeros((4, 3), np.int32)},
                                  expected=(b"in sync? yes", b"in sync? no", b"in sync? no",
                                            b"in sync? yes"))
  got = choice_accuracy(lambda params, batch, router: logits, None, prompts, vocab)
  assert got == 0.5                       # rows 0 and 2 right, 1 and 3 wrong
