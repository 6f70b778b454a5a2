"""`omnimoe prepare`: the prepared folder, its card, bad input (exit 3), --skip-bad, atomic output."""
import dataclasses
import json

import grain
import numpy as np
import pytest
from oracles import mel_band_of, patchify_loop, wav_samples
from PIL import Image

from omnimoe.data import records
from omnimoe.data.prepare import audio_io
from omnimoe.data.prepare import write as prepare
from omnimoe.data.config import DataConfig
from omnimoe.data.builtin.demo_files import write_png, write_wav
from omnimoe.train.cli import main

CFG = DataConfig(image_patch=2, image_side=8, image_channels=1, sample_rate=8000, seq_len=128,
                 image_codebook=64, audio_codebook=64, heldout_fraction=0.2)   # pinned: defaults get tuned
PINNED = [f"data.{k}={getattr(CFG, k)}" for k in ("image_patch", "image_side", "seq_len", "heldout_fraction")]


def write_files(folder):
  """Two gray PNGs, one RGB JPEG, a 16 kHz stereo WAV and an 8 kHz mono WAV; returns the PNGs'
  pixels {name: uint8 [8, 8]}."""
  rng = np.random.default_rng(0)
  pixels = {"a.png": rng.integers(0, 256, (8, 8)), "b.png": rng.integers(0, 256, (8, 8))}
  for name, p in pixels.items():
    write_png(folder / name, p)
  write_png(folder / "c.jpg", rng.integers(0, 256, (24, 16, 3)))
  t = np.arange(4000) / 16000
  write_wav(folder / "s.wav", np.stack([np.sin(2 * np.pi * 700 * t), 0.5 * np.sin(2 * np.pi * 1300 * t)], 1), 16000)
  write_wav(folder / "m.wav", 0.3 * np.sin(2 * np.pi * 440 * np.arange(2400) / 8000), 8000)
  return pixels


GOOD = [
    {"image": "a.png", "text": "first image"},
    {"audio": "s.wav", "text": "a stereo chord"},
    {"text": "just text"},
    {"parts": [{"text": "look: "}, {"image": "b.png"}, {"text": " and listen: "}, {"audio": "m.wav"}]},
    {"image": "c.jpg", "text": "a photo"},
]


def write_manifest(folder, lines):
  path = folder / "manifest.jsonl"
  path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
  return path


def read_records(out):
  card = json.loads((out / "card.json").read_text())
  source = grain.sources.ArrayRecordDataSource([str(out / s) for s in card["shards"]])
  return card, [records.decode(source[i]) for i in range(len(source))]


