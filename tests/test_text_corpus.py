"""The built-in text corpus is pinned by construction: its generator against published splitmix64
values, its documents against the pinned hash in a fresh interpreter, and a change refused."""
import hashlib
import os
import re
import subprocess
import sys

import pytest

from omnimoe.data.builtin import captions, needle, text_corpus, text_grammar


def test_splitmix64_matches_the_published_sequence_for_seed_0():
  # The reference outputs of splitmix64 seeded with 0 (Vigna's splitmix64.c).
  rng = text_corpus.SplitMix64(0)
  assert [rng.next() for _ in range(3)] == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4,
                                             0x06C45D188009454F]


def test_documents_hash_to_the_pinned_value_in_a_fresh_interpreter():
  code = ("import hashlib; from omnimoe.data.builtin import text_corpus as t; "
          "print(hashlib.sha256(bytes(1).join(t.documents())).hexdigest())")
  for hash_seed in ("0", "12345"):   # nothing may depend on set or str-hash order
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": hash_seed})
    assert out.stdout.strip() == text_corpus.CORPUS_SHA256
  docs = text_corpus.documents()
  assert hashlib.sha256(b"\0".join(docs)).hexdigest() == text_corpus.CORPUS_SHA256


def test_a_changed_grammar_is_refused_in_one_line(monkeypatch):
  monkeypatch.setitem(text_grammar.WORDS, "crop", ("barley",) * 8)
  text_corpus._documents.cache_clear()
  try:
    with pytest.raises(RuntimeError, match=r"hashes to [0-9a-f]{64}, not the pinned") as e:
      text_corpus.documents()
    assert "\n" not in str(e.value)
  finally:
    monkeypatch.undo()
    text_corpus._documents.cache_clear()
  assert len(text_corpus.documents()) == text_corpus.NUM_DOCUMENTS


def test_documents_read_as_sentences_and_stay_out_of_the_other_tasks_way():
  docs = [d.decode("ascii") for d in text_corpus.documents()]
  assert len(set(docs)) == len(docs) == 320
  assert 80_000 < sum(map(len, docs)) < 120_000
  for doc in docs:
    assert "{" not in doc and "}" not in doc                  # every slot filled
    assert doc[0].isupper() and doc.endswith(".")
    assert not re.search(r"\b[Aa] [aeiou]", doc), doc         # "an oak", never "a oak"
    sentences = re.split(r"(?<=\.) (?=[A-Z])", doc)
    assert 3 <= len(sentences) <= 7, doc
    assert not re.search(r"[a-z]:\d", doc)                    # nothing that reads as a needle fact
  caption_words = {captions.render(t, d).split()[-1] for t, _ in captions.IMAGE_TEMPLATES
                   for d in range(10)}
  assert not any(f"digit {w}" in doc for doc in docs for w in caption_words)
  for topic, (_, body, _) in text_grammar.TOPICS.items():   # every topic is written about
    fixed = [re.split(r"\{", sentence)[0] for sentence in body]
    assert any(f and f in doc for f in fixed for doc in docs), topic
  assert needle.FACT.format(key="abcd", value="1234").strip() not in " ".join(docs)


def test_split_is_disjoint_covers_and_holds_out_the_fraction():
  docs = text_corpus.documents()
  train, heldout = text_corpus.split_documents(docs, 0.2)
  assert not set(train) & set(heldout)
  assert sorted(train + heldout) == list(range(len(docs)))
  assert len(heldout) == 64 and train == sorted(train)
