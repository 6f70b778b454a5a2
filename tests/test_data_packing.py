"""Packing invariants, checked against an independent walk over each row (the oracle)."""
import numpy as np
import pytest

from omnimoe import data
from omnimoe.data.pipeline import first_fit, mixture
from omnimoe.data.config import DataConfig
from omnimoe.data.examples import audio_media, image_media, make_example
from omnimoe.data.packing import pack
from omnimoe.data.packing import loss_weight_table
from omnimoe.data.vocab import BOS, EOS, Vocab
from omnimoe.model.modality import AUDIO, IMAGE, TEXT

BYTES = Vocab.from_config(DataConfig())   # byte-level text: PAD 0, BOS 1, EOS 2
# Mixture pinned (not the tuned defaults) so every modality fills a fair share of the rows.
CFG = DataConfig(loss_weight_text=1.0, loss_weight_image=0.5, loss_weight_audio=2.0,
                 weight_image=0.4, weight_audio=0.4, weight_text=0.2)


@pytest.fixture(scope="module")
def vocab():
  return data.dataset_info(CFG, 0).vocab


@pytest.fixture(scope="module")
def stream():
  """The training stream's global batches (one host): batch 5 and the rows it was planned from."""
  batches = mixture.MixedBatches(CFG, batch_size=24, seed=3, process_index=0, process_count=1)
  start = 0
  for _ in range(5):
    start = batches.plan(start)[1]
  rows, _ = batches.plan(start)
  it = iter(batches)
  it.set_state({"next_example": start})
  return batches, rows, next(it)


@pytest.fixture(scope="module")
def batch(stream):
  return stream[2]


def oracle_positions(modality_L, segment_ids_L, grid):
  """Positions per the contract table, from modality and segment ids alone."""
  rows, cols = grid
  out = np.zeros((len(modality_L), 3), np.int32)
  i = 0
  while i < len(modality_L) and segment_ids_L[i] > 0:
    start, s = i, 0
    while i < len(modality_L) and segment_ids_L[i] == segment_ids_L[start]:
      m = modality_L[i]
      if m == IMAGE.code:
        for k in range(rows * cols):
          r, c = divmod(k, cols)
          out[i + k] = (s, s + r, s + c)
        i, s = i + rows * cols, s + max(rows, cols)
      elif m == AUDIO.code:
        j = i
        while (j < len(modality_L) and modality_L[j] == AUDIO.code
               and segment_ids_L[j] == segment_ids_L[i]):
          out[j] = s + (j - i)
          j += 1
        i, s = j, s + (j - i)
      else:
        out[i] = s
        i, s = i + 1, s + 1
  return out


def test_pack_small_example_by_hand():
  f = 4
  text = make_example(np.array([10, 11], np.int32), f, specials=BYTES)                     # BOS a b EOS
  img = image_media(np.array([300, 301, 302, 303]), np.ones((4, 4), np.float32), (2, 2), f)
  with_image = make_example(np.array([12], np.int32), f, img, specials=BYTES)                # BOS 4 patches c EOS
  out = pack([[text, with_image]], seq_len=12, feature_dim=f,
             loss_weight_by_modality=np.array([0, 1.0, 0.5, 2.0], np.float32))
  np.testing.assert_array_equal(out["tokens"][0],
                                [BOS, 10, 11, EOS, BOS, 300, 301, 302, 303, 12, EOS, 0])
  np.testing.assert_array_equal(out["segment_ids"][0], [1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 0])
  np.testing.assert_array_equal(out["modality"][0], [1, 1, 1, 1, 1, 2, 2, 2, 2, 1, 1, 0])
  np.testing.assert_array_equal(out["targets"][0],
                                [10, 11, EOS, 0, 300, 301, 302, 303, 12, EOS, 0, 0])
  np.testing.assert_array_equal(out["loss_weights"][0],
                                [1, 1, 1, 0, .5, .5, .5, .5, 1, 1, 0, 0])
  np.testing.assert_array_equal(out["positions"][0, :, 0], [0, 1, 2, 3, 0, 1, 1, 1, 1, 3, 4, 0])
  np.testing.assert_array_equal(out["positions"][0, :, 1], [0, 1, 2, 3, 0, 1, 1, 2, 2, 3, 4, 0])
  np.testing.assert_array_equal(out["positions"][0, :, 2], [0, 1, 2, 3, 0, 1, 2, 1, 2, 3, 4, 0])
  assert np.all(out["features"][0, 5:9] == 1) and np.all(out["features"][0, :5] == 0)


