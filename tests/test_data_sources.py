"""Prepared folders on the grain pipeline: round trip, packing, determinism, hosts, mixing, eval."""
import collections
import dataclasses
import json
import wave

import numpy as np
import pytest
from oracles import patchify_loop
from PIL import Image

from omnimoe import data
from omnimoe.data.prepare import log_mel as log_mel_lib
from omnimoe.data.prepare import kmeans
from omnimoe.data.pipeline import mixture
from omnimoe.data.prepare import write as prepare
from omnimoe.data.prepare import folder as prepared
from omnimoe.data.pipeline import sources
from omnimoe.data.config import DataConfig, Source
from omnimoe.data.builtin.demo_files import write_png, write_wav
from omnimoe.data.packing import loss_weight_table
from omnimoe.data.vocab import EOS, Vocab
from omnimoe.model.modality import AUDIO, IMAGE

# Pinned (the defaults get tuned): 8x8 images in 2x2 patches, 8 kHz audio, rows of 64.
BASE = DataConfig(seq_len=64, image_patch=2, image_side=8, image_channels=1, sample_rate=8000,
                  n_mels=24, frame_len=256, frame_hop=128, image_codebook=16, audio_codebook=16,
                  heldout_fraction=0.2, loss_weight_text=1.0, loss_weight_image=0.5,
                  loss_weight_audio=2.0, prefetch=0)
B = 4
VOCAB = Vocab.from_config(BASE)
LONG = "#long " + "".join(chr(97 + i % 26) for i in range(144))   # 150 bytes: pieces 62, 62, 26


def write_dataset(folder):
  """37 examples of every form; each text starts with a tag naming its line."""
  rng = np.random.default_rng(0)
  lines = []
  for i in range(36):
    write_png(folder / f"i{i}.png", rng.integers(0, 256, (8, 8)))
    write_wav(folder / f"a{i}.wav", 0.5 * np.sin(2 * np.pi * (300 + 40 * i) * np.arange(1600) / 8000)
              + 0.05 * rng.standard_normal(1600), 8000)
    kind = i % 4
    if kind == 0:
      lines.append({"image": f"i{i}.png", "text": f"#{i} a picture"})
    elif kind == 1:
      lines.append({"audio": f"a{i}.wav", "text": f"#{i} a sound"})
    elif kind == 2:
      lines.append({"text": f"#{i} just words"})
    else:
      lines.append({"parts": [{"text": f"#{i} see "}, {"image": f"i{i}.png"}, {"text": " hear "},
                              {"audio": f"a{i}.wav"}]})
  lines.append({"text": LONG})
  manifest = folder / "manifest.jsonl"
  manifest.write_text("".join(json.dumps(l) + "\n" for l in lines))
  return manifest, lines


def expected_segments(folder, lines):
  """What each example must come back as, decoded here without data/image_io or data/audio_io."""
  def image(name):
    pixels = np.asarray(Image.open(folder / name).convert("L"), np.float32) / 255
    return patchify_loop(pixels, 2)

  def audio(name):
    with wave.open(str(folder / name)) as w:
      x = np.frombuffer(w.readframes(w.getnframes()), "<i2") / 32768.0
    return log_mel_lib.log_mel(x.astype(np.float32), BASE)

  out = {}
  for line, obj in enumerate(lines, start=1):
    parts = obj.get("parts") or [{k: obj[k]} for k in ("image", "audio", "text") if k in obj]
    text = b"".join(p["text"].encode() for p in parts if "text" in p)
    imgs = b"".join(image(p["image"]).tobytes() for p in parts if "image" in p)
    auds = b"".join(audio(p["audio"]).tobytes() for p in parts if "audio" in p)
    if obj.get("text") == LONG:
      out[line] = [(text[i:i + 62], b"", b"") for i in range(0, len(text), 62)]
    else:
      out[line] = [(text, imgs, auds)]
  return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  folder = tmp_path_factory.mktemp("own")
  manifest, lines = write_dataset(folder)
  prepare.prepare(manifest, folder / "prep", BASE)
  pf = prepared.open_folder(folder / "prep")
  heldout_lines = {pf.record(int(i)).line for i in pf.heldout_ids}
  return folder, dataclasses.replace(BASE, sources=(Source(str(folder / "prep")),)), \
      expected_segments(folder, lines), heldout_lines


def segments(batch):
  """(text bytes, image patches bytes, audio frames bytes, has EOS) of every segment, row-major."""
  out = []
  for r in range(len(batch["tokens"])):
    seg = batch["segment_ids"][r]
    for s in range(1, seg.max() + 1):
      where = seg == s
      mod, tok, feat = batch["modality"][r][where], batch["tokens"][r][where], batch["features"][r][where]
      out.append((VOCAB.decode_text(tok), feat[mod == IMAGE.code][:, :4].tobytes(),
                  feat[mod == AUDIO.code][:, :24].tobytes(), bool(tok[-1] == EOS)))
  return out


