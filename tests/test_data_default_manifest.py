"""The built-in default dataset written as files (data/builtin/files.py) and prepared: oracles.

What comes back out of the prepared folder is checked against what it was made from, computed here
independently (tests/oracles.py): sklearn's digits as 8-bit pixels patchified by loops, the
synthesized tone waveforms' log-mel frames, the text documents cut into byte pieces; bit for bit,
byte for byte, captions in exact proportion.
"""
import collections
import json
import pathlib

import grain
import numpy as np
import pytest
from oracles import byte_pieces, digit_patches
from sklearn.datasets import load_digits

from omnimoe import data
from omnimoe.data.builtin import captions as captions_lib
from omnimoe.data import records
from omnimoe.data.builtin import files as default_manifest
from omnimoe.data.builtin import digits, dtmf
from omnimoe.data.prepare import log_mel as log_mel_lib
from omnimoe.data.prepare import write as prepare
from omnimoe.data.builtin import text_corpus
from omnimoe.data.builtin.captions import WORDS
from omnimoe.data.config import DataConfig, Source
from omnimoe.model.modality import AUDIO, IMAGE

CFG = DataConfig(image_patch=4, image_side=8, image_channels=1, sample_rate=8000, seq_len=128,
                 heldout_fraction=0.2, prefetch=0)   # pinned: the defaults get tuned
TONES = 3        # per digit: 1 held out (round(0.2 * 3))
SEED = 5
IMAGE_COPIES, AUDIO_COPIES = 5, 10   # lines per image (2+1+1+1) and per tone (4+3+3)


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


def _image_index(line) -> int:
  return int(pathlib.PurePosixPath(line["image"]).stem.split("_")[1])


def test_every_line_is_pinned_and_the_card_counts(written):
  w, card, by_kind = written
  docs = len(text_corpus.documents())
  assert (w.images, w.tones, w.documents) == (1797, 30, docs)
  assert w.lines == {"image": 1797 * IMAGE_COPIES, "audio": 30 * AUDIO_COPIES, "text": docs}
  assert card["skipped"]["count"] == 0
  assert card["examples"]["total"] == 1797 * IMAGE_COPIES + 30 * AUDIO_COPIES + docs
  assert card["split_pinned"] == {"train": card["examples"]["train"],
                                  "heldout": card["examples"]["heldout"]}
  assert card["prepared_with"]["image_side"] == 8 and card["prepared_with"]["image_channels"] == 1
  assert w.heldout == {"image": 359 * IMAGE_COPIES, "audio": 10 * AUDIO_COPIES,
                       "text": w.heldout["text"]}


def test_copies_are_the_template_probabilities_exactly():
  assert captions_lib.copies(captions_lib.IMAGE_TEMPLATES) == (2, 1, 1, 1)
  assert captions_lib.copies(captions_lib.AUDIO_TEMPLATES) == (4, 3, 3)
  assert captions_lib.copies((("a", 1 / 3), ("b", 2 / 3))) == (1, 2)
  with pytest.raises(ValueError, match="cannot be repeated exactly"):
    captions_lib.copies((("a", 0.123456), ("b", 0.876544)))
  with pytest.raises(ValueError, match="cannot be repeated exactly"):
    captions_lib.copies((("a", 0.5), ("b", 0.4)))   # does not sum to 1


def test_captions_repeat_each_medium_in_the_template_proportions(written):
  """Every image (tone) has each template's caption exactly copies[t] times, all in one split: a
  uniform draw over the records gives each template exactly its probability."""
  _, _, by_kind = written
  sk = load_digits()
  for kind, templates, copies in (("image", captions_lib.IMAGE_TEMPLATES, IMAGE_COPIES),
                                  ("audio", captions_lib.AUDIO_TEMPLATES, AUDIO_COPIES)):
    per_file = collections.defaultdict(list)
    for line, rec, held in by_kind[kind]:
      per_file[line[kind]].append((rec.parts[1].decode(), held))
    assert all(len(v) == copies for v in per_file.values())
    for name, captions in per_file.items():
      stem = pathlib.PurePosixPath(name).stem.split("_")
      digit = int(sk.target[int(stem[1])]) if kind == "image" else int(stem[1])
      want = {captions_lib.render(t, digit): n
              for (t, _), n in zip(templates, captions_lib.copies(templates))}
      assert collections.Counter(c for c, _ in captions) == want
      assert len({h for _, h in captions}) == 1


def test_image_patches_are_the_digits_8_bit_pixels_bit_for_bit(written):
  """(a) Every prepared patch vector is sklearn's digit as the 8-bit pixel values
  round(value * 255 / 16) / 255 an image file holds, patchified by loops here."""
  _, _, by_kind = written
  assert len(by_kind["image"]) == 1797 * IMAGE_COPIES
  want = {}
  for line, rec, _ in by_kind["image"]:
    i = _image_index(line)
    (part, caption), = [rec.parts]
    assert part.grid == (2, 2) and caption == line["text"].encode()
    if i not in want:
      want[i] = digit_patches(i)
    np.testing.assert_array_equal(part.patches_MxD, want[i])


