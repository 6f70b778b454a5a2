"""Eval data of the default dataset, all from its prepared folders: held-out batches, held-out text
for bits per byte, cross-modal prompts. Oracles: sklearn's digits and split patchified here, the
documents, the synthesized tones' log-mel frames, codes by a float64 nearest-centre search."""
import numpy as np
import pytest
from oracles import digit_patches
from sklearn.datasets import load_digits

from omnimoe import data
from omnimoe.data.builtin import captions, digits, dtmf, text_corpus
from omnimoe.data.config import DataConfig
from omnimoe.data.pipeline import sources
from omnimoe.data.prepare import log_mel as log_mel_lib
from omnimoe.data.vocab import BOS, EOS
from omnimoe.model.modality import AUDIO, IMAGE, TEXT

CFG = DataConfig()


@pytest.fixture(scope="module")
def split_keys():
  """Patch bytes of the training and of the held-out digit images."""
  train, heldout = digits.split_indices(1797, CFG.heldout_fraction)
  return ({digit_patches(int(i)).tobytes() for i in train},
          {digit_patches(int(i)).tobytes() for i in heldout})


def segments(batch):
  """(row, mask) of every segment of a batch."""
  for r in range(len(batch["tokens"])):
    for seg in np.unique(batch["segment_ids"][r])[1:]:
      yield r, batch["segment_ids"][r] == seg


def test_eval_batches_are_deterministic_held_out_and_mixed(split_keys):
  train_keys, heldout_keys = split_keys
  a = data.eval_batches(CFG, batch_size=8, seed=0, num_batches=2)
  b = data.eval_batches(CFG, batch_size=8, seed=0, num_batches=2)
  assert len(a) == 2 and a[0]["tokens"].shape == (8, CFG.seq_len)
  for x, y in zip(a, b):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  kinds = {IMAGE.code: 0, AUDIO.code: 0, TEXT.code: 0}
  for batch in a:
    for r, where in segments(batch):
      kinds[int(batch["modality"][r][where].max())] += 1
      image = where & (batch["modality"][r] == IMAGE.code)
      if image.any():
        key = batch["features"][r][image][:, :16].tobytes()
        assert key in heldout_keys and key not in train_keys
  assert all(n > 0 for n in kinds.values()), kinds   # images, tones and text, interleaved
  assert kinds[IMAGE.code] > kinds[AUDIO.code] and kinds[IMAGE.code] > kinds[TEXT.code]
  # Held-out tones are not training tones.
  it = data.train_iterator(CFG, batch_size=8, seed=0)
  first = next(it)
  it.close()
  train_frames = {f.tobytes() for f in first["features"][first["modality"] == AUDIO.code]}
  eval_frames = {f.tobytes() for batch in a for f in batch["features"][batch["modality"] == AUDIO.code]}
  assert eval_frames and not train_frames & eval_frames


def test_heldout_text_covers_every_heldout_byte_once():
  vocab = data.dataset_info(CFG, 0).vocab
  batches = data.heldout_text_batches(CFG, batch_size=16, seed=0)
  docs = text_corpus.documents()
  _, heldout = text_corpus.split_documents(docs, CFG.heldout_fraction)
  total_bytes = sum(len(docs[i]) for i in heldout)
  assert sum(b["loss_weights"].sum() for b in batches) == total_bytes
  assert sum(data.heldout_text_bytes(CFG, batch_size=16)) == total_bytes
  text = b"".join(vocab.decode_text(b["tokens"].reshape(-1)) for b in batches)
  assert text == b"".join(docs[i] for i in sorted(heldout))
  for batch in batches:
    assert batch["tokens"].shape == (16, CFG.seq_len)
    assert set(np.unique(batch["modality"]).tolist()) <= {0, 1}
    is_byte = vocab.is_text(batch["targets"])
    np.testing.assert_array_equal(batch["loss_weights"], is_byte.astype(np.float32))
    assert not np.any(batch["loss_weights"][batch["targets"] == EOS])
  # EOS marks the end of a document: one per held-out document.
  assert sum((b["tokens"] == EOS).sum() for b in batches) == len(heldout)


