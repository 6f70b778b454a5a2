"""Eval data: held-out mixture batches, held-out text for bits per byte, cross-modal prompts."""
import numpy as np
import pytest

from omnimoe import data
from omnimoe.data.builtin import captions
from omnimoe.data.builtin import default_dataset
from omnimoe.data.pipeline import sampler
from omnimoe.data.builtin import text_corpus
from omnimoe.data.config import DataConfig
from omnimoe.data.examples import make_example
from omnimoe.data.vocab import BOS, EOS
from omnimoe.model.modality import AUDIO, IMAGE

CFG = DataConfig()


@pytest.fixture(scope="module")
def ds():
  return default_dataset.build(CFG)


def image_keys(media_list):
  return {m.features_MxF.tobytes() for m in media_list}


def test_eval_batches_deterministic_and_held_out(ds):
  a = data.eval_batches(CFG, batch_size=8, seed=0, num_batches=2)
  b = data.eval_batches(CFG, batch_size=8, seed=0, num_batches=2)
  assert len(a) == 2 and a[0]["tokens"].shape == (8, CFG.seq_len)
  for x, y in zip(a, b):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  heldout, train = image_keys(ds.heldout.images), image_keys(ds.train.images)
  found = 0
  for batch in a:
    for r in range(8):
      segs = batch["segment_ids"][r]
      for seg in np.unique(segs)[1:]:
        where = (segs == seg) & (batch["modality"][r] == IMAGE.code)
        if where.any():
          assert batch["features"][r][where].tobytes() in heldout
          assert batch["features"][r][where].tobytes() not in train
          found += 1
  assert found > 0
  # Eval tones come from their own stream: no eval tone equals a training tone of the same seed.
  train_batch = data.train_iterator(CFG, batch_size=8, seed=0)
  first = next(train_batch)
  train_batch.close()
  train_frames = {f.tobytes() for f in first["features"][first["modality"] == AUDIO.code]}
  eval_frames = {f.tobytes() for f in a[0]["features"][a[0]["modality"] == AUDIO.code]}
  assert eval_frames and not train_frames & eval_frames


def test_heldout_text_covers_every_heldout_byte_once(ds):
  batches = data.heldout_text_batches(CFG, batch_size=16, seed=0)
  docs = text_corpus.documents()
  _, heldout = text_corpus.split_documents(docs, CFG.heldout_fraction)
  total_bytes = sum(len(docs[i]) for i in heldout)
  assert sum(b["loss_weights"].sum() for b in batches) == total_bytes
  text = b"".join(ds.vocab.decode_text(b["tokens"].reshape(-1)) for b in batches)
  assert text == b"".join(docs[i] for i in heldout)
  for batch in batches:
    assert batch["tokens"].shape == (16, CFG.seq_len)
    assert set(np.unique(batch["modality"]).tolist()) <= {0, 1}
    is_byte = ds.vocab.is_text(batch["targets"])
    np.testing.assert_array_equal(batch["loss_weights"], is_byte.astype(np.float32))
    assert not np.any(batch["loss_weights"][batch["targets"] == EOS])
  # EOS marks the end of a document: one per held-out document.
  assert sum((b["tokens"] == EOS).sum() for b in batches) == len(heldout)


@pytest.mark.parametrize("modality", ["image", "audio"])
def test_prompt_set_matches_training_template(ds, modality):
  ps = data.prompt_set(CFG, modality=modality, seed=0, max_new_tokens=6, limit=20)
  n, width = ps.batch["tokens"].shape
  media_len = ds.patches_per_image if modality == "image" else ds.frames_per_tone
  prompt = data.EVAL_PROMPT.encode()
  assert n == 20 and ps.prompt_len == 1 + media_len + len(prompt) and width == ps.prompt_len + 6
  assert set(ps.batch) >= {"tokens", "features", "modality", "segment_ids", "positions"}
  mod = IMAGE.code if modality == "image" else AUDIO.code
  for r in range(n):
    tokens = ps.batch["tokens"][r]
    assert tokens[0] == BOS
    assert np.all(ps.batch["modality"][r, 1:1 + media_len] == mod)
    assert ds.vocab.decode_text(tokens[1 + media_len:ps.prompt_len]) == prompt
    np.testing.assert_array_equal(ps.batch["segment_ids"][r], [1] * ps.prompt_len + [0] * 6)
    assert np.all(tokens[ps.prompt_len:] == 0)
    # The prompt is the prefix of the training example "the digit <answer>" for the same media.
    answer = ps.answers[r]
    assert answer in captions.WORDS
    digit = captions.WORDS.index(answer)
    caption = ds.vocab.encode_text(captions.render(captions.EVAL_TEMPLATE, digit))
    if modality == "image":
      media = ds.heldout.images[r]
    else:
      media = ds.tone(digit, sampler.row_rng(sampler.PROMPT_STREAM, 0, r))
    full = make_example(caption, ds.feature_dim, media)
    np.testing.assert_array_equal(full.tokens_N[:ps.prompt_len], tokens[:ps.prompt_len])
    np.testing.assert_array_equal(full.features_NxF[:ps.prompt_len],
                                  ps.batch["features"][r, :ps.prompt_len])
    np.testing.assert_array_equal(full.positions_Nx3[:ps.prompt_len],
                                  ps.batch["positions"][r, :ps.prompt_len])
    assert full.positions_Nx3[ps.prompt_len, 0] == ps.next_position[r]
  assert ps.next_position.dtype == np.int32 and ps.next_position.shape == (n,)
  last = ps.batch["positions"][:, ps.prompt_len - 1, 0]
  np.testing.assert_array_equal(ps.next_position, last + 1)


def test_prompt_answers_match_labels(ds):
  ps = data.prompt_set(CFG, modality="image", seed=0, max_new_tokens=4)
  assert len(ps.answers) == len(ds.heldout.images)
  assert ps.answers == [captions.WORDS[d] for d in ds.heldout.image_labels]
  tones = data.prompt_set(CFG, modality="audio", seed=0, max_new_tokens=4)
  assert len(tones.answers) == 300
  assert all(tones.answers.count(w) == 30 for w in captions.WORDS)


def test_audio_prompts_are_seeded_fresh_tones(ds):
  a = data.prompt_set(CFG, modality="audio", seed=0, max_new_tokens=2, limit=10)
  b = data.prompt_set(CFG, modality="audio", seed=0, max_new_tokens=2, limit=10)
  c = data.prompt_set(CFG, modality="audio", seed=1, max_new_tokens=2, limit=10)
  np.testing.assert_array_equal(a.batch["features"], b.batch["features"])
  assert not np.array_equal(a.batch["features"], c.batch["features"])
  assert a.answers[:3] == ["zero", "one", "two"]
  it = data.train_iterator(CFG, batch_size=8, seed=0)
  first = next(it)
  it.close()
  train_frames = {f.tobytes() for f in first["features"][first["modality"] == AUDIO.code]}
  prompt_frames = {f.tobytes() for f in a.batch["features"][a.batch["modality"] == AUDIO.code]}
  assert not train_frames & prompt_frames
  with pytest.raises(ValueError, match="modality"):
    data.prompt_set(CFG, modality="video", seed=0, max_new_tokens=2)
