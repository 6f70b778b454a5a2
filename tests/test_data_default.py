"""The embedded default dataset: splits, patches, codebooks, captions, text documents."""
import dataclasses
import time

import numpy as np
import pytest
from sklearn.datasets import load_digits

from omnimoe import data
from omnimoe.data.builtin import captions
from omnimoe.data.builtin import default_dataset
from omnimoe.data.builtin import digits
from omnimoe.data.prepare import image_io
from omnimoe.data.builtin import text_corpus
from omnimoe.data.config import DataConfig
from omnimoe.data.vocab import Vocab
from omnimoe.model.modality import IMAGE

CFG = DataConfig()


@pytest.fixture(scope="module")
def ds():
  return default_dataset.build(CFG)


def test_dataset_info(ds):
  info = data.dataset_info(CFG, seed=0)
  assert info.feature_dim == max(CFG.image_patch ** 2, CFG.n_mels) == 24
  assert info.vocab.size % 128 == 0
  assert info.vocab == ds.vocab
  assert data.dataset_info(CFG, seed=0) is info   # cached


def test_image_split_is_disjoint_and_complete(ds):
  train, heldout = ds.train.image_indices, ds.heldout.image_indices
  assert not set(train.tolist()) & set(heldout.tolist())
  assert len(train) + len(heldout) == 1797
  assert len(heldout) == round(CFG.heldout_fraction * 1797)
  again_train, again_heldout = digits.split_indices(1797, CFG.heldout_fraction)
  np.testing.assert_array_equal(again_train, train)
  np.testing.assert_array_equal(again_heldout, heldout)


def test_patchify_row_major():
  image = np.arange(64, dtype=np.float32).reshape(1, 8, 8)
  patches = digits.patchify(image, 2)
  assert patches.shape == (1, 16, 4)
  np.testing.assert_array_equal(patches[0, 0], [0, 1, 8, 9])     # top-left
  np.testing.assert_array_equal(patches[0, 1], [2, 3, 10, 11])   # next to the right
  np.testing.assert_array_equal(patches[0, 4], [16, 17, 24, 25])  # second patch row
  with pytest.raises(ValueError, match="image_patch"):
    digits.patchify(image, 3)


def test_image_features_are_8_bit_patches(ds):
  """Pixels are the 8-bit values an image file holds: round(value * 255 / 16) / 255."""
  sk = load_digits().images
  images = np.rint(sk * 255 / 16).astype(np.float32) / np.float32(255)   # as a PNG decodes
  i = 5
  media = ds.train.images[i]
  expected = digits.patchify(images[ds.train.image_indices[i]][None], CFG.image_patch)[0]
  d = CFG.image_patch ** 2
  np.testing.assert_array_equal(media.features_MxF[:, :d], expected)
  # The digit value is recoverable exactly from every pixel.
  np.testing.assert_array_equal(np.rint(np.rint(ds.train.pixels_NxHxW * 255) * 16 / 255),
                                sk[ds.train.image_indices])
  assert np.all(media.features_MxF[:, d:] == 0)
  assert 0.0 <= media.features_MxF.min() and media.features_MxF.max() <= 1.0
  codes = media.tokens_M - ds.vocab.image_offset
  assert codes.min() >= 0 and codes.max() < CFG.image_codebook


def _shifted_keys(split, cfg):
  """Patch bytes of every image of `split` under every shift the augmentation may draw."""
  s = cfg.image_shift
  keys = set()
  for pixels in split.pixels_NxHxW:
    for dy in range(-s, s + 1):
      for dx in range(-s, s + 1):
        keys.add(digits.patchify(image_io.shift(pixels, dy, dx)[None], cfg.image_patch)[0].tobytes())
  return keys


@pytest.mark.parametrize("shift", [0, 1])
def test_heldout_images_never_appear_in_training(shift):
  """Every image segment in training batches is a (shifted) training image, never a held-out one."""
  cfg = dataclasses.replace(CFG, image_shift=shift)
  ds = default_dataset.build(cfg)
  train, heldout = _shifted_keys(ds.train, cfg), _shifted_keys(ds.heldout, cfg)
  assert not train & heldout
  it = data.train_iterator(cfg, batch_size=16, seed=0)
  seen, unshifted = 0, 0
  originals = {m.features_MxF[:, :cfg.image_patch ** 2].tobytes() for m in ds.train.images}
  for _ in range(4):
    batch = next(it)
    for row in range(16):
      for seg in np.unique(batch["segment_ids"][row])[1:]:
        where = (batch["segment_ids"][row] == seg) & (batch["modality"][row] == IMAGE.code)
        if where.any():
          key = batch["features"][row][where][:, :cfg.image_patch ** 2].tobytes()
          assert key in train and key not in heldout
          unshifted += key in originals
          seen += 1
  it.close()
  assert seen > 20
  if shift:
    assert unshifted < seen, "image_shift > 0 but no training image was shifted"
  else:
    assert unshifted == seen