def test_prepared_folder_holds_exactly_the_decoded_files(tmp_path):
  pixels = write_files(tmp_path)
  card = prepare.prepare(write_manifest(tmp_path, GOOD), tmp_path / "out", CFG)
  card_on_disk, recs = read_records(tmp_path / "out")
  assert card == card_on_disk
  assert [r.line for r in recs] == [1, 2, 3, 4, 5]
  assert recs[0].parts[0].grid == (4, 4)
  # Images against decoders of their own: the PNGs' known pixels patchified by loops; the JPEG
  # through Pillow directly (gray, bicubic to 8 x 8).
  for rec, name in ((recs[0], "a.png"), (recs[3], "b.png")):
    image, = [p for p in rec.parts if isinstance(p, records.ImagePart)]
    np.testing.assert_array_equal(image.patches_MxD, patchify_loop(pixels[name] / np.float32(255), 2))
  with Image.open(tmp_path / "c.jpg") as jpeg:
    gray = np.asarray(jpeg.convert("L").resize((8, 8), Image.Resampling.BICUBIC), np.float32)
  np.testing.assert_array_equal(recs[4].parts[0].patches_MxD, patchify_loop(gray / 255, 2))
  assert recs[0].parts[1] == b"first image"
  # Audio: each WAV read by hand (oracles.wav_samples), then resampled and log-mel'd; and the
  # tones it holds are the loudest mel bands (700 and 1300 Hz; 440 Hz).
  for frames, name, tones in ((recs[1].parts[0].frames_MxD, "s.wav", (700, 1300)),
                              (recs[3].parts[3].frames_MxD, "m.wav", (440,))):
    np.testing.assert_array_equal(frames, audio_io.frames(*wav_samples(tmp_path / name), CFG))
    loudest = np.argsort(frames.mean(axis=0))[::-1][:len(tones)]
    assert sorted(loudest) == [mel_band_of(f, CFG.sample_rate, CFG.n_mels) for f in tones], name
  assert recs[2].parts == (b"just text",)
  assert [type(p).__name__ for p in recs[3].parts] == ["bytes", "ImagePart", "bytes", "AudioPart"]
  assert recs[3].parts[2] == b" and listen: "

  lengths = [records.num_tokens(r) for r in recs]
  index = np.load(tmp_path / "out" / "index.npz")
  np.testing.assert_array_equal(index["lengths"], lengths)
  assert index["heldout"].sum() == 1 == card["examples"]["heldout"]      # round(0.2 * 5)
  assert card["examples"] == {"total": 5, "train": 4, "heldout": 1}
  assert card["examples_with"] == {"text": 5, "image": 3, "audio": 2, "video": 0}
  assert card["media"] == {"image": 3, "audio": 2, "video": 0}
  frames = len(recs[1].parts[0].frames_MxD) + len(recs[3].parts[3].frames_MxD)
  assert card["tokens"]["image"] == 48 and card["tokens"]["audio"] == frames
  assert card["tokens"]["text"] == sum(len(p) for r in recs for p in r.parts if isinstance(p, bytes))
  assert card["tokens"]["total"] == sum(lengths)
  assert card["skipped"] == {"count": 0, "lines": []}
  books = np.load(tmp_path / "out" / "codebooks.npz")
  assert books["image"].shape == (64, 4) and books["audio"].shape == (64, 24)
  assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_long_text_is_cut_and_long_media_examples_are_refused(tmp_path):
  cfg = dataclasses.replace(CFG, seq_len=40)
  write_files(tmp_path)
  text = "".join(chr(97 + i % 26) for i in range(100))
  prepare.prepare(write_manifest(tmp_path, [{"text": text}]), tmp_path / "out", cfg)
  _, recs = read_records(tmp_path / "out")
  assert [len(r.parts[0]) for r in recs] == [38, 38, 24]
  assert [r.eos for r in recs] == [False, False, True]
  assert b"".join(r.parts[0] for r in recs) == text.encode()
  too_long = write_manifest(tmp_path, [{"image": "a.png", "text": "x" * 30}])
  with pytest.raises(prepare.BadData, match=r"manifest.jsonl:1: a.png: example needs 48 tokens"):
    prepare.prepare(too_long, tmp_path / "out2", cfg)


def test_records_are_split_into_shards(tmp_path):
  write_files(tmp_path)
  card = prepare.prepare(write_manifest(tmp_path, GOOD * 3), tmp_path / "out", CFG,
                         records_per_shard=4)
  assert card["shards"] == [f"records-0000{i}-of-00004.array_record" for i in range(4)]
  _, recs = read_records(tmp_path / "out")
  assert [r.line for r in recs] == list(range(1, 16))


BAD = [
    ("noise.png", '{"image": "noise.png", "text": "x"}', "noise.png: cannot decode image"),
    ("missing", '{"image": "nowhere.png", "text": "x"}', "nowhere.png: file not found"),
    ("text.wav", '{"audio": "text.wav", "text": "x"}', "text.wav: unreadable WAV"),
    ("json", '{"text": "unterminated', "not valid JSON"),
    ("empty", '{"parts": []}', "empty example"),
]


