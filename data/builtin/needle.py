"""The needle retrieval task: facts planted at random depths of a haystack of prose, questions after.

A document (one segment, never packed from short pieces) is

  [BOS] haystack of H tokens (filler prose with N facts planted in it) | Q questions with answers

- filler: the text corpus's documents (data/builtin/text_corpus.py) in a random order, from a random
  offset, joined by blank lines; training documents use its training split, held-out documents its
  held-out split (`data.heldout_fraction`, the same split as the default dataset's text);
- a fact: " <key>:<value>. " with a fresh key (4-6 random lowercase letters, the keys of a
  document distinct) and a fresh value (4-5 random digits): nothing to memorise;
- a question about one of the facts: a new line and the fact's own start, "\\n<key>:", then the
  answer "<value>."; the answers are the only tokens with loss (`answer_N`), and the questions of a
  document ask about distinct facts. Short facts and questions keep a short document dense in
  answers, which is what lets a small model learn the task in minutes (docs/needle.md).

A fact's depth is its first position divided by H (BOS is position 0), its decile
floor(10 * depth). H counts BOS, filler and facts; `haystack_len` fixes H (held-out documents) and
`doc_len` fixes the whole document instead (training rows, where H = doc_len minus the questions).
Everything is numpy and seeded: the same generator state gives the same document.
"""
import functools
from typing import NamedTuple

import numpy as np

from omnimoe.data.builtin import text_corpus

KEY_LETTERS = (4, 6)        # a key is 4..6 random lowercase letters
VALUE_DIGITS = (4, 5)       # a value is 4..5 random digits
FACT = " {key}:{value}. "
QUESTION = "\n{key}:"
ANSWER = "{value}."
FILLER_JOIN = b"\n\n"
# Bytes of the longest question + answer; a token covers at least one byte (bytes, or
# sentencepiece with byte fallback), so Q questions never take more than Q * this many tokens.
QUESTION_MAX_BYTES = len(QUESTION.format(key="k" * KEY_LETTERS[1])) + len(
    ANSWER.format(value="9" * VALUE_DIGITS[1]))
FACT_MAX_BYTES = len(FACT.format(key="k" * KEY_LETTERS[1], value="9" * VALUE_DIGITS[1]))
DECILES = 10


class Question(NamedTuple):
  key: str
  value: str
  fact_start: int             # position of the fact's first token in the document
  depth: float                # fact_start / H
  decile: int                 # floor(10 * depth), 0..9
  answer_start: int           # position of the answer's first token
  answer_len: int             # tokens of the answer (value and '.')


class Document(NamedTuple):
  tokens_N: np.ndarray        # int32 [N]: BOS, haystack, questions and answers
  answer_N: np.ndarray        # bool [N]: True on answer tokens (what the loss and the eval score)
  haystack_len: int           # H: tokens before the first question (BOS included)
  questions: tuple            # Question per question, in document order


def draw_facts(rng: np.random.Generator, n: int) -> list[tuple[str, str]]:
  """n (key, value) pairs with distinct keys, drawn fresh."""
  facts, keys = [], set()
  while len(facts) < n:
    k = int(rng.integers(KEY_LETTERS[0], KEY_LETTERS[1] + 1))
    key = "".join(chr(ord("a") + int(c)) for c in rng.integers(0, 26, k))
    if key in keys:
      continue
    keys.add(key)
    v = int(rng.integers(VALUE_DIGITS[0], VALUE_DIGITS[1] + 1))
    facts.append((key, "".join(str(int(c)) for c in rng.integers(0, 10, v))))
  return facts


@functools.lru_cache(maxsize=8)
def filler_documents(heldout_fraction: float, heldout: bool) -> tuple[bytes, ...]:
  """The corpus documents of one split (held-out: those the default dataset holds out too)."""
  docs = text_corpus.documents()
  train, held = text_corpus.split_documents(docs, heldout_fraction)
  return tuple(docs[i] for i in (held if heldout else train))


def filler(rng: np.random.Generator, docs: tuple[bytes, ...], vocab, n: int) -> np.ndarray:
  """n filler token ids: documents in a random order from a random offset, joined by blank lines."""
  i = int(rng.integers(len(docs)))
  parts, size = [docs[i][int(rng.integers(len(docs[i]))):]], 0
  size = len(parts[0])
  while size < 2 * n + 64:   # bytes >= tokens; twice as many leaves room for merged pieces
    parts.append(docs[int(rng.integers(len(docs)))])
    size += len(parts[-1]) + len(FILLER_JOIN)
  ids = vocab.encode_text(FILLER_JOIN.join(parts))
  if len(ids) < n:
    raise ValueError(f"the text corpus gave {len(ids)} filler tokens, {n} needed")
  return ids[:n]


