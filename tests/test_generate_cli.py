"""`omnimoe generate` end to end on a two-step run: text, a forced image written as a PNG and a
forced tone as a WAV, N samples ranked by mean log-prob, effort levels, and bad input in one line."""
import re
import wave

import numpy as np
import pytest
from PIL import Image

from omnimoe.data.builtin.demo_files import write_png
from omnimoe.train.cli import main

SMALL = ["model.num_layers=1", "model.d_model=32", "model.num_heads=2", "model.num_kv_heads=1",
         "model.head_dim=16", "model.rope_sections=[4,2,2]", "model.moe.num_experts=4",
         "model.moe.expert_hidden=32", "data.seq_len=64", "train.batch_size=8", "train.steps=2",
         "checkpoint.every_steps=2", "eval.every_steps=0"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  wd = tmp_path_factory.mktemp("gen") / "run"
  assert main(["train", *SMALL, "--workdir", str(wd)]) == 0
  return wd


@pytest.mark.slow
def test_generate_writes_media_and_ranks_samples(run, tmp_path, capsys):
  out = tmp_path / "out"
  assert main(["generate", "--workdir", str(run), "--prompt", "draw a seven:", "--media", "image",
               "--max-new-tokens", "6", "--temperature", "1", "--top-p", "0.9", "--samples", "3",
               "--effort", "high", "--out", str(out)]) == 0
  lines = capsys.readouterr().out.splitlines()
  scores = [float(m.group(1)) for m in map(re.compile(r"sample \d: mean log-prob (\S+)").match,
                                           lines) if m]
  assert len(scores) == 3
  best = int(next(l for l in lines if l.startswith("best: sample")).split()[-1])
  assert scores[best - 1] == max(scores)
  assert f"wrote {out / 'image_1.png'}" in lines
  assert np.asarray(Image.open(out / "image_1.png")).shape == (8, 8)
  assert "'top_k': 4" in lines[0]                      # high = 2 x the trained 2 of 4 experts
  assert main(["generate", "--workdir", str(run), "--media", "audio", "--max-new-tokens", "12",
               "--out", str(out), "--effort", "none"]) == 0
  with wave.open(str(out / "audio_1.wav")) as w:
    assert w.getframerate() == 8000 and w.getnframes() == 256 + 10 * 128   # 11 frames
  capsys.readouterr()


@pytest.mark.slow
def test_generate_bad_input_is_one_line(run, tmp_path, capsys):
  broken = tmp_path / "broken.png"
  broken.write_bytes(b"not a png")
  write_png(tmp_path / "ok.png", np.zeros((8, 8), np.uint8))
  cases = [(["--image", str(broken)], 3, "bad media: --image"),
           (["--audio", str(tmp_path / "missing.wav")], 3, "file not found"),
           (["--effort", "huge"], 2, "--effort item 'huge'"),
           (["--top-p", "0"], 2, "--top-p must be in (0, 1]"),
           (["--samples", "0"], 2, "--samples must be >= 1"),
           (["--media", "video"], 2, "--media video: this run has no video codebook")]
  for extra, code, message in cases:
    assert main(["generate", "--workdir", str(run), *extra]) == code, extra
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
  assert main(["generate", "--workdir", str(tmp_path / "nothing")]) == 2
  assert "no run in" in capsys.readouterr().err
  assert main(["generate", "--workdir", str(run), "--image", str(tmp_path / "ok.png"),
               "--prompt", "the digit ", "--max-new-tokens", "3"]) == 0


def test_the_codebooks_and_tokenizer_travel_with_the_run(run, tmp_path, capsys, monkeypatch):
  """The run folder holds its codebooks (the default dataset's, equal to the data's own); with the
  data folders gone (resolving them fails), generate still codes a prompt and writes an image."""
  from omnimoe.data.pipeline import sources as sources_lib
  from omnimoe.train import config as config_lib
  from omnimoe.train import media_files
  saved = media_files.load(run)
  mix = sources_lib.resolve(config_lib.load(str(run / "config.yaml"), []).data)
  assert set(saved.codebooks) == set(mix.codebooks)
  for k in mix.codebooks:
    np.testing.assert_array_equal(saved.codebooks[k], mix.codebooks[k])
  assert saved.vocab == mix.vocab and saved.feature_dim == mix.feature_dim
  import shutil
  moved = tmp_path / "moved"
  shutil.copytree(run, moved)

  def gone(cfg):
    raise ValueError("data.sources: the prepared folders are gone")
  monkeypatch.setattr(sources_lib, "resolve", gone)
  monkeypatch.setattr("omnimoe.data.dataset_info", lambda *a, **k: gone(None))
  out = tmp_path / "out"
  png = tmp_path / "seven.png"
  write_png(png, np.full((8, 8), 128, np.uint8))
  assert main(["generate", "--workdir", str(moved), "--image", str(png), "--prompt", "draw:",
               "--media", "image", "--max-new-tokens", "6", "--out", str(out)]) == 0
  assert f"wrote {out / 'image_1.png'}" in capsys.readouterr().out.splitlines()
  (moved / "media" / "codebooks.npz").write_bytes(b"broken")
  assert main(["generate", "--workdir", str(moved), "--prompt", "x", "--out", str(out)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "media is damaged" in err[0]
