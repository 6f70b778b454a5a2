"""Growing an imported Qwen3-MoE omnimodal: its tokenizer.json as data.tokenizer, `omnimoe train
--init-from` on the default data, and the grown run exported back to transformers."""
import json

import jax
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
  for corrupt, what in (('{"vocab_size": 5', "not readable JSON"), ("[512]", "expected a JSON object")):
    (tmp_path / "config.json").write_text(corrupt)      # named in one line, never silently skipped
    (tmp_path / "tokenizer.json").touch()
    with pytest.raises(tokenizer_lib.TokenizerError, match=f"config.json: {what}") as err:
      tokenizer_lib.load(tmp_path / "tokenizer.json")
    assert "\n" not in str(err.value)
  (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 512}))
  (tmp_path / "bad.json").write_text("{}")
  with pytest.raises(tokenizer_lib.TokenizerError, match="is not a Hugging Face tokenizer.json"):
    tokenizer_lib.load(tmp_path / "bad.json")


def test_hf_ids_stay_as_they_are_and_specials_map_onto_the_models_own(tmp_path):
  """The unified vocabulary of a tokenizer.json: text id = Hugging Face id (the `tokenizers`
  library is the oracle); EOS/BOS/PAD the model's own where it has them, else appended."""
  import dataclasses
  from tokenizers import Tokenizer
  from omnimoe.data.config import DataConfig
  from omnimoe.data.examples import make_sequence
  from omnimoe.data.vocab import Vocab
  write_tokenizer(tmp_path)
  path = tmp_path / "tokenizer.json"
  oracle = Tokenizer.from_file(str(path))
  end = oracle.token_to_id("<|endoftext|>")
  cfg = DataConfig(tokenizer=str(path))
  (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 512, "bos_token_id": end,
                                                    "eos_token_id": [end, 7]}))
  vocab = Vocab.from_config(cfg)
  # Qwen's way: BOS = EOS = <|endoftext|>: EOS is the model's, BOS and PAD are new ids after the text
  assert (vocab.text_offset, vocab.text_tokens, vocab.eos, vocab.pad, vocab.bos) == (0, 512, end, 512, 513)
  assert vocab.image_offset == 514
  text = "seven eight nine zero: Every image is a digit"
  want = oracle.encode(text, add_special_tokens=False).ids
  np.testing.assert_array_equal(vocab.encode_text(text), want)
  assert vocab.decode_text([vocab.bos, *want, vocab.eos, vocab.pad]) == text.encode()
  example = make_sequence([vocab.encode_text(text)], 4, specials=vocab)
  np.testing.assert_array_equal(example.tokens_N, [513, *want, end])
  assert list(vocab.modality_of(np.asarray([end, 512, 513, want[0], 514]))) == [0, 0, 0, 1, 2]
  # a model with its own BOS, EOS and padding token (tokenizer_config.json names them)
  (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 512}))
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(
      {"bos_token": "a", "eos_token": {"content": "<|endoftext|>"}, "pad_token": "b"}))
  path.touch()
  vocab = Vocab.from_config(dataclasses.replace(cfg))
  assert (vocab.bos, vocab.eos, vocab.pad, vocab.appended) == (
      oracle.token_to_id("a"), end, oracle.token_to_id("b"), 0)
  assert not vocab.is_text(np.asarray([vocab.bos, vocab.eos, vocab.pad])).any()
  # byte-level text keeps its layout: PAD, BOS, EOS, reserved, then the 256 bytes
  byte = Vocab.from_config(DataConfig())
  assert (byte.pad, byte.bos, byte.eos, byte.text_offset, byte.appended) == (0, 1, 2, 4, 0)


