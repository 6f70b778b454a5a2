"""`data.task=needle`: batches of the retrieval task (data/builtin/needle.py makes the documents).

Training: batch b is in curriculum phase p (data.needle_phase_steps: batches per phase but the
last), whose documents are `data.needle_lengths[p]` tokens long with data.needle_facts[p] facts and
data.needle_questions[p] questions (one number: every phase); a row of data.seq_len holds
seq_len / length of them, each its own segment (positions from 0), so at length = seq_len a row
is one document with segment ids all 1. Every row is drawn from (seed, batch, global row), so hosts
build disjoint rows of the same global batch and the iterator state is one integer,
`{"next_batch": b}`. Loss weights are 1 exactly where the target is an answer token.

Held-out (`retrieval_sets`): per length H in data.needle_eval_lengths, data.needle_eval_docs
documents of a haystack of exactly H tokens from the corpus's held-out documents, one per row,
padded to a multiple of 128; question j of document i asks about a fact planted in depth decile
(i * Q + j) mod 10, so every decile gets the same number of questions.
"""
from typing import NamedTuple

import grain
import numpy as np

from omnimoe.data.builtin import needle
from omnimoe.data.config import TASKS, DataConfig, feature_dim
from omnimoe.data.examples import make_sequence
from omnimoe.data.packing import loss_weight_table, pack
from omnimoe.data.vocab import Vocab

TRAIN_STREAM, HELDOUT_STREAM, LOSS_STREAM = 11, 12, 13   # rng = default_rng([stream, seed, ...])
ROW_MULTIPLE = 128           # held-out rows are padded to a multiple of this
MIN_FILLER = 16              # filler tokens a training document keeps at least


def check(cfg: DataConfig) -> None:
  """Raises ValueError naming the key when the needle settings cannot work."""
  if cfg.task not in TASKS:
    raise ValueError(f"config key 'data.task' must be {' or '.join(TASKS)}; got '{cfg.task}'")
  if cfg.task != "needle":
    return
  if not cfg.needle_lengths:
    raise ValueError("config key 'data.needle_lengths' needs at least one length")
  for length in cfg.needle_lengths:
    if length <= 0 or cfg.seq_len % length:
      raise ValueError(f"config key 'data.needle_lengths': each length must divide "
                       f"data.seq_len={cfg.seq_len}, got {length}")
  if len(cfg.needle_phase_steps) != len(cfg.needle_lengths) - 1 or \
      any(s <= 0 for s in cfg.needle_phase_steps):
    raise ValueError(f"config key 'data.needle_phase_steps' needs {len(cfg.needle_lengths) - 1} "
                     f"positive step counts (one per phase but the last), got "
                     f"{list(cfg.needle_phase_steps)}")
  for name in ("needle_facts", "needle_questions"):
    values = getattr(cfg, name)
    if len(values) not in (1, len(cfg.needle_lengths)) or min(values, default=0) <= 0:
      raise ValueError(f"config key 'data.{name}' needs one positive number or one per phase of "
                       f"data.needle_lengths ({len(cfg.needle_lengths)}), got {list(values)}")
  for name in ("needle_eval_docs", "needle_eval_facts", "needle_eval_questions"):
    if getattr(cfg, name) <= 0:
      raise ValueError(f"config key 'data.{name}' must be positive, got {getattr(cfg, name)}")
  for p, length in enumerate(cfg.needle_lengths):
    facts, questions = per_phase(cfg.needle_facts, p), per_phase(cfg.needle_questions, p)
    if questions > facts:
      raise ValueError(f"config key 'data.needle_questions' must be at most data.needle_facts="
                       f"{facts} (phase {p}), got {questions}")
    # The worst case must fit: every fact and question at its longest.
    need = 1 + facts * needle.FACT_MAX_BYTES + questions * needle.QUESTION_MAX_BYTES
    if length < need + MIN_FILLER:
      raise ValueError(f"config key 'data.needle_lengths': {length} tokens leave too little "
                       f"filler for {facts} facts and {questions} questions (at least "
                       f"{need + MIN_FILLER} needed); raise it or lower data.needle_facts")
  if cfg.needle_eval_questions > cfg.needle_eval_facts:
    raise ValueError(f"config key 'data.needle_eval_questions' must be at most "
                     f"data.needle_eval_facts={cfg.needle_eval_facts}, got "
                     f"{cfg.needle_eval_questions}")
  need = 1 + cfg.needle_eval_facts * needle.FACT_MAX_BYTES
  for H in cfg.needle_eval_lengths:
    if H < max(2 * need, needle.DECILES * needle.FACT_MAX_BYTES):
      raise ValueError(f"config key 'data.needle_eval_lengths': a haystack of {H} tokens is too "
                       f"short for {cfg.needle_eval_facts} facts, one in each depth decile (at least "
                       f"{max(2 * need, needle.DECILES * needle.FACT_MAX_BYTES)})")