def take(cfg, n, *, seed=0, batch_size=B, **kw):
  it = data.train_iterator(cfg, batch_size=batch_size, seed=seed, **kw)
  batches = [next(it) for _ in range(n)]
  state = it.get_state()
  it.close()
  return batches, state


def test_round_trip_one_epoch_gives_back_exactly_the_files(dataset):
  _, cfg, expected, heldout_lines = dataset
  want = sorted(seg for line, segs in expected.items() if line not in heldout_lines for seg in segs)
  it = data.train_iterator(cfg, batch_size=B, seed=0)
  batches, positions = [], []
  while not positions or positions[-1] < len(want):   # until the batch that ends the epoch
    batches.append(next(it))
    positions.append(it.get_state()["next_example"])
  it.close()
  got = [s for b in batches for s in segments(b)]
  assert positions[-1] == len(got) >= len(want)
  # Rows are filled first-fit, so within a batch the row-major order is not the stream order: the
  # batches before the last hold the epoch's first records, the last one the rest of the epoch
  # (and the start of the next).
  epoch = [s for b in batches[:-1] for s in segments(b)]
  rest = collections.Counter(want) - collections.Counter(s[:3] for s in epoch)
  assert sum(rest.values()) == len(want) - len(epoch)      # so far: distinct epoch records
  for seg in segments(batches[-1]):                        # the rest of the epoch is in the last
    if rest[seg[:3]] > 0:
      rest[seg[:3]] -= 1
      epoch.append(seg)
  assert sorted(s[:3] for s in epoch) == want   # every training record once, bit for bit
  long_pieces = [s for s in epoch if s[0].startswith(b"#long") or s[0] in
                 {p[0] for p in expected[37]}]
  assert sorted((p[0], p[3]) for p in long_pieces) == sorted(
      (p[0], p[0] == expected[37][-1][0]) for p in expected[37])   # EOS only on the last piece
  tags = {s[0].split(b" ")[0] for s in got}
  assert not tags & {f"#{line - 1}".encode() for line in heldout_lines}


def test_packing_invariants(dataset):
  _, cfg, _, _ = dataset
  [batch], _ = take(cfg, 1, seed=5)
  table = loss_weight_table(cfg)
  for r in range(B):
    seg, mod, tok = batch["segment_ids"][r], batch["modality"][r], batch["tokens"][r]
    n = int((seg > 0).sum())
    assert np.all(seg[:n] > 0) and np.all(seg[n:] == 0)                    # padding only at the end
    assert np.all(np.diff(seg[:n]) >= 0) and set(np.diff(seg[:n]).tolist()) <= {0, 1}  # contiguous
    assert np.all(tok[n:] == 0) and np.all(mod[n:] == 0) and np.all(batch["features"][r, n:] == 0)
    assert np.all(VOCAB.modality_of(tok[:n], specials_as_text=True) == mod[:n])
    for s in range(1, seg.max() + 1):
      idx = np.flatnonzero(seg == s)
      pos, m = batch["positions"][r][idx], mod[idx]
      assert tok[idx[0]] == VOCAB.bos and np.all(pos[0] == 0)
      running = 0
      i = 0
      while i < len(idx):   # positions per the contract, walked independently
        if m[i] == IMAGE.code:
          rr, cc = np.divmod(np.arange(16), 4)
          np.testing.assert_array_equal(pos[i:i + 16], np.stack([0 * rr + running, running + rr, running + cc], 1))
          i, running = i + 16, running + 4
        else:
          np.testing.assert_array_equal(pos[i], [running] * 3)
          i, running = i + 1, running + 1
      targets = np.append(tok[idx[1:]], 0)
      np.testing.assert_array_equal(batch["targets"][r][idx], targets)
      expect_w = np.append(table[mod[idx[1:]]], 0.0)
      np.testing.assert_array_equal(batch["loss_weights"][r][idx], expect_w)
    assert np.all(batch["targets"][r][n:] == 0) and np.all(batch["loss_weights"][r][n:] == 0)


def test_codes_come_from_the_folder_codebooks(dataset):
  _, cfg, _, _ = dataset
  [batch], _ = take(cfg, 1)
  books = np.load(dataset[0] / "prep" / "codebooks.npz")
  for mod, book, offset in ((IMAGE.code, books["image"], VOCAB.image_offset),
                            (AUDIO.code, books["audio"], VOCAB.audio_offset)):
    where = batch["modality"] == mod
    assert where.sum() > 0
    feats = batch["features"][where][:, :book.shape[1]]
    np.testing.assert_array_equal(batch["tokens"][where], kmeans.assign(feats, book) + offset)


