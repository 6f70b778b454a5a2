"""The built-in default dataset as a run sees it: trained from its prepared folders (images, tones,
text), against independent oracles (sklearn's digits patchified here, the documents)."""
import dataclasses

import numpy as np
import pytest
from oracles import patchify_loop
from sklearn.datasets import load_digits

from omnimoe import data
from omnimoe.data.builtin import captions, digits, text_corpus
from omnimoe.data.config import DataConfig
from omnimoe.data.prepare import image_io
from omnimoe.data.vocab import Vocab
from omnimoe.model.modality import AUDIO, IMAGE

CFG = DataConfig()


def image_segments(batch):
  """Patch vectors [M, 16] of every image segment of a batch."""
  for row in range(len(batch["tokens"])):
    for seg in np.unique(batch["segment_ids"][row])[1:]:
      where = (batch["segment_ids"][row] == seg) & (batch["modality"][row] == IMAGE.code)
      if where.any():
        yield batch["features"][row][where][:, :CFG.image_patch ** 2]


def test_dataset_info():
  info = data.dataset_info(CFG, seed=0)
  assert info.feature_dim == max(CFG.image_patch ** 2, CFG.n_mels) == 24
  # [4 specials | 256 bytes | 64 image codes | 64 audio codes | 64 video codes], rounded up to a
  # multiple of 128 (the video codes are there without video: one vocabulary for every mixture).
  assert (CFG.image_codebook, CFG.audio_codebook, CFG.video_codebook) == (64, 64, 64)
  v = info.vocab
  assert (v.text_offset, v.image_offset, v.audio_offset, v.video_offset, v.used_size) == (
      4, 260, 324, 388, 452)
  assert v.size == 512 and v.tokenizer == ""
  assert data.dataset_info(CFG, seed=0) is info   # cached


def test_patchify_row_major():
  image = np.arange(64, dtype=np.float32).reshape(8, 8, 1)
  patches = image_io.patchify(image, 2)
  assert patches.shape == (16, 4)
  np.testing.assert_array_equal(patches[0], [0, 1, 8, 9])     # top-left
  np.testing.assert_array_equal(patches[1], [2, 3, 10, 11])   # next to the right
  np.testing.assert_array_equal(patches[4], [16, 17, 24, 25])  # second patch row
  np.testing.assert_array_equal(patches, patchify_loop(image[:, :, 0], 2))


def _shifted_keys(indices, cfg):
  """Patch bytes of every digit of `indices` (as an 8-bit file holds it) under every shift the
  augmentation may draw."""
  s, images = cfg.image_shift, load_digits().images
  keys = set()
  for i in indices:
    pixels = np.rint(images[i] * 255 / 16).astype(np.float32) / np.float32(255)
    for dy in range(-s, s + 1):
      for dx in range(-s, s + 1):
        keys.add(patchify_loop(image_io.shift(pixels, dy, dx), cfg.image_patch).tobytes())
  return keys


@pytest.mark.parametrize("shift", [0, 1])
def test_heldout_images_never_appear_in_training(shift):
  """Every image segment in training batches is a (shifted) training image as an 8-bit file holds
  it, never a held-out one; with a shift, some are moved."""
  cfg = dataclasses.replace(CFG, image_shift=shift)
  train_idx, heldout_idx = digits.split_indices(1797, cfg.heldout_fraction)
  train, heldout = _shifted_keys(train_idx, cfg), _shifted_keys(heldout_idx, cfg)
  originals = _shifted_keys(train_idx, CFG)
  assert not train & heldout
  it = data.train_iterator(cfg, batch_size=16, seed=0)
  seen, unshifted = 0, 0
  for _ in range(4):
    for patches in image_segments(next(it)):
      key = patches.tobytes()
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


def test_training_batches_use_many_codes_of_each_codebook():
  """The codebooks the folders were prepared with (k-means over their training records) are used
  broadly: most image codes and many audio codes appear in a few training batches."""
  cfg = dataclasses.replace(CFG, image_codebook=32, audio_codebook=48)
  vocab = data.dataset_info(cfg, 0).vocab
  it = data.train_iterator(cfg, batch_size=32, seed=0)
  tokens, modality = [], []
  for _ in range(4):
    batch = next(it)
    tokens.append(batch["tokens"]), modality.append(batch["modality"])
  it.close()
  tokens, modality = np.concatenate(tokens), np.concatenate(modality)
  image = tokens[modality == IMAGE.code] - vocab.image_offset
  audio = tokens[modality == AUDIO.code] - vocab.audio_offset
  assert image.min() >= 0 and image.max() < 32 and len(np.unique(image)) >= 24
  assert audio.min() >= 0 and audio.max() < 48 and len(np.unique(audio)) >= 20


def test_caption_templates():
  for templates in (captions.IMAGE_TEMPLATES, captions.AUDIO_TEMPLATES):
    probs = dict(templates)
    assert probs[captions.EVAL_TEMPLATE] >= 1 / 3
    assert abs(sum(probs.values()) - 1) < 1e-9
  assert captions.render(captions.EVAL_TEMPLATE, 7) == "the digit seven"
  assert captions.render("{digit}, written by hand", 4) == "4, written by hand"
  assert data.EVAL_PROMPT == "the digit "


def test_eval_template_share_in_training_batches():
  """About 40% of the image and of the tone captions start with the eval prompt."""
  vocab = data.dataset_info(CFG, 0).vocab
  it = data.train_iterator(CFG, batch_size=32, seed=1)
  counts = {IMAGE.code: [0, 0], AUDIO.code: [0, 0]}
  for _ in range(4):
    batch = next(it)
    for row in range(32):
      segs = batch["segment_ids"][row]
      for seg in np.unique(segs)[1:]:
        where = segs == seg
        kind = int(batch["modality"][row][where].max())   # image, audio, or text-only
        if kind in counts:
          text = vocab.decode_text(batch["tokens"][row][where])
          counts[kind][0] += text.startswith(data.EVAL_PROMPT.encode())
          counts[kind][1] += 1
  it.close()
  for hits, total in counts.values():
    assert total > 50
    assert 0.25 < hits / total < 0.55


def test_text_documents_deterministic_and_split():
  docs = text_corpus.documents()
  assert docs == text_corpus.documents()
  assert len(docs) == text_corpus.NUM_DOCUMENTS == 320
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


@pytest.mark.parametrize("change, needle", [
    (dict(seq_len=24), "data.seq_len=24 is shorter than the longest image/tone example"),
    (dict(weight_image=0, weight_audio=0, weight_text=0), "data.weight_image/audio/text"),
    (dict(heldout_fraction=0.0), "data.heldout_fraction"),
    (dict(image_shift=-1), "data.image_shift"),
    (dict(tone_seconds=0.01), "data.tone_seconds"),
])
def test_bad_configs_are_refused_in_one_line(change, needle):
  with pytest.raises(ValueError) as e:
    data.dataset_info(dataclasses.replace(CFG, **change), 0)
  assert needle in str(e.value) and "\n" not in str(e.value)
