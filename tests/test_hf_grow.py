"""Growing an imported Qwen3-MoE omnimodal: its tokenizer.json as data.tokenizer, `omnimoe train
--init-from` on the default data, and the grown run exported back to transformers."""
import json

import numpy as np
import pytest

import hf_tiny
from omnimoe.data import tokenizer as tokenizer_lib
from omnimoe.train.cli import main
from omnimoe.train.hf_grow import grown

TEXTS = ["a handwritten digit seven", "the tone of the key five", "seven eight nine zero",
         "Every image is a digit; every tone is a key of the telephone.", "zero one two three"] * 20


def write_tokenizer(folder, vocab: int = 300) -> None:
  """A byte-level BPE tokenizer.json (any text encodes), trained here on TEXTS."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(TEXTS, trainers.BpeTrainer(
      vocab_size=vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      special_tokens=["<|endoftext|>"], show_progress=False))
  tok.save(str(folder / "tokenizer.json"))


def test_hf_tokenizer_round_trips_cuts_and_takes_the_model_vocabulary(tmp_path):
  write_tokenizer(tmp_path)
  tok = tokenizer_lib.load(tmp_path / "tokenizer.json")
  assert tok.fingerprint.startswith("hf:") and 260 <= tok.size <= 300
  text = "Seven tones, eight digits: ü and 日本 too.\nzero one two three " * 3
  assert tok.decode(tok.encode(text)) == text.encode()
  pieces = tok.cut(text.encode(), 5)
  assert b"".join(pieces) == text.encode()
  assert all(0 < len(tok.encode(p)) <= 5 for p in pieces)
  (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 512}))
  (tmp_path / "tokenizer.json").touch()   # a new mtime: read again, now beside config.json
  assert tokenizer_lib.load(tmp_path / "tokenizer.json").size == 512
  (tmp_path / "bad.json").write_text("{}")
  with pytest.raises(tokenizer_lib.TokenizerError, match="is not a Hugging Face tokenizer.json"):
    tokenizer_lib.load(tmp_path / "bad.json")


def test_grown_rows_keep_the_import_and_rescale_the_rest():
  rng = np.random.default_rng(0)
  fresh, imported = rng.normal(size=(64, 12)), 0.1 * rng.normal(size=(64, 6))
  out = grown(fresh, imported, np.arange(6) + 4, axis=1)      # a head [D, V]: ids 4..9 imported
  np.testing.assert_array_equal(out[:, 4:10], imported.astype(np.float32))
  others = np.r_[0:4, 10:12]
  np.testing.assert_allclose(out[:, others], fresh[:, others] * imported.std() / fresh[:, others].std(),
                             rtol=1e-5)


@pytest.mark.slow
def test_imported_model_grows_trains_on_the_default_data_and_exports(tmp_path, capsys):
  hf = tmp_path / "hf"
  model = hf_tiny.write(hf)
  write_tokenizer(hf)
  imported, run = tmp_path / "imported", tmp_path / "run"
  assert main(["import-hf", str(hf), "--out", str(imported)]) == 0
  assert main(["train", str(imported / "config.yaml"), "--init-from", str(imported), "--workdir",
               str(run), f"data.tokenizer={hf / 'tokenizer.json'}", "train.steps=40",
               "train.batch_size=8", "data.seq_len=64", "train.warmup_steps=5", "train.log_every=5",
               "eval.every_steps=0", "eval.batch_size=8", "eval.num_batches=2",
               "eval.image_limit=64", "eval.audio_limit=64", "eval.text_limit=4"]) == 0
  lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
  losses = [line["loss"] for line in lines if "loss" in line]
  evals = {k: v for line in lines for k, v in line.items() if k.startswith("eval/")}
  with capsys.disabled():
    print(f"\ngrown tiny Qwen3-MoE, 40 steps: train loss {losses[0]:.3f} -> {losses[-1]:.3f}; "
          + ", ".join(f"{k} {v:.3f}" for k, v in sorted(evals.items()) if "accuracy" in k))
  assert losses[-1] < losses[0] - 0.5
  assert "eval/image_to_text_accuracy" in evals and "eval/audio_to_text_accuracy" in evals
  record = json.loads((run / "hf_import.json").read_text())
  assert record["text_offset"] == 4 and record["vocab_size"] == hf_tiny.VOCAB
  out = tmp_path / "exported"
  assert main(["export-hf", "--workdir", str(run), "--out", str(out), "--dtype", "float32"]) == 0
  assert (out / "tokenizer.json").read_bytes() == (hf / "tokenizer.json").read_bytes()
  ids = np.random.default_rng(3).integers(0, hf_tiny.VOCAB, (8, 24))
  ours = hf_tiny.omnimoe_logits(run, ids + 4, vocab=768)[..., 4:4 + hf_tiny.VOCAB]
  theirs = hf_tiny.logits(hf_tiny.load(out), ids)
  np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=1e-4)
  assert np.abs(theirs - hf_tiny.logits(model, ids)).max() > 1e-2   # training moved it