def test_audio_positions_by_hand():
  audio = audio_media(np.array([400, 401, 402]), np.ones((3, 2), np.float32), 4)
  ex = make_example(np.array([20], np.int32), 4, audio, specials=BYTES)
  np.testing.assert_array_equal(ex.positions_Nx3[:, 0], [0, 1, 2, 3, 4, 5])
  np.testing.assert_array_equal(ex.positions_Nx3[:, 1], ex.positions_Nx3[:, 0])
  np.testing.assert_array_equal(ex.modality_N, [1, 3, 3, 3, 1, 1])


def test_pack_refuses_overflow():
  ex = make_example(np.arange(10, 20, dtype=np.int32), 4, specials=BYTES)
  with pytest.raises(ValueError, match="do not fit"):
    pack([[ex, ex]], seq_len=20, feature_dim=4, loss_weight_by_modality=np.ones(4, np.float32))


def test_no_example_token_lost_or_duplicated(stream):
  """Each row is exactly its planned examples back to back, then padding."""
  batches, rows, batch = stream
  for row in range(24):
    examples = [batches.builder.example(item) for item in rows[row]]
    tokens = np.concatenate([e.tokens_N for e in examples])
    n = len(tokens)
    np.testing.assert_array_equal(batch["tokens"][row, :n], tokens)
    np.testing.assert_array_equal(batch["features"][row, :n],
                                  np.concatenate([e.features_NxF for e in examples]))
    assert np.all(batch["tokens"][row, n:] == 0) and np.all(batch["segment_ids"][row, n:] == 0)
    assert batch["segment_ids"][row, n - 1] == len(examples)


def test_segments_contiguous_and_start_with_bos(batch):
  for row in batch["segment_ids"]:
    used = row[row > 0]
    assert np.all(np.diff(used) >= 0) and np.all(np.diff(used) <= 1) and used[0] == 1
    assert np.all(row[len(used):] == 0)               # padding only at the end
  starts = np.zeros_like(batch["segment_ids"], bool)
  starts[:, 0] = batch["segment_ids"][:, 0] > 0
  starts[:, 1:] = batch["segment_ids"][:, 1:] != batch["segment_ids"][:, :-1]
  starts &= batch["segment_ids"] > 0
  assert np.all(batch["tokens"][starts] == BOS)
  assert np.sum(batch["tokens"] == BOS) == starts.sum()


def test_targets_and_loss_weights(batch):
  seg, tok, tgt, w = batch["segment_ids"], batch["tokens"], batch["targets"], batch["loss_weights"]
  for r in range(seg.shape[0]):
    for i in range(seg.shape[1]):
      has_next = i + 1 < seg.shape[1] and seg[r, i] > 0 and seg[r, i + 1] == seg[r, i]
      if has_next:
        assert tgt[r, i] == tok[r, i + 1]
        expected = {TEXT.code: 1.0, IMAGE.code: 0.5, AUDIO.code: 2.0}[batch["modality"][r, i + 1]]
        assert w[r, i] == expected
      else:
        assert tgt[r, i] == 0 and w[r, i] == 0


def test_positions_follow_contract(batch):
  for r in range(batch["tokens"].shape[0]):
    expected = oracle_positions(batch["modality"][r], batch["segment_ids"][r], (2, 2))
    np.testing.assert_array_equal(batch["positions"][r], expected)


def test_features_zero_on_text_and_modality_matches_vocab(vocab, batch):
  text_like = batch["modality"] <= TEXT.code
  assert np.all(batch["features"][text_like] == 0)
  assert np.all(np.abs(batch["features"][batch["modality"] == AUDIO.code]).sum(-1) > 0)
  assert batch["features"][batch["modality"] == IMAGE.code].max() > 0.5   # (blank patches exist)
  from_vocab = vocab.modality_of(batch["tokens"], specials_as_text=True)
  np.testing.assert_array_equal(batch["modality"], from_vocab)


