"""The embedded default dataset written as files (data/default_manifest.py) and prepared: oracles.

What comes back out of the prepared folder is checked against the embedded dataset itself
(data/default_dataset.py, data/digits.py, data/text_corpus.py) and against log-mel frames computed
here from the same synthesized waveforms.
"""
import json
import pathlib

import grain
import numpy as np
import pytest
from sklearn.datasets import load_digits

import data
from data import default_dataset, default_manifest, dtmf, prepare, records, text_corpus
from data.captions import WORDS
from data.config import DataConfig, Source
from data.vocab import MOD_AUDIO, MOD_IMAGE

CFG = DataConfig(image_patch=4, image_side=8, image_channels=1, sample_rate=8000, seq_len=128,
                 heldout_fraction=0.2, prefetch=0)   # pinned: the defaults get tuned
TONES = 3        # per digit: 1 held out (round(0.2 * 3))
SEED = 5


@pytest.fixture(scope="module")
def written(tmp_path_factory):
  """Every digit image, 3 tones per digit and every text document, written and prepared."""
  folder = tmp_path_factory.mktemp("default")
  w = default_manifest.write_default_manifest(folder / "files", tones_per_digit=TONES, seed=SEED,
                                              cfg=CFG)
  prepare.prepare(w.manifest, folder / "out", CFG)
  card = json.loads((folder / "out" / "card.json").read_text())
  source = grain.sources.ArrayRecordDataSource([str(folder / "out" / s) for s in card["shards"]])
  recs = [records.decode(source[i]) for i in range(len(source))]
  heldout = np.load(folder / "out" / "index.npz")["heldout"]
  lines = [json.loads(l) for l in w.manifest.read_text(encoding="utf-8").splitlines()]
  by_kind = {"image": [], "audio": [], "text": []}
  for rec, held in zip(recs, heldout):   # (manifest line, record, held out) by kind
    line = lines[rec.line - 1]
    kind = "image" if "image" in line else "audio" if "audio" in line else "text"
    by_kind[kind].append((line, rec, bool(held)))
  return w, card, by_kind


@pytest.fixture(scope="module")
def embedded():
  return default_dataset.build(CFG)


def _image_index(line) -> int:
  return int(pathlib.PurePosixPath(line["image"]).stem.split("_")[1])


def test_every_line_is_pinned_and_the_card_counts(written):
  w, card, by_kind = written
  assert (w.images, w.tones, w.documents) == (1797, 30, len(text_corpus.documents()))
  assert card["skipped"]["count"] == 0
  assert card["examples"]["total"] == 1797 + 30 + w.documents
  assert card["split_pinned"] == {"train": card["examples"]["train"],
                                  "heldout": card["examples"]["heldout"]}
  assert card["prepared_with"]["image_side"] == 8 and card["prepared_with"]["image_channels"] == 1
  assert w.heldout == {"image": 359, "audio": 10, "text": w.heldout["text"]}


def test_image_patches_are_the_embedded_pixels_through_8_bits(written, embedded):
  """(a) Every prepared patch vector is the embedded one as an 8-bit image holds it: the byte
  nearest value/16 over 255, bit for bit; the embedded float comes back exactly from it."""
  _, _, by_kind = written
  sk = load_digits()
  patches = {}
  for split in (embedded.train, embedded.heldout):
    for i, media in zip(split.image_indices, split.images):
      patches[int(i)] = media.features_MxF[:, :16]
  assert len(by_kind["image"]) == 1797
  for line, rec, _ in by_kind["image"]:
    i = _image_index(line)
    (part, caption), = [rec.parts]
    assert part.grid == (2, 2) and caption == line["text"].encode()
    got, want = part.patches_MxD, patches[i]
    # What image_io decodes from the PNG byte round(v * 255 / 16), computed here from sklearn's ints.
    byte = np.rint(sk.images[i] * 255 / 16).astype(np.float32)
    np.testing.assert_array_equal(got, _patchify(byte / np.float32(255)))
    # Lossless in the digit value: the embedded float is recovered exactly.
    np.testing.assert_array_equal(
        (np.rint(np.rint(got * 255) * 16 / 255) / 16).astype(np.float32), want)
    assert np.abs(got - want).max() <= 0.5 / 255 + 1e-7


def _patchify(pixels_HxW):
  return pixels_HxW.reshape(2, 4, 2, 4).transpose(0, 2, 1, 3).reshape(4, 16)