@pytest.mark.parametrize("name, line, needle", BAD, ids=[b[0] for b in BAD])
def test_bad_input_exits_3_naming_line_and_path(tmp_path, capsys, name, line, needle):
  write_files(tmp_path)
  (tmp_path / "noise.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(200)))
  (tmp_path / "text.wav").write_text("RIFF but not really")
  manifest = write_manifest(tmp_path, GOOD[:3] + [line] + GOOD[3:])
  code = main(["prepare", str(manifest), "--out", str(tmp_path / "out"), *PINNED])
  err = capsys.readouterr().err
  assert code == 3
  assert err.count("\n") == 1 and "Traceback" not in err
  assert f"manifest.jsonl:4: {needle}" in err
  assert not (tmp_path / "out").exists()
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_skip_bad_skips_and_counts(tmp_path, capsys):
  write_files(tmp_path)
  (tmp_path / "noise.png").write_bytes(b"not an image")
  lines = [GOOD[0], BAD[0][1], GOOD[1], BAD[3][1], GOOD[2], BAD[1][1]]
  manifest = write_manifest(tmp_path, lines)
  assert main(["prepare", str(manifest), "--out", str(tmp_path / "out"), "--skip-bad", *PINNED]) == 0
  assert "skipped 3 bad lines" in capsys.readouterr().out
  card, recs = read_records(tmp_path / "out")
  assert card["skipped"]["count"] == 3
  assert [(s["line"], s["path"]) for s in card["skipped"]["lines"]] == [
      (2, "noise.png"), (4, None), (6, "nowhere.png")]
  assert "cannot decode image" in card["skipped"]["lines"][0]["reason"]
  assert card["examples"]["total"] == 3 and [r.line for r in recs] == [1, 3, 5]


def test_nothing_usable_is_bad_data(tmp_path, capsys):
  manifest = write_manifest(tmp_path, ['{"image": "nowhere.png"}'])
  assert main(["prepare", str(manifest), "--out", str(tmp_path / "out"), "--skip-bad"]) == 3
  assert "no usable example (1 skipped)" in capsys.readouterr().err
  assert not (tmp_path / "out").exists()


def test_output_is_never_half_written(tmp_path, monkeypatch):
  write_files(tmp_path)
  manifest = write_manifest(tmp_path, GOOD)
  out = tmp_path / "out"
  first = prepare.prepare(manifest, out, CFG)
  before = {p.name: p.read_bytes() for p in out.iterdir()}
  real, calls = records.encode, []

  def failing(record):   # a crash in the middle of writing the shards
    calls.append(1)
    if len(calls) == 3:
      raise OSError("disk full")
    return real(record)

  monkeypatch.setattr(records, "encode", failing)
  with pytest.raises(OSError, match="disk full"):
    prepare.prepare(write_manifest(tmp_path, GOOD * 2), out, CFG)
  assert {p.name: p.read_bytes() for p in out.iterdir()} == before   # the old folder, untouched
  assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
  monkeypatch.setattr(records, "encode", real)
  second = prepare.prepare(write_manifest(tmp_path, GOOD * 2), out, CFG)   # replaced when complete
  assert second["examples"]["total"] == 10 and first["examples"]["total"] == 5


def test_usage_errors_exit_2(tmp_path, capsys):
  write_files(tmp_path)
  manifest = write_manifest(tmp_path, GOOD)
  (tmp_path / "precious").mkdir()
  (tmp_path / "precious" / "thesis.txt").write_text("do not delete")
  for args, needle in [
      ([str(manifest), "--out", str(tmp_path / "precious")], "exists and is not a prepared folder"),
      ([str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o")], "does not exist"),
      ([str(manifest), "--out", str(tmp_path / "o"), "data.image_patch=3"],
       "data.image_patch=3 must divide data.image_side=8"),
      ([str(manifest), "--out", str(tmp_path / "o"), "data.image_side=32"],
       "an image is 256 patches, more than data.seq_len=128"),
  ]:
    assert main(["prepare", *args[:3], *PINNED, *args[3:]]) == 2
    assert needle in capsys.readouterr().err
  assert (tmp_path / "precious" / "thesis.txt").read_text() == "do not delete"


def test_config_overrides_reach_prepare(tmp_path, capsys):
  write_files(tmp_path)
  manifest = write_manifest(tmp_path, GOOD)
  assert main(["prepare", str(manifest), "--out", str(tmp_path / "rgb"), "data.image_channels=3",
               "data.image_side=16", "data.image_patch=4", "data.image_codebook=8"]) == 0
  card, recs = read_records(tmp_path / "rgb")
  assert card["prepared_with"]["image_channels"] == 3 and card["feature_widths"]["image"] == 48
  assert recs[0].parts[0].patches_MxD.shape == (16, 48)
  assert np.load(tmp_path / "rgb" / "codebooks.npz")["image"].shape == (8, 48)


def _split_of(tmp_path, lines, name):
  prepare.prepare(write_manifest(tmp_path, lines), tmp_path / name, CFG)
  return np.load(tmp_path / name / "index.npz")["heldout"].tolist(), read_records(tmp_path / name)[0]


def test_split_key_pins_its_line_and_leaves_the_draw_of_the_others(tmp_path):
  write_files(tmp_path)
  lines = GOOD * 4                                    # 20 one-record examples: 4 drawn held out
  drawn, card = _split_of(tmp_path, lines, "drawn")
  assert sum(drawn) == 4 and card["split_pinned"] == {"train": 0, "heldout": 0}
  to_train = drawn.index(True)                        # a drawn held-out line, pinned to train
  to_heldout = drawn.index(False)                     # a drawn training line, pinned to held out
  pinned_parts = {"parts": [{"text": "pinned "}, {"image": "a.png"}], "split": "heldout"}
  lines = list(lines)
  lines[to_train] = {**lines[to_train], "split": "train"}
  lines[to_heldout] = pinned_parts
  lines.insert(0, "")                                 # blank lines count for nothing, as before
  got, card = _split_of(tmp_path, lines, "pinned")
  want = list(drawn)
  want[to_train], want[to_heldout] = False, True
  assert got == want
  assert card["split_pinned"] == {"train": 1, "heldout": 1}
  assert card["examples"] == {"total": 20, "train": 16, "heldout": 4}


def test_split_key_pins_every_piece_of_a_long_text(tmp_path):
  cfg = dataclasses.replace(CFG, seq_len=40)
  lines = [{"text": "x" * 100, "split": "heldout"}] + [{"text": f"short {i}", "split": "train"}
                                                        for i in range(9)]
  prepare.prepare(write_manifest(tmp_path, lines), tmp_path / "out", cfg)
  assert np.load(tmp_path / "out" / "index.npz")["heldout"].tolist() == [True] * 3 + [False] * 9


@pytest.mark.parametrize("value, shown", [('"test"', '"test"'), ("null", "null"),
                                          ('["train"]', '["train"]'), ('"Train"', '"Train"')])
def test_bad_split_value_exits_3_naming_the_line(tmp_path, capsys, value, shown):
  write_files(tmp_path)
  bad = '{"image": "a.png", "text": "x", "split": %s}' % value
  manifest = write_manifest(tmp_path, GOOD[:3] + [bad] + GOOD[3:])
  assert main(["prepare", str(manifest), "--out", str(tmp_path / "out"), *PINNED]) == 3
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "Traceback" not in err
  assert f"""manifest.jsonl:4: 'split' must be "train" or "heldout", got {shown}""" in err
  assert not (tmp_path / "out").exists()
  assert main(["prepare", str(manifest), "--out", str(tmp_path / "out"), "--skip-bad", *PINNED]) == 0
  card, _ = read_records(tmp_path / "out")
  assert [s["line"] for s in card["skipped"]["lines"]] == [4]
  parts = '{"parts": [{"text": "x"}], "split": %s}' % value
  assert main(["prepare", str(write_manifest(tmp_path, [parts])), "--out", str(tmp_path / "o2"),
               *PINNED]) == 3
  assert "manifest.jsonl:1: 'split' must be" in capsys.readouterr().err