def test_imported_weights_learn_at_their_share_of_the_rate(tmp_path):
  """AdamW's update with train.init_lr_scale=s is s times the full-rate update on every imported
  weight (the embedding's and head's imported rows only) and equal elsewhere, leaf by leaf."""
  import jax
  from omnimoe.data.vocab import Vocab, hf_layout
  from omnimoe.train import config as config_lib
  from omnimoe.train.hf_grow import lr_scales
  from omnimoe.train.state import _new_model, make_optimizer
  from flax import nnx
  keys = [f"{k}={v}" for k, v in hf_tiny.OMNIMOE_KEYS.items()]
  cfg = config_lib.load(None, keys + ["model.rope_sections=[2,2,2]", f"train.init_from={tmp_path}",
                                      "train.init_lr_scale=0.25",
                                      "model.scan_layers=false"])
  vocab = Vocab(image_codes=16, audio_codes=8, **hf_layout(300, eos=0))
  params = jax.jit(lambda: nnx.to_pure_dict(nnx.state(_new_model(cfg, vocab.size, 8, 0))))()
  grads = jax.jit(lambda ps: jax.tree.map(
      lambda p: jax.random.normal(jax.random.key(p.size), p.shape), ps))(params)
  full, part = make_optimizer(cfg), make_optimizer(cfg, lr_scales(cfg, vocab, params))

  def step(opt):                           # the second step: the warmup starts at a rate of 0
    def two(params, grads):
      _, state = opt.update(grads, opt.init(params), params)
      return opt.update(grads, state, params)[0]
    return jax.jit(two)(params, grads)
  u_full, u_part = step(full), step(part)
  flat_full = dict(jax.tree_util.tree_leaves_with_path(u_full))
  seen = set()
  for path, leaf in jax.tree_util.tree_leaves_with_path(u_part):
    name = jax.tree_util.keystr(path)
    want = np.asarray(flat_full[path])
    if "table_VxD" in name or "head_DxV" in name:
      axis = 0 if "table_VxD" in name else 1
      rows = np.arange(vocab.size) < vocab.text_end
      np.testing.assert_allclose(np.compress(rows, leaf, axis), 0.25 * np.compress(rows, want, axis), rtol=1e-6)
      np.testing.assert_array_equal(np.compress(~rows, leaf, axis), np.compress(~rows, want, axis))
      seen.add("vocab")
    elif "blocks" in name or "final_norm" in name:
      np.testing.assert_allclose(leaf, 0.25 * want, rtol=1e-6)
      seen.add("imported")
    else:                                   # the media embedders: the run's own, full rate
      np.testing.assert_array_equal(leaf, want)
      seen.add("new")
    assert np.abs(want).max() > 0, name
  assert seen == {"vocab", "imported", "new"}


def test_grown_rows_keep_the_import_and_rescale_the_rest():
  rng = np.random.default_rng(0)
  fresh, imported = rng.normal(size=(64, 12)), 0.1 * rng.normal(size=(64, 6))
  out = grown(fresh, imported, np.arange(6) + 4, axis=1)      # a head [D, V]: ids 4..9 imported
  np.testing.assert_array_equal(out[:, 4:10], imported.astype(np.float32))
  others = np.r_[0:4, 10:12]
  np.testing.assert_allclose(out[:, others], fresh[:, others] * imported.std() / fresh[:, others].std(),
                             rtol=1e-5)


@pytest.fixture(scope="module")
def imported_tiny(tmp_path_factory):
  """(its folder, the import's folder, the transformers model): the tiny Qwen3-MoE with the BPE
  tokenizer, whose <|endoftext|> is the model's BOS and EOS (as Qwen3's is), imported."""
  root = tmp_path_factory.mktemp("imported_tiny")
  hf = root / "hf"
  hf.mkdir()
  write_tokenizer(hf)
  end = json.loads((hf / "tokenizer.json").read_text())["added_tokens"][0]["id"]  # <|endoftext|>
  model = hf_tiny.write(hf, bos_token_id=end, eos_token_id=end)
  assert main(["import-hf", str(hf), "--out", str(root / "imported")]) == 0
  return hf, root / "imported", model


