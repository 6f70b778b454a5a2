"""data/builtin/cache.py: the default dataset as three cached prepared folders.

The full build is checked against what it is made from, computed here (tests/oracles.py: sklearn's
digits patchified by loops, the documents cut into byte pieces): records per split, patches bit for
bit, caption counts exactly. Small builds (`limit`) check the cache: hits, keys, concurrent builds,
broken folders.
"""
import collections
import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import threading

import numpy as np
import pytest
from oracles import byte_pieces, digit_patches
from sklearn.datasets import load_digits

from omnimoe.data.builtin import captions as captions_lib
from omnimoe.data.builtin import digits, text_corpus
from omnimoe.data.builtin import files as default_manifest
from omnimoe.data.builtin import cache as default_prepared
from omnimoe.data.prepare import write as prepare
from omnimoe.data.prepare import folder as prepared
from omnimoe.data.config import DataConfig

CFG = DataConfig(image_patch=4, image_side=8, image_channels=1, sample_rate=8000, seq_len=128,
                 heldout_fraction=0.2, prefetch=0)   # pinned: the defaults get tuned
SMALL = {"tones_per_digit": 2, "limit": 3}          # a quick build for the cache tests
REPO = pathlib.Path(__file__).resolve().parents[1]


def _records(folder: pathlib.Path, split: str):
  f = prepared.open_folder(folder)
  return [f.record(int(i)) for i in (f.train_ids if split == "train" else f.heldout_ids)]


def _expected_captions(templates, digits) -> collections.Counter:
  want = collections.Counter()
  for d in digits:
    for (t, _), n in zip(templates, captions_lib.copies(templates)):
      want[captions_lib.render(t, int(d))] += n
  return want


@pytest.fixture(scope="module")
def full(tmp_path_factory):
  cache = tmp_path_factory.mktemp("cache")
  return default_prepared.ensure(CFG, cache)


def test_full_build_returns_three_folders_with_the_config_weights(full):
  folders = full
  assert [p.name for p, _ in folders] == ["images", "tones", "text"]
  assert [w for _, w in folders] == [CFG.weight_image, CFG.weight_audio, CFG.weight_text]
  for path, _ in folders:
    prepared.check_matches(prepared.open_folder(path), CFG, str(path))


def test_image_records_are_the_split_digits_with_exact_caption_counts(full):
  (images, _), _, _ = full
  labels = load_digits().target
  for split, indices in zip(("train", "heldout"), digits.split_indices(1797, CFG.heldout_fraction)):
    recs = _records(images, split)
    assert len(recs) == 5 * len(indices)
    got = collections.Counter(r.parts[0].patches_MxD.tobytes() for r in recs)
    want = collections.Counter(digit_patches(int(i)).tobytes() for i in indices for _ in range(5))
    assert got == want   # bit-identical patches, five copies of each, in the fixed split
    captions = collections.Counter(r.parts[1].decode() for r in recs)
    assert captions == _expected_captions(captions_lib.IMAGE_TEMPLATES, labels[indices])


def test_tone_records_per_digit_and_caption_counts(full):
  _, (tones, _), _ = full
  n = default_manifest.TONES_PER_DIGIT
  held = default_manifest.heldout_tones(n, CFG.heldout_fraction)
  for split, per_digit in (("train", n - held), ("heldout", held)):
    recs = _records(tones, split)
    assert len(recs) == 10 * per_digit * 10   # 10 digits, 10 caption lines per tone
    captions = collections.Counter(r.parts[1].decode() for r in recs)
    assert captions == _expected_captions(captions_lib.AUDIO_TEMPLATES,
                                          np.repeat(np.arange(10), per_digit))
    distinct = {r.parts[0].frames_MxD.tobytes() for r in recs}
    assert len(distinct) == 10 * per_digit


def test_text_records_are_the_documents_in_pieces(full):
  _, _, (text, _) = full
  docs = text_corpus.documents()
  for split, idx in zip(("train", "heldout"),
                        text_corpus.split_documents(docs, CFG.heldout_fraction)):
    got = [(r.parts[0], r.eos) for r in _records(text, split)]
    assert got == [piece for j in sorted(idx) for piece in byte_pieces(docs[j], CFG.seq_len - 2)]