def test_heldout_images_are_exactly_the_embedded_heldout_images(written, embedded):
  """(b)"""
  _, _, by_kind = written
  held = sorted(_image_index(line) for line, _, h in by_kind["image"] if h)
  train = sorted(_image_index(line) for line, _, h in by_kind["image"] if not h)
  assert held == sorted(embedded.heldout.image_indices.tolist())
  assert train == sorted(embedded.train.image_indices.tolist())
  labels = dict(zip(embedded.heldout.image_indices.tolist(), embedded.heldout.image_labels.tolist()))
  for line, _, h in by_kind["image"]:
    if h:   # the caption names the digit of that image
      digit = labels[_image_index(line)]
      assert WORDS[digit] in line["text"] or str(digit) in line["text"]


def test_audio_frames_are_the_log_mel_of_the_16_bit_waveform(written, embedded):
  """(c) Frames read back = log-mel of the synthesized waveform rounded to 16-bit PCM, exactly."""
  _, _, by_kind = written
  assert len(by_kind["audio"]) == 10 * TONES
  for line, rec, held in by_kind["audio"]:
    digit, k = (int(x) for x in pathlib.PurePosixPath(line["audio"]).stem.split("_")[1:])
    assert held == (k == TONES - 1)
    wave = default_manifest.tone_waveform(digit, k, SEED, CFG)
    # The same draw the embedded dataset makes from the same generator state:
    rng = np.random.default_rng([SEED, default_manifest.TONE_STREAM, digit, k])
    np.testing.assert_array_equal(wave, dtmf.synthesize(digit, rng, CFG))
    pcm = np.clip(np.rint(wave.astype(np.float64) * 32768), -32768, 32767) / 32768
    (part, caption), = [rec.parts]
    assert part.frames_MxD.shape == (embedded.frames_per_tone, CFG.n_mels)
    np.testing.assert_array_equal(part.frames_MxD, dtmf.log_mel(pcm.astype(np.float32), CFG))
    assert caption == line["text"].encode()
    # Rounding to 1/32768 is small next to the features' scale (about N(0, 1)); what 16-bit PCM
    # changes beyond that is clipping at full scale (loud tones peak above 1: up to ~0.5 here).
    clipped = np.clip(wave.astype(np.float64), -1, 32767 / 32768).astype(np.float32)
    assert np.abs(part.frames_MxD - dtmf.log_mel(clipped, CFG)).max() < 2e-3


def test_text_round_trips_and_matches_the_embedded_pieces(written, embedded):
  """(d) Each document's records join to its bytes exactly; the pieces and the split are the
  embedded text stream's."""
  _, _, by_kind = written
  docs = text_corpus.documents()
  _, heldout_docs = text_corpus.split_documents(docs, CFG.heldout_fraction)
  got = {}
  for line, rec, held in by_kind["text"]:
    got.setdefault(rec.line, []).append((rec.parts[0], rec.eos, held))
  assert len(got) == len(docs)
  pieces = {"train": [], "heldout": []}
  for j, (line_no, recs) in enumerate(sorted(got.items())):
    assert b"".join(p for p, _, _ in recs) == docs[j]
    assert [eos for _, eos, _ in recs] == [False] * (len(recs) - 1) + [True]
    assert {h for _, _, h in recs} == {j in heldout_docs}
    pieces["heldout" if j in heldout_docs else "train"] += [(p, eos) for p, eos, _ in recs]
  for name, split in (("train", embedded.train), ("heldout", embedded.heldout)):
    want = [(embedded.vocab.decode_text(ids), eos) for ids, eos in split.text_pieces]
    assert pieces[name] == want


def test_cli_writes_a_subset_and_a_run_reads_it(tmp_path, capsys):
  default_manifest.main([str(tmp_path / "d"), "--limit", "12", "--tones-per-digit", "1", "--by-kind",
                         "--seed", "3"])
  assert "12 images, 10 tones, 12 text documents" in capsys.readouterr().out
  for name in ("manifest", "images", "tones", "text"):
    assert (tmp_path / "d" / f"{name}.jsonl").is_file()
  lines = (tmp_path / "d" / "manifest.jsonl").read_text().splitlines()
  assert len(lines) == 34 and all('"split": ' in l for l in lines)
  prepare.prepare(tmp_path / "d" / "manifest.jsonl", tmp_path / "out", CFG)
  cfg = DataConfig(**{**CFG.__dict__, "sources": (Source(str(tmp_path / "out")),)})
  it = data.train_iterator(cfg, batch_size=4, seed=0)
  seen = set()
  for _ in range(3):
    seen |= set(np.unique(next(it)["modality"]).tolist())
  assert {MOD_IMAGE, MOD_AUDIO} <= seen


def test_same_seed_same_files(tmp_path):
  a = default_manifest.write_default_manifest(tmp_path / "a", tones_per_digit=1, limit=3, seed=1)
  b = default_manifest.write_default_manifest(tmp_path / "b", tones_per_digit=1, limit=3, seed=1)
  assert a.manifest.read_bytes() == b.manifest.read_bytes()
  for rel in ("images/digit_0002.png", "tones/tone_7_000.wav"):
    assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
