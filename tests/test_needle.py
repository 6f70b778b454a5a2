"""The needle retrieval task: generator, batches, retrieval metric, report heatmap, config, a run."""
import json
import re

import numpy as np
import pytest

from omnimoe import data
from omnimoe.data.builtin import needle
from omnimoe.data.config import DataConfig
from omnimoe.data.pipeline import needle as needle_batches
from omnimoe.data.vocab import Vocab
from omnimoe.train import config as config_lib
from omnimoe.train.cli import main

VOCAB = Vocab.from_config(DataConfig())
HELDOUT = needle.filler_documents(0.2, heldout=True)
FACT_RE = re.compile(rb" ([a-z]{4,6}):([0-9]{4,5})\. ")
QUESTION_RE = re.compile(rb"\n([a-z]{4,6}):([0-9]{4,5})\.")
# A needle config small enough for seconds: rows of 512 holding two documents of 256.
SMALL = ["data.task=needle", "data.seq_len=512", "data.needle_lengths=[256]", "data.needle_facts=[2]",
         "data.needle_questions=[2]", "data.needle_eval_lengths=[320]", "data.needle_eval_docs=4",
         "data.needle_eval_facts=3", "data.needle_eval_questions=3", "data.prefetch=0"]


def small_cfg(*overrides):
  return config_lib.load(None, [*SMALL, *overrides])


def document(seed=0, **kw):
  kw = {"num_facts": 4, "num_questions": 3, "haystack_len": 600, **kw}
  return needle.make_document(np.random.default_rng(seed), VOCAB, HELDOUT, **kw)


def test_the_generator_is_deterministic_by_seed():
  a, b, c = document(1), document(1), document(2)
  np.testing.assert_array_equal(a.tokens_N, b.tokens_N)
  assert a.questions == b.questions
  assert not np.array_equal(a.tokens_N[:200], c.tokens_N[:200])