def test_second_call_is_a_cache_hit(tmp_path, monkeypatch):
  first = default_prepared.ensure(CFG, tmp_path, **SMALL)
  stamps = [(p / "card.json").stat().st_mtime_ns for p, _ in first]

  def no_rebuild(*args, **kwargs):
    raise AssertionError("prepared again: the cache was not used")
  monkeypatch.setattr(prepare, "prepare", no_rebuild)
  again = default_prepared.ensure(CFG, tmp_path, **SMALL)
  assert again == first
  assert [(p / "card.json").stat().st_mtime_ns for p, _ in again] == stamps
  # Mixture weights are not part of the build: other weights, same folders.
  reweighted = dataclasses.replace(CFG, weight_image=0.5, weight_audio=0.3, weight_text=0.2)
  assert default_prepared.ensure(reweighted, tmp_path, **SMALL) == [
      (p, w) for (p, _), w in zip(first, (0.5, 0.3, 0.2))]


def test_a_different_config_gets_a_different_folder(tmp_path):
  base = default_prepared.ensure(CFG, tmp_path, **SMALL)[1][0].parent
  smaller = default_prepared.ensure(dataclasses.replace(CFG, audio_codebook=32), tmp_path, **SMALL)
  fewer = default_prepared.ensure(CFG, tmp_path, tones_per_digit=1, limit=3)
  shorter = default_prepared.ensure(dataclasses.replace(CFG, tone_seconds=0.1), tmp_path, **SMALL)
  folders = {base, smaller[1][0].parent, fewer[1][0].parent, shorter[1][0].parent}
  assert len(folders) == 4
  assert prepared.open_folder(smaller[1][0]).codebooks["audio"].shape == (32, CFG.n_mels)
  assert prepared.open_folder(fewer[1][0]).card["records"]["total"] == 10 * 10


def test_concurrent_builds_in_threads_yield_one_complete_folder(tmp_path, monkeypatch):
  """Both threads build (held together until both have written their files); one folder wins the
  rename, the other build is discarded, and both return the winner."""
  real, calls = prepare.prepare, []
  barrier = threading.Barrier(2, timeout=120)

  def together(manifest, out, cfg, *args, **kwargs):
    if manifest.name == "images.jsonl":
      barrier.wait()
    calls.append(manifest.name)
    return real(manifest, out, cfg, *args, **kwargs)
  monkeypatch.setattr(prepare, "prepare", together)
  results, errors = [None, None], []

  def run(i):
    try:
      results[i] = default_prepared.ensure(CFG, tmp_path, **SMALL)
    except Exception as e:   # reported below
      errors.append(e)
  threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors and results[0] == results[1]
  assert len(calls) == 6   # both built all three folders
  root = tmp_path / default_prepared.SUBFOLDER
  assert [p.name for p in root.iterdir()] == [results[0][0][0].parent.name]   # no leftovers
  for path, _ in results[0]:
    prepared.open_folder(path)


def test_concurrent_builds_in_processes_yield_one_complete_folder(tmp_path):
  code = ("import json, pathlib, sys; from omnimoe.data.builtin import cache as d; "
          "from omnimoe.data.config import DataConfig; "
          f"out = d.ensure(DataConfig(), pathlib.Path(sys.argv[1]), **{SMALL!r}); "
          "print(json.dumps([str(p) for p, _ in out]))")
  env = dict(os.environ)
  procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for _ in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
  paths = [json.loads(out) for out, _ in outs]
  assert paths[0] == paths[1]
  root = tmp_path / default_prepared.SUBFOLDER
  assert [p.name for p in root.iterdir()] == [pathlib.Path(paths[0][0]).parent.name]
  for path in paths[0]:
    prepared.open_folder(path)


def test_a_killed_builds_leftovers_are_removed(tmp_path):
  key = default_prepared.cache_key(default_prepared.build_inputs(CFG, **SMALL))
  stale = tmp_path / default_prepared.SUBFOLDER / f".{key}.partial-999999999-1"
  (stale / "files").mkdir(parents=True)
  default_prepared.ensure(CFG, tmp_path, **SMALL)
  assert not stale.exists()


def test_an_incomplete_cache_folder_is_refused(tmp_path):
  folders = default_prepared.ensure(CFG, tmp_path, **SMALL)
  tones = folders[1][0]
  (tones / "card.json").unlink()
  with pytest.raises(ValueError, match=r"incomplete or changed \(missing tones\); remove it"):
    default_prepared.ensure(CFG, tmp_path, **SMALL)


def test_cache_root(monkeypatch, tmp_path):
  monkeypatch.setenv(default_prepared.CACHE_ENV, str(tmp_path))
  assert default_prepared.cache_root() == tmp_path
  assert default_prepared.cache_root(tmp_path / "x") == tmp_path / "x"
  monkeypatch.delenv(default_prepared.CACHE_ENV)
  assert default_prepared.cache_root() == pathlib.Path.home() / ".cache" / "omnimoe"
