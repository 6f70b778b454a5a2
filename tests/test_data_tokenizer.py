"""`data.tokenizer`: a sentencepiece model instead of bytes, trained offline from the user's text."""
import dataclasses
import json
import math

import jax.numpy as jnp
import numpy as np
import pytest
import sentencepiece

from omnimoe import data
from omnimoe.data import tokenizer
from omnimoe.data.builtin import captions
from omnimoe.data.prepare import write as prepare
from omnimoe.data.prepare import folder as prepared
from omnimoe.data.builtin import text_corpus
from omnimoe.data.config import DataConfig, Source
from omnimoe.data.vocab import EOS, NUM_SPECIALS, SIZE_MULTIPLE, Vocab
from omnimoe.train.cli import main

PIECES = 1000
TEXTS = ["hello  world", " leading space", "trailing space \n", "the digit seven", "a\tb\r\nc",
         "naïve café 日本語 🙂 ≠ ∑", "x" * 300, "", "Ünïcödé — “quotes” and ‘apostrophes’"]
SMALL = ["model.num_layers=1", "model.d_model=32", "model.num_heads=2", "model.num_kv_heads=1",
         "model.head_dim=16", "model.rope_sections=[4,2,2]", "model.moe.num_experts=4",
         "model.moe.expert_hidden=32", "data.seq_len=64", "train.batch_size=8", "eval.batch_size=8",
         "eval.num_batches=1", "eval.image_limit=4", "eval.audio_limit=4", "eval.text_limit=2",
         "eval.max_new_tokens=3", "data.prefetch=0"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
  """A model trained by the helper command on the default dataset's text, written to a file."""
  folder = tmp_path_factory.mktemp("tok")
  corpus = folder / "corpus.txt"
  corpus.write_text("\n\n".join(d.decode() for d in text_corpus.documents()), encoding="utf-8")
  assert tokenizer.main(["train", str(corpus), "--vocab", str(PIECES),
                         "--out", str(folder / "tok.model")]) == 0
  return folder / "tok.model"


def vocab_of(model_path, **kw):
  return Vocab.from_config(DataConfig(tokenizer=str(model_path), **kw))


def test_the_vocabulary_grows_to_the_model_pieces(model):
  reference = sentencepiece.SentencePieceProcessor(model_file=str(model))
  assert reference.get_piece_size() == PIECES
  vocab = vocab_of(model, image_codebook=64, audio_codebook=32, video_codebook=16)
  assert vocab.text_tokens == PIECES
  assert vocab.image_offset == NUM_SPECIALS + PIECES and vocab.audio_offset == vocab.image_offset + 64
  assert vocab.video_offset == vocab.audio_offset + 32
  assert vocab.used_size == NUM_SPECIALS + PIECES + 64 + 32 + 16
  assert vocab.size % SIZE_MULTIPLE == 0 and vocab.used_size <= vocab.size < vocab.used_size + 128
  byte_vocab = Vocab.from_config(DataConfig(image_codebook=64, audio_codebook=32))
  assert byte_vocab.text_tokens == 256 and byte_vocab.image_offset == NUM_SPECIALS + 256
  # The ids are the model's own, shifted past the specials.
  ids = vocab.encode_text("the digit seven")
  np.testing.assert_array_equal(ids - NUM_SPECIALS, reference.encode("the digit seven"))


def test_text_round_trips_through_ids(model):
  vocab = vocab_of(model)
  for text in TEXTS:
    ids = vocab.encode_text(text)
    assert ids.dtype == np.int32
    assert np.all(vocab.is_text(ids)) and np.all(vocab.modality_of(ids) == 1)
    assert vocab.decode_text(ids) == text.encode("utf-8"), text
    assert vocab.decode_text(vocab.encode_text(text.encode("utf-8"))) == text.encode("utf-8")
  english = " ".join(d.decode() for d in text_corpus.documents()[:20])
  assert len(vocab.encode_text(english)) < 0.65 * len(english.encode())   # pieces, not bytes


@pytest.mark.parametrize("max_tokens", [6, 13, 62])
def test_long_text_is_cut_into_pieces_that_fit_and_add_up(model, max_tokens):
  vocab = vocab_of(model)
  text = ("".join(TEXTS) * 3).encode()
  pieces = vocab.text_pieces(text, max_tokens)
  assert len(pieces) > 1 and [last for *_, last in pieces] == [False] * (len(pieces) - 1) + [True]
  assert all(0 < len(ids) <= max_tokens for _, ids, _ in pieces)
  assert b"".join(vocab.decode_text(ids) for _, ids, _ in pieces) == text
  assert b"".join(piece for piece, _, _ in pieces) == text
  # Bytes (the default): consecutive slices of max_tokens bytes.
  byte_vocab = Vocab.from_config(DataConfig())
  got = [(byte_vocab.decode_text(ids), last) for _, ids, last in byte_vocab.text_pieces(text, max_tokens)]
  want = [text[i:i + max_tokens] for i in range(0, len(text), max_tokens)]
  assert got == [(p, i == len(want) - 1) for i, p in enumerate(want)]


def test_default_dataset_text_and_bits_per_byte_denominator(model):
  cfg = DataConfig(tokenizer=str(model))
  vocab = Vocab.from_config(cfg)
  docs = text_corpus.documents()
  _, heldout = text_corpus.split_documents(docs, cfg.heldout_fraction)
  total_bytes = sum(len(docs[i]) for i in heldout)
  batches = data.heldout_text_batches(cfg, batch_size=16, seed=0)
  per_batch = data.heldout_text_bytes(cfg, batch_size=16)
  assert len(per_batch) == len(batches) and sum(per_batch) == total_bytes
  tokens = sum(b["loss_weights"].sum() for b in batches)
  pieces = [ids for i in heldout for _, ids, _ in vocab.text_pieces(docs[i], cfg.seq_len - 2)]
  assert tokens == sum(len(ids) for ids in pieces) < 0.7 * total_bytes
  # Every held-out document comes back whole, segment by segment.
  text = b""
  for b in batches:
    for r in range(len(b["tokens"])):
      for s in range(1, b["segment_ids"][r].max() + 1):
        text += vocab.decode_text(b["tokens"][r][b["segment_ids"][r] == s])
  assert text == b"".join(docs[i] for i in heldout)
  # Byte-level: the denominator is the byte targets themselves.
  plain = DataConfig()
  assert data.heldout_text_bytes(plain, batch_size=16) == [
      int(b["loss_weights"].sum()) for b in data.heldout_text_batches(plain, batch_size=16, seed=0)]


@pytest.mark.parametrize("tokenized", [False, True], ids=["bytes", "sentencepiece"])
def test_eval_prompt_is_a_token_prefix_of_the_captions(model, tokenized):
  from omnimoe.train.evaluate import word_accuracy
  cfg = DataConfig(tokenizer=str(model) if tokenized else "")
  vocab = data.dataset_info(cfg, 0).vocab
  ps = data.prompt_set(cfg, modality="image", seed=0, max_new_tokens=12, limit=10)
  n = len(ps.prompt_ids)
  np.testing.assert_array_equal(ps.batch["tokens"][:, ps.prompt_len - n:ps.prompt_len],
                                np.broadcast_to(ps.prompt_ids, (10, n)))
  rest = []
  for r, answer in enumerate(ps.answers):
    caption = captions.render(captions.EVAL_TEMPLATE, captions.WORDS.index(answer))
    assert ps.expected[r] == caption.encode()
    ids = vocab.encode_text(caption)          # what training showed after the same media
    np.testing.assert_array_equal(ids[:n], ps.prompt_ids)
    rest.append(ids[n:])
  if tokenized:
    assert vocab.decode_text(ps.prompt_ids) in (b"the digit", b"the digit ")
  else:
    assert vocab.decode_text(ps.prompt_ids) == b"the digit "

  def generator(rows):   # stands in for greedy decoding: emits the given ids, then EOS
    out = np.zeros((len(rows), 12), np.int32)
    for r, ids in enumerate(rows):
      out[r, :len(ids) + 1] = [*ids, EOS]
    return lambda *args: out
  assert word_accuracy(generator(rest), None, ps, vocab) == 1.0
  assert word_accuracy(generator(rest[1:] + rest[:1]), None, ps, vocab) < 0.5
  assert word_accuracy(generator([ids[:-1] for ids in rest]), None, ps, vocab) == 0.0


def test_prepared_folders_count_tokens_and_must_match_the_run(model, tmp_path):
  long = "Ein längerer Text — " + " ".join(f"word{i}" for i in range(120))
  manifest = tmp_path / "m.jsonl"
  manifest.write_text("".join(json.dumps({"text": t}) + "\n"
                              for t in [long, "short one", "another line", "and a fourth", "fifth"]))
  cfg = DataConfig(seq_len=48, tokenizer=str(model), prefetch=0)
  card = prepare.prepare(manifest, tmp_path / "sp", cfg)
  assert card["prepared_with"]["tokenizer"].startswith("sentencepiece:")
  assert card["prepared_with"]["text_tokens"] == PIECES
  folder = prepared.open_folder(tmp_path / "sp")
  vocab = vocab_of(model)
  recs = [folder.record(i) for i in range(len(folder.lengths_N))]
  for rec, length in zip(recs, folder.lengths_N):
    assert length == 1 + sum(len(vocab.encode_text(p)) for p in rec.parts) + rec.eos <= 48
  assert card["text_bytes"] == sum(len(t.encode()) for t in [long, "short one", "another line",
                                                               "and a fourth", "fifth"])
  assert card["tokens"]["text"] < card["text_bytes"]
  pieces = [r.parts[0] for r in recs if r.line == 1]
  assert len(pieces) > 1 and b"".join(pieces) == long.encode()

  run = dataclasses.replace(cfg, sources=(Source(str(tmp_path / "sp")),))
  it = data.train_iterator(run, batch_size=2, seed=0)
  batch = next(it)
  it.close()
  for r in range(2):
    for s in range(1, batch["segment_ids"][r].max() + 1):
      text = vocab.decode_text(batch["tokens"][r][batch["segment_ids"][r] == s])
      assert text in long.encode() or text in (b"short one", b"another line", b"and a fourth", b"fifth")
  with pytest.raises(ValueError, match=r"was prepared with the sentencepiece model .*; this run has "
                                       r"byte-level text"):
    data.dataset_info(dataclasses.replace(run, tokenizer=""), 0)
  prepare.prepare(manifest, tmp_path / "bytes", dataclasses.replace(cfg, tokenizer=""))
  with pytest.raises(ValueError, match=r"was prepared with byte-level text .*; this run has the "
                                       r"sentencepiece model"):
    data.dataset_info(dataclasses.replace(run, sources=(Source(str(tmp_path / "bytes")),)), 0)


def test_bits_per_byte_is_per_byte_not_per_token(model):
  """With a zero output head every token costs ln(V) nats: bits per byte must be
  tokens * log2(V) / bytes, well below the per-token log2(V)."""
  from omnimoe.train import config as config_lib
  from omnimoe.train.evaluate import Evaluator
  from omnimoe.train.mesh import make_mesh
  from omnimoe.train.state import init_state, make_setup
  cfg = config_lib.load(None, [*SMALL, f"data.tokenizer={model}"])
  info = data.dataset_info(cfg.data, cfg.train.seed)
  setup = make_setup(cfg, make_mesh(), info)
  state = init_state(cfg, setup)
  assert state["params"]["head_DxV"].shape[1] == info.vocab.size == setup.vocab_size
  assert state["params"]["embed"]["table_VxD"].shape[0] == info.vocab.size
  params = dict(state["params"], head_DxV=jnp.zeros_like(state["params"]["head_DxV"]))
  evaluator = Evaluator(cfg, setup, info.vocab)
  metrics = evaluator(params, state.get("router"))
  text = evaluator.sets.text
  tokens = float(sum(b["loss_weights"].sum() for b in text))
  nbytes = sum(data.heldout_text_bytes(cfg.data, batch_size=cfg.eval.batch_size)[:len(text)])
  assert len(text) == 2 and evaluator.sets.text_bytes == nbytes > tokens
  want = tokens * math.log2(info.vocab.size) / nbytes
  assert metrics["eval/text_bits_per_byte"] == pytest.approx(want, rel=1e-5)
  assert metrics["eval/text_bits_per_byte"] < 0.8 * math.log2(info.vocab.size)
  assert metrics["eval/loss"] == pytest.approx(math.log(info.vocab.size), rel=1e-5)


@pytest.mark.slow
def test_a_tiny_training_run_with_the_tokenizer(model, tmp_path, capsys):
  wd = tmp_path / "run"
  assert main(["train", *SMALL, "train.steps=3", "train.log_every=1", "eval.every_steps=0",
               f"data.tokenizer={model}", "--workdir", str(wd)]) == 0
  assert "finished 3 steps" in capsys.readouterr().out
  rows = [json.loads(l) for l in (wd / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
  assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r)
  final = [r for r in rows if "eval/loss" in r][-1]
  for key in ("eval/loss", "eval/loss/text", "eval/text_bits_per_byte",
              "eval/image_to_text_accuracy", "eval/loss/source/default"):
    assert math.isfinite(final[key]), key
  # The loss starts near ln(vocab size): the model was built with the grown vocabulary.
  size = vocab_of(model).size
  assert abs(rows[0]["loss"] - math.log(size)) < 1.0, (rows[0]["loss"], math.log(size))
  assert main(["eval", "--workdir", str(wd)]) == 0
  assert json.loads(capsys.readouterr().out)["step"] == 3


def test_bad_tokenizer_input_is_one_line_exit_2(model, tmp_path, capsys, monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "junk.model").write_bytes(b"this is not a model")
  manifest = tmp_path / "m.jsonl"
  manifest.write_text('{"text": "hi there"}\n')
  for argv, needle in [
      (["train", "data.tokenizer=nope.model", "--workdir", str(tmp_path / "r1")],
       f"data.tokenizer '{tmp_path / 'nope.model'}' does not exist"),
      (["train", f"data.tokenizer={tmp_path / 'junk.model'}", "--workdir", str(tmp_path / "r2")],
       f"data.tokenizer '{tmp_path / 'junk.model'}' is not a sentencepiece model"),
      (["prepare", str(manifest), "--out", str(tmp_path / "o"), f"data.tokenizer={tmp_path / 'junk.model'}"],
       "is not a sentencepiece model"),
  ]:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert needle in err, err
  assert not (tmp_path / "o").exists()
  for argv, needle in [
      (["train", str(tmp_path / "missing.txt"), "--vocab", "500", "--out", str(tmp_path / "t.model")],
       "does not exist"),
      (["train", str(manifest), "--vocab", "100", "--out", str(tmp_path / "t.model")],
       "too small"),
  ]:
    assert tokenizer.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err, err
  assert not (tmp_path / "t.model").exists()