def test_facts_land_at_the_requested_depths_and_lengths_are_exact():
  for seed in range(10):
    deciles = [(seed + j) % 10 for j in range(5)]
    doc = document(seed, num_facts=6, num_questions=5, haystack_len=700, deciles=deciles)
    assert doc.haystack_len == 700 and doc.tokens_N[0] == 1   # BOS
    assert [q.decile for q in doc.questions] == deciles
    for q in doc.questions:
      assert q.depth == q.fact_start / 700 and int(10 * q.fact_start // 700) == q.decile
      fact = needle.FACT.format(key=q.key, value=q.value).encode()
      assert VOCAB.decode_text(doc.tokens_N[q.fact_start:q.fact_start + len(fact)]) == fact
      assert q.fact_start + len(fact) <= 700, "the fact ends inside the haystack"
  doc = document(3, doc_len=512, haystack_len=None)
  assert len(doc.tokens_N) == 512 and doc.haystack_len < 512


def test_each_answer_is_its_facts_value_by_parsing_the_text():
  for seed in range(20):
    doc = document(seed)
    text = VOCAB.decode_text(doc.tokens_N)
    haystack, tail = text[:doc.haystack_len - 1], text[doc.haystack_len - 1:]
    facts = dict(FACT_RE.findall(haystack))
    asked = QUESTION_RE.findall(tail)
    assert len(facts) == 4 and len(asked) == 3
    assert len({k for k, _ in asked}) == 3, "questions ask about distinct facts"
    for key, value in asked:
      assert facts[key] == value
    assert tail == b"".join(b"\n%s:%s." % (k, v) for k, v in asked)


def test_keys_are_distinct_in_a_row_and_fresh_across_rows():
  cfg = small_cfg("data.needle_lengths=[512]", "data.needle_facts=[6]", "data.needle_questions=[2]")
  rows = [row[0] for row in needle_batches.train_rows(cfg.data, VOCAB, 0, 0, range(16))]
  key_sets = [set(FACT_RE.findall(VOCAB.decode_text(d.tokens_N))) for d in rows]
  for keys in key_sets:
    assert len({k for k, _ in keys}) == 6
  pairs = [kv for keys in key_sets for kv in keys]
  assert len(set(pairs)) == len(pairs) == 96, "no key -> value pair repeats across rows"
  later = needle_batches.train_rows(cfg.data, VOCAB, 0, 1, range(16))
  assert not set(FACT_RE.findall(VOCAB.decode_text(later[0][0].tokens_N))) & set(pairs)


def test_training_batches_follow_the_contract_with_loss_on_answers_only():
  cfg = small_cfg("train.batch_size=4")
  it = data.train_iterator(cfg.data, batch_size=4, seed=0)
  batch = next(it)
  assert set(batch) == set(data.BATCH_KEYS)
  assert batch["tokens"].shape == (4, 512) and batch["positions"].shape == (4, 512, 3)
  assert batch["tokens"].dtype == np.int32 and batch["modality"].dtype == np.int8
  assert batch["loss_weights"].dtype == np.float32
  np.testing.assert_array_equal(batch["segment_ids"], np.repeat([1, 2], 256)[None].repeat(4, 0))
  np.testing.assert_array_equal(batch["positions"][0, :, 0], np.tile(np.arange(256), 2))
  np.testing.assert_array_equal(batch["targets"][:, :255], batch["tokens"][:, 1:256])
  w = batch["loss_weights"]
  assert set(np.unique(w)) == {0.0, 1.0}
  for row in range(4):
    answers = VOCAB.decode_text(batch["targets"][row][w[row] > 0])
    text = VOCAB.decode_text(batch["tokens"][row])
    expected = b"".join(v + b"." for _, v in QUESTION_RE.findall(text))
    assert answers == expected and len(expected) >= 4 * 5 * 2 // 2
  state = it.get_state()
  following = next(it)
  it.set_state(state)
  np.testing.assert_array_equal(next(it)["tokens"], following["tokens"])
  with pytest.raises(ValueError, match="not the needle task's"):
    it.set_state({"next_example": 3})


def test_a_row_of_seq_len_is_one_document_and_the_curriculum_switches_by_step():
  cfg = small_cfg("data.needle_lengths=[256,512]", "data.needle_phase_steps=[2]")
  assert [needle_batches.length_at(cfg.data, b) for b in range(4)] == [256, 256, 512, 512]
  it = data.train_iterator(cfg.data, batch_size=2, seed=0)
  it.set_state({"next_batch": 2})
  batch = next(it)
  assert (batch["segment_ids"] == 1).all()


def test_held_out_sets_have_equal_questions_per_decile_and_held_out_filler():
  cfg = small_cfg("data.needle_eval_docs=20", "data.needle_eval_questions=5",
                  "data.needle_eval_facts=5", "data.needle_eval_lengths=[512]")
  (s,) = data.retrieval_sets(cfg.data, batch_size=8, seed=0)
  assert s.length == 512 and [len(b["tokens"]) for b in s.batches] == [8, 8, 4]
  assert s.batches[0]["tokens"].shape[1] % 128 == 0
  deciles = np.concatenate(s.deciles)
  assert np.bincount(deciles, minlength=10).tolist() == [10] * 10
  for batch, q_BxL in zip(s.batches, s.questions):
    np.testing.assert_array_equal(q_BxL > 0, batch["loss_weights"] > 0)
    assert set(np.unique(batch["segment_ids"])) == {0, 1}
  from omnimoe.data.builtin import text_corpus
  docs = text_corpus.documents()
  train_ids, held_ids = text_corpus.split_documents(docs, 0.2)
  assert HELDOUT == tuple(docs[i] for i in held_ids)
  assert needle.filler_documents(0.2, heldout=False) == tuple(docs[i] for i in train_ids)


@pytest.mark.parametrize("override, key", [
    ("data.task=needles", "data.task"),
    ("data.needle_facts=[40]", "data.needle_lengths"),
    ("data.needle_lengths=[300]", "data.needle_lengths"),
    ("data.needle_phase_steps=[5]", "data.needle_phase_steps"),
    ("data.needle_questions=[3]", "data.needle_questions"),
    ("data.needle_eval_lengths=[100]", "data.needle_eval_lengths"),
])
def test_impossible_settings_are_one_line_errors_naming_the_key(override, key):
  with pytest.raises(ValueError, match=re.escape(key)) as e:
    data.dataset_info(small_cfg(override).data, 0)
  assert "\n" not in str(e.value)


def test_retrieval_accuracy_against_a_hand_made_oracle():
  """Logits right at some answers' positions and wrong at others give exactly that accuracy per
  decile: question 1 (2 positions) right, 2 wrong at one of its 3 positions, 3 right, 4 wrong."""
  import jax.numpy as jnp

  from omnimoe.train import retrieval

  B, L, V = 2, 8, 5
  targets = np.arange(B * L).reshape(B, L) % V
  q = np.zeros((B, L), np.int32)
  q[0, 1:3], q[0, 4:7], q[1, 0:2], q[1, 5:7] = 1, 2, 3, 4
  logits = np.eye(V)[targets] * 3.0
  logits[0, 5] = np.eye(V)[(targets[0, 5] + 1) % V]      # question 2, one position wrong
  logits[1, 6] = np.eye(V)[(targets[1, 6] + 2) % V]      # question 4
  logits[0, 0] = np.eye(V)[(targets[0, 0] + 1) % V]      # not an answer: does not count
  correct = retrieval.answers_correct(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(q), 4)
  np.testing.assert_array_equal(np.asarray(correct), [True, False, True, False])
  m = retrieval.metrics([(512, np.asarray(correct), np.asarray([0, 0, 3, 3])),
                         (1024, np.asarray([True, True, False]), np.asarray([0, 3, 3]))])
  assert m["eval/retrieval_accuracy"] == pytest.approx(4 / 7)
  assert m["eval/retrieval_accuracy/depth_0"] == pytest.approx(2 / 3)
  assert m["eval/retrieval_accuracy/depth_3"] == pytest.approx(2 / 4)
  assert m["eval/retrieval_accuracy/len_512/depth_0"] == 0.5
  assert m["eval/retrieval_accuracy/len_1024/depth_3"] == 0.5
  assert m["eval/retrieval_accuracy/len_1024"] == pytest.approx(2 / 3)
  assert "eval/retrieval_accuracy/depth_5" not in m


def test_report_draws_the_retrieval_heatmap(tmp_path, capsys):
  from omnimoe.train import report

  rows = [{"step": 1, "loss": 2.0, "moe/expert_load/text/layer_0": [0.5, 0.5]}]
  for step, acc in ((10, 0.3), (20, 0.9)):
    row = {"step": step, "eval/loss": 1.0, "eval/retrieval_accuracy": acc}
    for length in (512, 2048):
      for d in range(10):
        row[f"eval/retrieval_accuracy/len_{length}/depth_{d}"] = acc - 0.01 * d * (length > 512)
    rows.append(row)
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  grid, lengths, step = report.retrieval_grid(report.load_metrics(tmp_path))
  assert step == 20 and lengths == [512, 2048] and grid.shape == (10, 2)
  assert grid[9, 1] == pytest.approx(0.81) and grid[0, 0] == 0.9
  assert main(["report", "--workdir", str(tmp_path)]) == 0
  printed = capsys.readouterr().out.split()
  assert printed[-1] == str(tmp_path / "retrieval.png")
  assert (tmp_path / "retrieval.png").read_bytes()[:4] == b"\x89PNG"
  assert report.retrieval_grid(rows[:1]) is None


def test_the_shipped_config_loads(capsys):
  assert main(["config", "needle"]) == 0
  printed = capsys.readouterr().out
  assert "task: needle" in printed
  cfg = config_lib.load("needle")
  needle_batches.check(cfg.data)
  assert 2048 in cfg.data.needle_eval_lengths and cfg.data.needle_lengths[-1] == 2048
  per_decile = cfg.data.needle_eval_docs * cfg.data.needle_eval_questions // 10
  assert per_decile >= 50 and cfg.model.moe.num_experts > 1


def test_two_steps_of_a_tiny_needle_run_end_to_end(tmp_path):
  from omnimoe.train import loop

  cfg = config_lib.load("needle", [
      *SMALL, "model.num_layers=2", "model.d_model=32", "model.num_heads=2",
      "model.num_kv_heads=1", "model.head_dim=16", "model.rope_sections=[4,2,2]",
      "model.moe.num_experts=4", "model.moe.expert_hidden=32", "train.steps=2",
      "train.batch_size=8", "eval.batch_size=8", "eval.num_batches=1", "data.needle_phase_steps=[]"])
  summary = loop.train(cfg, tmp_path, progress=False)
  assert summary.step == 2
  keys = summary.eval
  assert np.isfinite(keys["eval/loss"]) and keys["eval/loss"] > 0
  # 4 documents x 3 questions: question j of document i asks about decile (3i + j) mod 10, so
  # deciles 0 and 1 have two questions and the others one; one length, so every view agrees.
  count = {d: 2 if d < 2 else 1 for d in range(10)}
  depth = {d: keys[f"eval/retrieval_accuracy/len_320/depth_{d}"] for d in range(10)}
  for d in range(10):
    assert depth[d] * count[d] == round(depth[d] * count[d])       # a share of whole questions
    assert keys[f"eval/retrieval_accuracy/depth_{d}"] == depth[d]
  overall = sum(depth[d] * count[d] for d in range(10)) / 12
  assert keys["eval/retrieval_accuracy"] == pytest.approx(overall, abs=1e-12)
  assert keys["eval/retrieval_accuracy/len_320"] == pytest.approx(overall, abs=1e-12)
  assert "eval/text_bits_per_byte" not in keys
  line = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()
          if '"ce_loss"' in x][-1]
  from omnimoe.train.plan import model_flops_per_token
  from omnimoe.train.state import make_setup
  assert 0 < line["real_tokens_per_s"] <= line["tokens_per_s"]
  params = make_setup(cfg, loop.make_mesh(cfg.mesh), data.dataset_info(cfg.data, 0)
                      ).abstract_state["params"]
  assert line["tflops_per_device"] == pytest.approx(
      model_flops_per_token(cfg, params) * line["real_tokens_per_s"] / 8 / 1e12, rel=1e-9)
  assert 0 < line["mfu"] < 1