def per_phase(values: tuple[int, ...], phase: int) -> int:
  """A needle_facts / needle_questions value of a phase: one for all, or one per phase."""
  return values[0] if len(values) == 1 else values[phase]


def phase_at(cfg: DataConfig, batch: int) -> int:
  """The curriculum phase of training batch `batch` (0-based)."""
  for p, steps in enumerate(cfg.needle_phase_steps):
    if batch < steps:
      return p
    batch -= steps
  return len(cfg.needle_lengths) - 1


def length_at(cfg: DataConfig, batch: int) -> int:
  """The document length of training batch `batch`: its curriculum phase's."""
  return cfg.needle_lengths[phase_at(cfg, batch)]


def pack_documents(rows: list[list[needle.Document]], cfg: DataConfig, seq_len: int) -> dict:
  """Rows of documents -> the batch contract; loss weight 1 where the target is an answer token."""
  f, vocab = feature_dim(cfg), Vocab.from_config(cfg)
  batch = pack([[make_sequence([d.tokens_N[1:]], f, eos=False, specials=vocab) for d in row]
                for row in rows], seq_len, f, loss_weight_table(cfg))
  answer = np.zeros(batch["tokens"].shape, bool)
  for i, row in enumerate(rows):
    if row:
      answer[i, :sum(len(d.tokens_N) for d in row)] = np.concatenate([d.answer_N for d in row])
  batch["loss_weights"] = np.zeros_like(batch["loss_weights"])
  batch["loss_weights"][:, :-1] = answer[:, 1:]
  return batch