def _starts(rng, lengths: list[int], H: int, deciles: list[int | None]) -> list[int]:
  """Non-overlapping first positions in [1, H) for facts of `lengths` tokens, each in its
  requested decile (None: anywhere)."""
  ranges = []
  for n, d in zip(lengths, deciles):
    lo, hi = 1, H - n                      # the fact must end inside the haystack
    if d is not None:
      lo, hi = max(lo, -(-d * H // DECILES)), min(hi, -(-(d + 1) * H // DECILES) - 1)
    if lo > hi:
      raise ValueError(f"a fact of {n} tokens cannot start in depth decile {d} of a haystack of "
                       f"{H} tokens (data.needle_lengths / data.needle_eval_lengths too short)")
    ranges.append((lo, hi))
  if all(d is None for d in deciles):   # filler cut at n random points: never overlaps
    free = H - 1 - sum(lengths)
    if free < 0:
      raise ValueError(f"{len(lengths)} facts do not fit a haystack of {H} tokens "
                       f"(data.needle_facts too many for the length)")
    cuts = np.sort(rng.integers(0, free + 1, len(lengths)))
    order = rng.permutation(len(lengths))
    starts, at = [0] * len(lengths), 1
    for cut, i in zip(cuts, order):
      starts[i] = at + int(cut)
      at += lengths[i]
    return starts
  for _ in range(1000):
    starts = [int(rng.integers(lo, hi + 1)) for lo, hi in ranges]
    spans = sorted(zip(starts, lengths))
    if all(a + n <= b for (a, n), (b, _) in zip(spans, spans[1:])):
      return starts
  raise ValueError(f"{len(lengths)} facts do not fit a haystack of {H} tokens "
                   f"(data.needle_facts too many for the length)")


def make_document(rng: np.random.Generator, vocab, docs: tuple[bytes, ...], *, num_facts: int,
                  num_questions: int, haystack_len: int | None = None, doc_len: int | None = None,
                  deciles: list[int] | None = None) -> Document:
  """One document (module docstring). Give exactly one of `haystack_len` (H) and `doc_len` (the
  whole document). `deciles`: the depth decile of each asked fact (len num_questions); default
  anywhere. Raises ValueError when the facts or questions cannot fit."""
  if (haystack_len is None) == (doc_len is None):
    raise ValueError("give exactly one of haystack_len and doc_len")
  if not 1 <= num_questions <= num_facts:
    raise ValueError(f"data.needle_questions must lie in 1..data.needle_facts={num_facts}, "
                     f"got {num_questions}")
  facts = draw_facts(rng, num_facts)
  asked = [int(i) for i in rng.permutation(num_facts)[:num_questions]]
  q_ids = [(vocab.encode_text(QUESTION.format(key=facts[i][0])),
            vocab.encode_text(ANSWER.format(value=facts[i][1]))) for i in asked]
  H = haystack_len if doc_len is None else doc_len - sum(len(q) + len(a) for q, a in q_ids)
  fact_ids = [vocab.encode_text(FACT.format(key=k, value=v)) for k, v in facts]
  wanted: list[int | None] = [None] * num_facts
  for i, d in zip(asked, deciles or [None] * num_questions, strict=True):
    wanted[i] = d
  starts = _starts(rng, [len(f) for f in fact_ids], H, wanted)
  text = filler(rng, docs, vocab, H - 1 - sum(len(f) for f in fact_ids))
  pieces, at, used = [np.asarray([vocab.bos], np.int32)], 1, 0
  for start, i in sorted((s, i) for i, s in enumerate(starts)):
    gap = start - at
    pieces += [text[used:used + gap], fact_ids[i]]
    used, at = used + gap, start + len(fact_ids[i])
  pieces.append(text[used:])
  answer = [np.zeros(H, bool)]
  questions, at = [], H
  for i, (q, a) in zip(asked, q_ids):
    pieces += [q, a]
    answer += [np.zeros(len(q), bool), np.ones(len(a), bool)]
    questions.append(Question(facts[i][0], facts[i][1], starts[i], starts[i] / H,
                              int(DECILES * starts[i] // H), at + len(q), len(a)))
    at += len(q) + len(a)
  tokens = np.concatenate(pieces).astype(np.int32)
  assert len(tokens) == at and tokens.shape == (H + sum(len(q) + len(a) for q, a in q_ids),)
  return Document(tokens, np.concatenate(answer), H, tuple(questions))