@pytest.mark.slow
def test_imported_model_grows_trains_on_the_default_data_and_exports(imported_tiny, tmp_path, capsys):
  hf, imported, model = imported_tiny
  end = json.loads((hf / "tokenizer.json").read_text())["added_tokens"][0]["id"]
  run = tmp_path / "run"
  assert main(["train", str(imported / "config.yaml"), "--init-from", str(imported), "--workdir",
               str(run), f"data.tokenizer={hf / 'tokenizer.json'}", "train.steps=40",
               "train.batch_size=8", "data.seq_len=64", "train.warmup_steps=5", "train.log_every=5",
               "eval.every_steps=0", "eval.batch_size=8", "eval.num_batches=2",
               "eval.image_limit=16", "eval.audio_limit=16", "eval.text_limit=4"]) == 0
  lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
  losses = [line["loss"] for line in lines if "loss" in line]
  evals = {k: v for line in lines for k, v in line.items() if k.startswith("eval/")}
  with capsys.disabled():
    print(f"\ngrown tiny Qwen3-MoE, 40 steps: train loss {losses[0]:.3f} -> {losses[-1]:.3f}; "
          + ", ".join(f"{k} {v:.3f}" for k, v in sorted(evals.items()) if "accuracy" in k))
  assert losses[-1] < losses[0] - 0.5
  assert "eval/image_to_text_accuracy" in evals and "eval/audio_to_text_accuracy" in evals
  record = json.loads((run / "hf_import.json").read_text())
  assert record["text_offset"] == 0 and record["vocab_size"] == hf_tiny.VOCAB
  media = json.loads((run / "media" / "media.json").read_text())
  assert (media["eos"], media["pad"], media["bos"]) == (end, hf_tiny.VOCAB, hf_tiny.VOCAB + 1)
  out = tmp_path / "exported"
  assert main(["export-hf", "--workdir", str(run), "--out", str(out), "--dtype", "float32"]) == 0
  assert (out / "tokenizer.json").read_bytes() == (hf / "tokenizer.json").read_bytes()
  ids = np.random.default_rng(3).integers(0, hf_tiny.VOCAB, (8, 24))
  ours = hf_tiny.omnimoe_logits(run, ids, vocab=768)[..., :hf_tiny.VOCAB]     # ids as they are
  theirs = hf_tiny.logits(hf_tiny.load(out), ids)
  np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=1e-4)
  assert np.abs(theirs - hf_tiny.logits(model, ids)).max() > 1e-2   # training moved it


def test_imported_weights_stay_put_at_a_learning_rate_share_of_zero(imported_tiny, tmp_path):
  """train.init_lr_scale=0 as the trainer opens a run from an import (train/loop.py `_open_run`:
  its setup, the grown state): after two train steps every imported weight is bit-identical to
  the grown start, while the new rows and the media embedder moved (the first step's rate is 0 in
  the warmup, so two steps make one real update)."""
  from omnimoe.train import config as config_lib, loop
  from omnimoe.train.mesh import batch_sharding, global_batch
  from omnimoe.train.step import make_train_step
  _, imported, _ = imported_tiny
  cfg = config_lib.load(imported / "config.yaml", [
      f"train.init_from={imported}", "train.init_lr_scale=0", "train.batch_size=8",
      "data.seq_len=64", "train.warmup_steps=1", "train.ema_decay=0"])
  run = loop._open_run(cfg, tmp_path / "run")
  step = make_train_step(cfg, run.setup, batch_sharding(run.mesh, cfg.data.seq_len))
  start = jax.tree.map(np.asarray, run.state["params"])
  state = run.state
  for _ in range(2):
    state, _ = step(state, global_batch(next(run.batches), run.mesh))
  end = jax.tree.map(np.asarray, state["params"])
  run.close()
  V = hf_tiny.VOCAB
  for path, leaf in jax.tree_util.tree_leaves_with_path(start):
    name, new = jax.tree_util.keystr(path), end
    for key in path:
      new = new[key.key]
    if "table_VxD" in name or "head_DxV" in name:
      axis = 0 if "table_VxD" in name else 1
      np.testing.assert_array_equal(np.take(new, np.arange(V), axis), np.take(leaf, np.arange(V), axis))
      rest = np.arange(V, leaf.shape[axis])
      assert np.abs(np.take(new, rest, axis) - np.take(leaf, rest, axis)).max() > 1e-4, name
    elif "proj_MxFxD" in name:
      assert np.abs(new - leaf).max() > 1e-4               # the media embedder learns
    elif "bias_MxD" not in name:
      np.testing.assert_array_equal(new, leaf, err_msg=name)


def test_a_run_grown_with_the_old_layout_is_refused_on_resume(tmp_path):
  """Runs grown before the ids stayed as they are (text offset 4) cannot resume under the new
  layout: one line naming the record."""
  from omnimoe.data.vocab import Vocab, hf_layout
  from omnimoe.train.config import ConfigError
  from omnimoe.train.hf_grow import check_resume
  vocab = Vocab(image_codes=4, audio_codes=4, **hf_layout(300, eos=0))
  check_resume(tmp_path, vocab)                       # no record: not a grown run
  (tmp_path / "hf_import.json").write_text(json.dumps({"text_offset": 0}))
  check_resume(tmp_path, vocab)
  (tmp_path / "hf_import.json").write_text(json.dumps({"text_offset": 4}))
  with pytest.raises(ConfigError, match="start at row 4.*at row 0"):
    check_resume(tmp_path, vocab)