def nearest_codes(x_MxD, book_KxD):
  """Index of the nearest centre of each row, in float64 by a plain loop."""
  out = []
  for x in np.asarray(x_MxD, np.float64):
    out.append(int(np.argmin([np.sum((x - c) ** 2) for c in np.asarray(book_KxD, np.float64)])))
  return np.asarray(out)


def expected_prompt(modality: str, r: int, seed: int):
  """(digit, media features [M, D], media positions [M, 3]) of prompt row r, from first principles:
  the r-th held-out image (sklearn order) or a tone synthesized from the prompt stream."""
  if modality == "image":
    index = int(digits.split_indices(1797, CFG.heldout_fraction)[1][r])
    grid = np.asarray([(0, i // 2, i % 2) for i in range(4)])
    return int(load_digits().target[index]), digit_patches(index), grid + 1
  digit = r % 10
  wave = dtmf.synthesize(digit, np.random.default_rng([2, seed, r]), CFG)
  frames = log_mel_lib.log_mel(wave, CFG)
  j = np.arange(len(frames))[:, None]
  return digit, frames, np.repeat(j, 3, axis=1) + 1


@pytest.mark.parametrize("modality", ["image", "audio"])
def test_prompts_are_the_held_out_media_then_the_eval_prompt(modality):
  mix = sources.resolve(CFG)
  vocab, book = mix.vocab, mix.codebooks[modality]
  offset = vocab.image_offset if modality == "image" else vocab.audio_offset
  ps = data.prompt_set(CFG, modality=modality, seed=3, max_new_tokens=6, limit=20)
  prompt = np.frombuffer(data.EVAL_PROMPT.encode(), np.uint8) + vocab.text_offset
  for r in range(20):
    digit, feats, positions = expected_prompt(modality, r, seed=3)
    m = len(feats)
    assert ps.prompt_len == 1 + m + len(prompt)
    assert ps.answers[r] == captions.WORDS[digit]
    assert ps.expected[r] == f"the digit {captions.WORDS[digit]}".encode()
    tokens = ps.batch["tokens"][r]
    want = np.concatenate([[BOS], nearest_codes(feats, book) + offset, prompt, np.zeros(6)])
    np.testing.assert_array_equal(tokens, want)
    np.testing.assert_array_equal(ps.batch["features"][r, 1:1 + m, :feats.shape[1]], feats)
    assert not ps.batch["features"][r, 1 + m:].any()
    mod = IMAGE.code if modality == "image" else AUDIO.code
    np.testing.assert_array_equal(ps.batch["modality"][r, :ps.prompt_len],
                                  [TEXT.code] + [mod] * m + [TEXT.code] * len(prompt))
    np.testing.assert_array_equal(ps.batch["positions"][r, 1:1 + m], positions)
    text_start = 1 + (2 if modality == "image" else m)
    t = np.arange(text_start, text_start + len(prompt))
    np.testing.assert_array_equal(ps.batch["positions"][r, 1 + m:ps.prompt_len],
                                  np.stack([t, t, t], axis=1))
    assert ps.next_position[r] == text_start + len(prompt)
    np.testing.assert_array_equal(ps.batch["segment_ids"][r], [1] * ps.prompt_len + [0] * 6)


def test_image_prompts_are_every_held_out_image_once():
  ps = data.prompt_set(CFG, modality="image", seed=0, max_new_tokens=4)
  held = digits.split_indices(1797, CFG.heldout_fraction)[1]
  assert ps.answers == [captions.WORDS[d] for d in load_digits().target[held]]
  tones = data.prompt_set(CFG, modality="audio", seed=0, max_new_tokens=4)
  assert len(tones.answers) == 300
  assert all(tones.answers.count(w) == 30 for w in captions.WORDS)


def test_audio_prompts_are_seeded_fresh_tones():
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