@pytest.mark.parametrize("prefetch", [0, 2])
def test_deterministic_and_restores_from_state(dataset, prefetch):
  _, cfg, _, _ = dataset
  cfg = dataclasses.replace(cfg, prefetch=prefetch)
  a, _ = take(cfg, 3, seed=7)
  b, _ = take(cfg, 3, seed=7)
  c, _ = take(cfg, 3, seed=8)
  for x, y in zip(a, b):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  assert not np.array_equal(a[0]["tokens"], c[0]["tokens"])
  it = data.train_iterator(cfg, batch_size=B, seed=7)
  [next(it) for _ in range(4)]
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it) for _ in range(5)]   # crosses into the second epoch
  it.close()
  fresh = data.train_iterator(cfg, batch_size=B, seed=7)
  fresh.set_state(state)
  for want in expected:
    got = next(fresh)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
  fresh.close()


def test_two_hosts_are_disjoint_and_cover_the_epoch(dataset):
  _, cfg, expected, heldout_lines = dataset
  n_train = sum(len(segs) for line, segs in expected.items() if line not in heldout_lines)
  it = data.train_iterator(cfg, batch_size=B, seed=4)
  whole, positions = [], []
  while not positions or positions[-1] < n_train:      # global batches until the epoch is done
    whole.append(next(it))
    positions.append(it.get_state()["next_example"])
  it.close()
  steps = len(whole)
  hosts = [take(cfg, steps, seed=4, process_index=p, process_count=2) for p in range(2)]
  assert hosts[0][1] == hosts[1][1] == {"next_example": positions[-1]}   # one global position
  for step in range(steps):
    for key in whole[step]:   # host p holds rows [p*B/2, (p+1)*B/2) of the global batch
      assert hosts[0][0][step][key].shape[0] == B // 2
      np.testing.assert_array_equal(np.concatenate([hosts[0][0][step][key], hosts[1][0][step][key]]),
                                    whole[step][key])
  epoch = sorted(seg[:3] for line, segs in expected.items() if line not in heldout_lines for seg in segs)
  # Before the epoch ends, no record is on both hosts; by its end, the two together hold all.
  share = [[s[:3] for b in hosts[p][0][:steps - 1] for s in segments(b)] for p in range(2)]
  assert len(share[0]) + len(share[1]) == positions[-2] <= n_train
  assert not set(share[0]) & set(share[1])
  assert len(set(share[0] + share[1])) == positions[-2]
  final = [[s[:3] for b in hosts[p][0] for s in segments(b)] for p in range(2)]
  assert set(final[0]) | set(final[1]) >= set(epoch) and len(set(epoch)) == n_train


def test_mixing_with_the_default_dataset(dataset):
  folder, cfg, _, _ = dataset
  prep = cfg.sources[0]
  mixed = dataclasses.replace(cfg, seq_len=96, sources=(dataclasses.replace(prep, weight=3.0),
                                                        Source("default", 1.0)))
  mix = sources.resolve(mixed)
  assert mix.codebook_from == {"image": mix.folders[0].name, "audio": mix.folders[0].name}
  # Training and eval read the prepared folder and the default dataset's own three folders, the
  # default's weight split 0.7 / 0.15 / 0.15 (data.weight_image/audio/text); the three are one
  # source for eval (one label).
  assert [t.name for t in mix.folders] == [mix.folders[0].name] + [
      f"data.sources[1] 'default' ({kind})" for kind in ("images", "tones", "text")]
  np.testing.assert_allclose([t.weight for t in mix.folders], [3.0, 0.7, 0.15, 0.15])
  assert mix.by_label() == [("prep", [0]), ("default", [1, 2, 3])]
  keys = mixture.key_stream(mix, seed=0)
  counts = np.bincount([keys[g][0] for g in range(4000)], minlength=4)
  np.testing.assert_allclose(counts / 4000, [0.75, 0.175, 0.0375, 0.0375], atol=0.01)
  [batch], _ = take(mixed, 1, batch_size=8)
  book = np.load(folder / "prep" / "codebooks.npz")["image"]
  where = batch["modality"] == IMAGE.code
  np.testing.assert_array_equal(batch["tokens"][where],
                                kmeans.assign(batch["features"][where][:, :4], book) + VOCAB.image_offset)
  default_first = dataclasses.replace(mixed, sources=mixed.sources[::-1])
  mix = sources.resolve(default_first)
  assert mix.codebooks["image"] is mix.folders[0].folder.codebooks["image"]   # default images
  assert mix.codebooks["audio"] is mix.folders[1].folder.codebooks["audio"]   # default tones
  assert data.has_default_source(default_first) and not data.has_default_source(cfg)
  assert data.dataset_info(mixed, 0).feature_dim == 24