def test_shift_moves_pixels_and_fills_zeros():
  image = np.arange(64, dtype=np.float32).reshape(8, 8) + 1
  moved = image_io.shift(image, 1, -2)
  np.testing.assert_array_equal(moved[1:, :6], image[:7, 2:])
  assert (moved[0] == 0).all() and (moved[:, 6:] == 0).all()
  np.testing.assert_array_equal(image_io.shift(image, 0, 0), image)


def test_codebooks_use_many_codes_and_build_fast():
  start = time.perf_counter()
  ds = default_dataset.build.__wrapped__(DataConfig(image_codebook=32, audio_codebook=48))
  assert time.perf_counter() - start < 5.0
  assert ds.image_codebook_KxD.shape == (32, ds.cfg.image_patch ** 2) and ds.audio_codebook_KxD.shape == (48, 24)
  image_codes = np.concatenate([m.tokens_M for m in ds.train.images]) - ds.vocab.image_offset
  assert len(np.unique(image_codes)) == 32
  rng = np.random.default_rng(0)
  audio_codes = np.concatenate([ds.tone(d % 10, rng).tokens_M for d in range(200)])
  audio_codes -= ds.vocab.audio_offset
  assert audio_codes.min() >= 0 and audio_codes.max() < 48
  assert len(np.unique(audio_codes)) >= 20


def test_tone_media(ds):
  media = ds.tone(7, np.random.default_rng(0))
  assert media.tokens_M.shape == (ds.frames_per_tone,)
  assert media.features_MxF.shape == (ds.frames_per_tone, ds.feature_dim)
  np.testing.assert_array_equal(media.positions_Mx3[:, 0], np.arange(ds.frames_per_tone))


def test_caption_templates():
  for templates in (captions.IMAGE_TEMPLATES, captions.AUDIO_TEMPLATES):
    probs = dict(templates)
    assert probs[captions.EVAL_TEMPLATE] >= 1 / 3
    assert abs(sum(probs.values()) - 1) < 1e-9
  assert captions.render(captions.EVAL_TEMPLATE, 7) == "the digit seven"
  assert captions.render("{digit}, written by hand", 4) == "4, written by hand"
  assert data.EVAL_PROMPT == "the digit "


def test_eval_template_share_in_training_batches(ds):
  """About 40% of the image and of the tone captions start with the eval prompt."""
  it = data.train_iterator(CFG, batch_size=32, seed=1)
  counts = {2: [0, 0], 3: [0, 0]}
  for _ in range(4):
    batch = next(it)
    for row in range(32):
      segs = batch["segment_ids"][row]
      for seg in np.unique(segs)[1:]:
        where = segs == seg
        kind = int(batch["modality"][row][where].max())   # 2 image, 3 audio, 1 text-only
        if kind in counts:
          text = ds.vocab.decode_text(batch["tokens"][row][where])
          counts[kind][0] += text.startswith(data.EVAL_PROMPT.encode())
          counts[kind][1] += 1
  it.close()
  for hits, total in counts.values():
    assert total > 50
    assert 0.25 < hits / total < 0.55


def test_text_documents_deterministic_and_split():
  docs = text_corpus.documents()
  assert docs == text_corpus.documents()
  assert len(docs) > 300
  assert any(b"Beautiful is better than ugly." in d for d in docs)
  assert all(len(d) >= text_corpus.MIN_DOCUMENT_BYTES for d in docs)
  train, heldout = text_corpus.split_documents(docs, 0.2)
  assert not set(train) & set(heldout)
  assert sorted(train + heldout) == list(range(len(docs)))


def test_text_pieces_cover_document():
  doc = bytes(range(250))
  pieces = Vocab.from_config(DataConfig()).text_pieces(doc, 100)
  assert [len(p) for p, _, _ in pieces] == [100, 100, 50]
  assert [last for *_, last in pieces] == [False, False, True]
  assert b"".join(p for p, _, _ in pieces) == doc


def test_bad_configs_are_refused():
  with pytest.raises(ValueError, match="seq_len"):
    default_dataset.build(DataConfig(seq_len=24))
  with pytest.raises(ValueError, match="weight"):
    default_dataset.build(DataConfig(weight_image=0, weight_audio=0, weight_text=0))
  with pytest.raises(ValueError, match="heldout_fraction"):
    default_dataset.build(DataConfig(heldout_fraction=0.0))