def test_heldout_images_are_the_fixed_split_and_captions_name_their_digit(written):
  """(b) The held-out images are `digits.split_indices`' (disjoint, complete, 20%, the same every
  time); every caption names its image's digit (sklearn's label)."""
  _, _, by_kind = written
  held = sorted({_image_index(line) for line, _, h in by_kind["image"] if h})
  train = sorted({_image_index(line) for line, _, h in by_kind["image"] if not h})
  want_train, want_held = digits.split_indices(1797, CFG.heldout_fraction)
  assert held == want_held.tolist() and train == want_train.tolist()
  assert len(held) == round(0.2 * 1797) and not set(held) & set(train)
  assert sorted(held + train) == list(range(1797))
  labels = load_digits().target
  for line, _, h in by_kind["image"]:
    digit = int(labels[_image_index(line)])
    assert WORDS[digit] in line["text"] or str(digit) in line["text"]


def test_audio_frames_are_the_synthesized_tones_frames_bit_for_bit(written):
  """(c) Frames read back from the WAV = the log-mel frames of the synthesized waveform, exactly:
  the synthesized tone is on the 16-bit grid and never reaches full scale, so the file holds it
  exactly."""
  _, _, by_kind = written
  assert len(by_kind["audio"]) == 10 * TONES * AUDIO_COPIES
  for line, rec, held in by_kind["audio"]:
    digit, k = (int(x) for x in pathlib.PurePosixPath(line["audio"]).stem.split("_")[1:])
    assert held == (k == TONES - 1)
    (part, caption), = [rec.parts]
    assert caption == line["text"].encode()
    rng = np.random.default_rng([SEED, default_manifest.TONE_STREAM, digit, k])
    want = log_mel_lib.log_mel(dtmf.synthesize(digit, rng, CFG), CFG)
    assert part.frames_MxD.shape == want.shape == (dtmf.num_frames(CFG), CFG.n_mels)
    np.testing.assert_array_equal(part.frames_MxD, want)


def test_no_default_tone_reaches_full_scale():
  """Every tone the default files hold (seed 0, TONES_PER_DIGIT per digit) has headroom: no sample
  is clipped by 16-bit PCM."""
  cfg = DataConfig()
  peak = max(np.abs(default_manifest.tone_waveform(d, k, 0, cfg)).max()
             for d in range(10) for k in range(default_manifest.TONES_PER_DIGIT))
  assert peak < 0.9 < default_manifest.PCM_FULL_SCALE


def test_a_tone_that_would_clip_is_refused():
  loud = np.asarray([0.0, 0.5, -1.0], np.float32)   # -1.0 is on the grid but 1.0 is not: refused
  with pytest.raises(ValueError, match="tone 3 of digit 7 peaks at 1.0000: it would clip"):
    default_manifest.check_headroom(loud, "tone 3 of digit 7")
  default_manifest.check_headroom(np.asarray([0.0, 0.99, -0.99], np.float32), "a quiet tone")


def test_text_round_trips_in_pieces_of_seq_len_minus_2_bytes(written):
  """(d) Each document's records join to its bytes exactly, in pieces of at most seq_len - 2 bytes
  (EOS on the last only), in the fixed document split."""
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
  for name, held in (("train", False), ("heldout", True)):
    want = [piece for j, doc in enumerate(docs) if (j in heldout_docs) == held
            for piece in byte_pieces(doc, CFG.seq_len - 2)]
    assert pieces[name] == want


def test_cli_writes_a_subset_and_a_run_reads_it(tmp_path, capsys):
  default_manifest.main([str(tmp_path / "d"), "--limit", "12", "--tones-per-digit", "1", "--by-kind",
                         "--seed", "3"])
  assert ("12 images, 10 tones, 12 text documents in 60 + 100 + 12 lines"
          in capsys.readouterr().out)
  for name in ("manifest", "images", "tones", "text"):
    assert (tmp_path / "d" / f"{name}.jsonl").is_file()
  lines = (tmp_path / "d" / "manifest.jsonl").read_text().splitlines()
  assert len(lines) == 172 and all('"split": ' in l for l in lines)
  prepare.prepare(tmp_path / "d" / "manifest.jsonl", tmp_path / "out", CFG)
  cfg = DataConfig(**{**CFG.__dict__, "sources": (Source(str(tmp_path / "out")),)})
  it = data.train_iterator(cfg, batch_size=4, seed=0)
  seen = set()
  for _ in range(3):
    seen |= set(np.unique(next(it)["modality"]).tolist())
  assert {IMAGE.code, AUDIO.code} <= seen


def test_same_seed_same_files(tmp_path):
  a = default_manifest.write_default_manifest(tmp_path / "a", tones_per_digit=1, limit=3, seed=1)
  b = default_manifest.write_default_manifest(tmp_path / "b", tones_per_digit=1, limit=3, seed=1)
  assert a.manifest.read_bytes() == b.manifest.read_bytes()
  for rel in ("images/digit_0002.png", "tones/tone_7_000.wav"):
    assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