def test_eval_batches_are_the_held_out_records(dataset):
  _, cfg, expected, heldout_lines = dataset
  batches = data.eval_batches(cfg, batch_size=B, seed=0, num_batches=10)
  got = sorted(s[:3] for b in batches for s in segments(b))
  assert got == sorted(seg for line in heldout_lines for seg in expected[line])
  assert all(b["tokens"].shape == (B, cfg.seq_len) for b in batches)


def test_run_without_default_source_notes_what_eval_skips(dataset):
  from omnimoe.train import config as config_lib
  from omnimoe.train.evaluate import default_dataset_evals
  _, cfg, _, _ = dataset
  run = dataclasses.replace(config_lib.Config(), data=cfg)
  text, prompts, notes = default_dataset_evals(run)
  assert text == [] and prompts == {} and "no 'default' source" in notes[0]


def test_mismatched_settings_are_refused_naming_the_key(dataset):
  folder, cfg, _, _ = dataset
  for change, needle in [
      (dict(image_patch=4), "was prepared with data.image_patch=2; this run has data.image_patch=4"),
      (dict(audio_codebook=32), "was prepared with data.audio_codebook=16"),
      (dict(seq_len=40), "holds examples of up to 63 tokens; data.seq_len=40 is shorter"),
      (dict(sources=(Source(str(folder / "nope")),)), "is not a prepared folder (it does not exist)"),
      (dict(sources=(Source(str(folder)),)), "is not a prepared folder (no card.json)"),
      (dict(sources=(Source("default"), Source(str(folder / "prep"))), image_channels=3),
       "the default dataset is grayscale"),
  ]:
    with pytest.raises(ValueError, match="data.sources") as e:
      data.dataset_info(dataclasses.replace(cfg, **change), 0)
    assert needle in str(e.value), str(e.value)


def test_train_refuses_a_bad_source_with_exit_2(tmp_path, capsys):
  from omnimoe.train.cli import main
  code = main(["train", f"data.sources=[{{path: {tmp_path / 'missing'}, weight: 1}}]",
               "--workdir", str(tmp_path / "run")])
  err = capsys.readouterr().err
  assert code == 2 and err.count("\n") == 1 and "is not a prepared folder" in err


@pytest.mark.slow
def test_train_and_eval_on_a_prepared_folder(dataset, tmp_path, capsys):
  """`omnimoe train ... data.sources=[{path: DIR}]`, then `omnimoe eval`, end to end."""
  from omnimoe.train.cli import main
  folder = dataset[0]
  small = ["model.num_layers=1", "model.d_model=32", "model.num_heads=2", "model.num_kv_heads=1",
           "model.head_dim=16", "model.rope_sections=[4,2,2]", "model.moe.num_experts=4",
           "model.moe.expert_hidden=32", "train.batch_size=8", "eval.batch_size=8",
           "eval.num_batches=1", "train.log_every=1", "train.steps=3", "eval.every_steps=0",
           *[f"data.{k}={getattr(BASE, k)}" for k in prepare.PREPARED_KEYS + ("seq_len",)],
           f"data.sources=[{{path: {folder / 'prep'}, weight: 1.0}}]"]
  wd = tmp_path / "run"
  assert main(["train", *small, "--workdir", str(wd)]) == 0
  captured = capsys.readouterr()
  assert "finished 3 steps" in captured.out and "no 'default' source" in captured.err
  rows = [json.loads(l) for l in (wd / "metrics.jsonl").read_text().splitlines()]
  final = [r for r in rows if "eval/loss" in r][-1]
  assert np.isfinite(final["eval/loss"]) and "eval/image_to_text_accuracy" not in final
  assert main(["eval", "--workdir", str(wd)]) == 0
  result = json.loads(capsys.readouterr().out)
  assert result["step"] == 3 and "eval/loss" in result and "no 'default' source" in result["notes"][0]


def test_a_folder_prepared_again_is_read_again(dataset, tmp_path):
  folder, _, _, _ = dataset
  manifest = tmp_path / "m.jsonl"
  manifest.write_text('{"text": "first version"}\n')
  cfg = dataclasses.replace(BASE, sources=(Source(str(tmp_path / "p")),))
  prepare.prepare(manifest, tmp_path / "p", BASE)
  [batch], _ = take(cfg, 1)
  assert segments(batch)[0][0] == b"first version"
  manifest.write_text('{"text": "second version"}\n')
  prepare.prepare(manifest, tmp_path / "p", BASE)
  [batch], _ = take(cfg, 1)
  assert segments(batch)[0][0] == b"second version"