def train_rows(cfg: DataConfig, vocab: Vocab, seed: int, batch: int, rows: range) -> list[list]:
  """The documents of global rows `rows` of training batch `batch`."""
  p = phase_at(cfg, batch)
  length, facts, questions = (cfg.needle_lengths[p], per_phase(cfg.needle_facts, p),
                              per_phase(cfg.needle_questions, p))
  docs = needle.filler_documents(cfg.heldout_fraction, heldout=False)
  out = []
  for r in rows:
    rng = np.random.default_rng([TRAIN_STREAM, seed % (1 << 63), batch, r])
    out.append([needle.make_document(rng, vocab, docs, num_facts=facts,
                                     num_questions=questions, doc_len=length)
                for _ in range(cfg.seq_len // length)])
  return out


class NeedleBatches(grain.IterDataset):
  """Endless training batches of this host's rows (module docstring)."""

  def __init__(self, cfg: DataConfig, *, batch_size: int, seed: int, process_index: int,
               process_count: int):
    super().__init__()
    check(cfg)
    self.cfg, self.seed, self.vocab = cfg, seed, Vocab.from_config(cfg)
    per_host = batch_size // process_count
    self.rows = range(process_index * per_host, (process_index + 1) * per_host)

  def batch(self, b: int) -> dict:
    return pack_documents(train_rows(self.cfg, self.vocab, self.seed, b, self.rows), self.cfg,
                          self.cfg.seq_len)

  def __iter__(self) -> grain.DatasetIterator:
    return _NeedleIterator(self)


class _NeedleIterator(grain.DatasetIterator):

  def __init__(self, dataset: NeedleBatches):
    super().__init__()
    self._dataset, self._next = dataset, 0

  def __next__(self) -> dict:
    batch = self._dataset.batch(self._next)
    self._next += 1
    return batch

  def get_state(self) -> dict:
    return {"next_batch": self._next}

  def set_state(self, state: dict) -> None:
    if "next_batch" not in state:
      raise ValueError(f"data iterator state {state} is not the needle task's (a checkpoint of a "
                       f"data.task=mixture run?); start a new workdir")
    self._next = int(state["next_batch"])


def train_iterator(cfg: DataConfig, *, batch_size: int, seed: int, process_index: int,
                   process_count: int) -> grain.DatasetIterator:
  dataset = NeedleBatches(cfg, batch_size=batch_size, seed=seed, process_index=process_index,
                          process_count=process_count)
  if cfg.prefetch > 0:
    dataset = grain.experimental.ThreadPrefetchIterDataset(dataset,
                                                           prefetch_buffer_size=cfg.prefetch)
  return iter(dataset)


class RetrievalSet(NamedTuple):
  """Held-out documents of one haystack length, in batches, with what each question asks."""
  length: int                 # H
  batches: list               # batch contract dicts, one document per row
  questions: list             # per batch: int32 [B, L], 1 + the question's index within the batch
                              # where the target is one of its answer tokens, else 0
  deciles: list               # per batch: int32 [questions in the batch], the asked fact's decile


def heldout_documents(cfg: DataConfig, vocab: Vocab, seed: int, H: int) -> list[needle.Document]:
  docs = needle.filler_documents(cfg.heldout_fraction, heldout=True)
  Q, out = cfg.needle_eval_questions, []
  for i in range(cfg.needle_eval_docs):
    rng = np.random.default_rng([HELDOUT_STREAM, seed % (1 << 63), H, i])
    deciles = [(i * Q + j) % needle.DECILES for j in range(Q)]
    out.append(needle.make_document(rng, vocab, docs, num_facts=cfg.needle_eval_facts,
                                    num_questions=Q, haystack_len=H, deciles=deciles))
  return out


def retrieval_sets(cfg: DataConfig, *, batch_size: int, seed: int) -> list[RetrievalSet]:
  """One RetrievalSet per data.needle_eval_lengths (module docstring); the last batch of a length
  may have fewer rows."""
  check(cfg)
  vocab, out = Vocab.from_config(cfg), []
  for H in cfg.needle_eval_lengths:
    docs = heldout_documents(cfg, vocab, seed, H)
    row_len = -(-(H + cfg.needle_eval_questions * needle.QUESTION_MAX_BYTES) // ROW_MULTIPLE) \
        * ROW_MULTIPLE
    batches, questions, deciles = [], [], []
    for start in range(0, len(docs), batch_size):
      part = docs[start:start + batch_size]
      batches.append(pack_documents([[d] for d in part], cfg, row_len))
      q_BxL = np.zeros((len(part), row_len), np.int32)
      n = 0
      for r, d in enumerate(part):
        for q in d.questions:
          n += 1
          q_BxL[r, q.answer_start - 1:q.answer_start - 1 + q.answer_len] = n
      questions.append(q_BxL)
      deciles.append(np.asarray([q.decile for d in part for q in d.questions], np.int32))
    out.append(RetrievalSet(H, batches, questions, deciles))
  return out


def loss_batches(cfg: DataConfig, *, batch_size: int, seed: int, num_batches: int) -> list[dict]:
  """Held-out training-shaped batches (the last curriculum length, held-out filler) for eval/loss:
  the loss on the answers."""
  check(cfg)
  vocab = Vocab.from_config(cfg)
  docs = needle.filler_documents(cfg.heldout_fraction, heldout=True)
  length, out = cfg.needle_lengths[-1], []
  facts, questions = cfg.needle_facts[-1], cfg.needle_questions[-1]
  for b in range(num_batches):
    rows = []
    for r in range(batch_size):
      rng = np.random.default_rng([LOSS_STREAM, seed % (1 << 63), b, r])
      rows.append([needle.make_document(rng, vocab, docs, num_facts=facts,
                                        num_questions=questions, doc_len=length)
                   for _ in range(cfg.seq_len // length)])
    out.append(pack_documents(rows, cfg, cfg.seq_len))
  return out