def test_rows_are_well_filled_and_mixed(vocab, batch):
  """Under 10% padding (first fit), and the examples' kinds in about the mixture's shares
  (0.4 / 0.4 / 0.2 of examples: text pieces are whole, so text holds most of the tokens)."""
  assert (batch["segment_ids"] == 0).mean() < 0.1
  kinds = []
  for seg_L, mod_L in zip(batch["segment_ids"], batch["modality"]):
    for s in range(1, seg_L.max() + 1):
      mods = set(mod_L[seg_L == s].tolist())
      kinds.append(IMAGE.code if IMAGE.code in mods else AUDIO.code if AUDIO.code in mods else TEXT.code)
  shares = {m: kinds.count(m) / len(kinds) for m in (IMAGE.code, AUDIO.code, TEXT.code)}
  assert len(kinds) >= 60
  for m, want in ((IMAGE.code, 0.4), (AUDIO.code, 0.4), (TEXT.code, 0.2)):
    assert abs(shares[m] - want) < 0.15, shares
  assert np.all(batch["tokens"] < vocab.used_size)


def test_loss_weight_table():
  np.testing.assert_array_equal(loss_weight_table(CFG), [0.0, 1.0, 0.5, 2.0, 0.0])   # video: 0


def test_plan_rows_is_first_fit():
  """`first_fit.plan_rows` (a max segment tree over the rows' room) places every item where a plain
  scan for the first row with room would, and stops at the same item."""
  def scan(items, seq_len, num_rows):
    rows, room, consumed = [[] for _ in range(num_rows)], [seq_len] * num_rows, 0
    for item in items:
      r = next((r for r in range(num_rows) if room[r] >= item.length), None)
      if r is None:
        break
      rows[r].append(item)
      room[r] -= item.length
      consumed += 1
    return [row for row in rows if row], consumed

  rng = np.random.default_rng(0)
  for _ in range(200):
    num_rows, seq_len = int(rng.integers(1, 40)), int(rng.integers(8, 130))
    items = [mixture.Item(0, i, int(rng.integers(1, seq_len + 1)))
             for i in range(int(rng.integers(0, 400)))]
    assert first_fit.plan_rows(iter(items), seq_len, num_rows) == scan(items, seq_len, num_rows)


def test_an_example_without_image_loss_weighs_its_image_codes_zero():
  """data.image_loss=caption_first: an image-first example keeps its text loss and loses its
  image codes' loss; a caption-first one keeps both (counted by hand on one row)."""
  table = loss_weight_table(CFG)                       # text 1.0, image 0.5, audio 2.0
  grid = (2, 2)
  image = image_media(np.arange(4, dtype=np.int32) + 300, np.ones((4, 3), np.float32), grid, 3)
  text = np.asarray([10, 11, 12], np.int32)
  plain = make_example(text, 3, image, specials=BYTES)                 # BOS img img img img t t t EOS: 9 tokens
  quiet = plain._replace(image_loss=False)
  batch = pack([[plain, quiet]], 20, 3, table)
  w = batch["loss_weights"][0]
  # targets of positions 0..3 are image codes (0.5 each, or 0), 4..7 text/EOS (1.0), 8 none
  np.testing.assert_array_equal(w[:9], [0.5] * 4 + [1.0] * 4 + [0.0])
  np.testing.assert_array_equal(w[9:18], [0.0] * 4 + [1.0] * 4 + [0.0])
  np.testing.assert_array_equal(w[18:], 0.0)


def test_caption_first_only_keeps_image_loss_on_the_flipped_records():
  cfg = DataConfig(caption_first=0.5, loss_weight_image=1.0, image_loss="caption_first")
  builder = mixture.MixedBatches(cfg, batch_size=8, seed=0, process_index=0,
                                 process_count=1).builder
  seen = set()
  for position in range(40):
    item = builder.item(0, position % 20, position)
    example = builder.example(item)
    if not (example.modality_N == IMAGE.code).any():
      continue
    first_image = int(np.flatnonzero(example.modality_N == IMAGE.code)[0])
    caption_first = first_image > 1                     # text between BOS and the image
    assert example.image_loss == caption_first
    seen.add(caption_first)
  assert seen == {True, False}
