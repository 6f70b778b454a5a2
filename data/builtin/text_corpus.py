"""The text-only stream: paragraphs about an imaginary country, written by this project's own grammar.

Pinned by construction: the words and templates are in data/builtin/text_grammar.py and the draws
come from a splitmix64 generator written here in plain integer arithmetic, so the documents depend on
no library version (neither numpy's nor Python's `random` promise a stable stream). `documents()`
checks the result against CORPUS_SHA256 and refuses to go on if it ever differs.
"""
import functools
import hashlib
import re

from omnimoe.data.builtin import text_grammar as grammar

NUM_DOCUMENTS = 320
BODY_SENTENCES = (2, 6)     # a paragraph: its opening, then this many of its topic's other sentences
CORPUS_SEED = 20261201
MIN_DOCUMENT_BYTES = 16     # every document is longer; kept for callers that filter
SPLIT_SEED = 1729           # fixed: held-out documents are the same for every run seed
# sha256 of b"\0".join(documents()); update only when the corpus is meant to change (it changes the
# default run's and the needle run's measured figures, which must then be re-measured).
CORPUS_SHA256 = "ad714248ab93a604664f9aaf32f9a7045547648bae18924ba7b7d8dcddab434e"
_MASK = (1 << 64) - 1
_SLOT = re.compile(r"\{(\w+)\}")
_A_BEFORE_VOWEL = re.compile(r"\b([Aa])(?= [aeiou])")


class SplitMix64:
  """A 64-bit generator (Steele, Lea and Flood's splitmix64); the same stream everywhere."""

  def __init__(self, seed: int):
    self.state = seed & _MASK

  def next(self) -> int:
    self.state = (self.state + 0x9E3779B97F4A7C15) & _MASK
    z = self.state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)

  def below(self, n: int) -> int:
    return self.next() % n

  def pick(self, options):
    return options[self.below(len(options))]


def _name(rng: SplitMix64, syllables: int, endings=("",)) -> str:
  return ("".join(rng.pick(grammar.SYLLABLES) for _ in range(syllables))
          + rng.pick(endings)).capitalize()


def _slots(rng: SplitMix64) -> dict:
  """One paragraph's slot values (each drawn once, so the paragraph stays on its subject)."""
  values = {key: rng.pick(options) for key, options in grammar.WORDS.items()}
  values["animals"] = grammar.PLURAL[values["animal"]]
  for key, (low, high, step) in grammar.NUMBERS.items():
    values[key] = str(low + step * rng.below((high - low) // step + 1))
  values["pronoun"], _ = rng.pick(grammar.PRONOUNS)
  values["Town"] = _name(rng, 2, grammar.TOWN_ENDINGS)
  values["River"] = f"{_name(rng, 2)} {rng.pick(grammar.RIVER_WORDS)}"
  values["Hills"] = f"{_name(rng, 2)} {rng.pick(grammar.HILL_WORDS)}"
  values["Person"] = f"{_name(rng, 2)} {_name(rng, 2, grammar.TOWN_ENDINGS)}"
  values["Friend"] = _name(rng, 2)
  return values


def _fill(template: str, values: dict) -> str:
  def one(match):
    key = match.group(1)
    if key in values:
      return values[key]
    return values[key[0].lower() + key[1:]].capitalize()   # {Pronoun}: the capitalised {pronoun}
  return _SLOT.sub(one, template)


def _shuffled(n: int, rng: SplitMix64) -> list[int]:
  """0..n-1 in a random order (Fisher-Yates with our own draws)."""
  order = list(range(n))
  for i in range(n - 1, 0, -1):
    j = rng.below(i + 1)
    order[i], order[j] = order[j], order[i]
  return order


def paragraph(index: int) -> str:
  """Document `index`: a topic, its opening, then 2..6 of its body sentences."""
  rng = SplitMix64(CORPUS_SEED * 1_000_003 + index)
  topic = rng.pick(sorted(grammar.TOPICS))
  openings, body, ordered = grammar.TOPICS[topic]
  values = _slots(rng)
  chosen = _shuffled(len(body), rng)
  low, high = BODY_SENTENCES
  chosen = chosen[:min(len(body), low + rng.below(high - low + 1))]
  if ordered:
    chosen.sort()
  sentences = [rng.pick(openings)] + [body[i] for i in chosen]
  return _A_BEFORE_VOWEL.sub(r"\1n", " ".join(_fill(s, values) for s in sentences))


def sha256(docs: list[bytes]) -> str:
  return hashlib.sha256(b"\0".join(docs)).hexdigest()


@functools.lru_cache(maxsize=1)
def _documents() -> tuple[bytes, ...]:
  docs = tuple(paragraph(i).encode("utf-8") for i in range(NUM_DOCUMENTS))
  digest = sha256(list(docs))
  if digest != CORPUS_SHA256:
    raise RuntimeError(f"the built-in text corpus hashes to {digest}, not the pinned "
                       f"{CORPUS_SHA256} (data/builtin/text_corpus.py): it must not change silently")
  return docs


def documents() -> list[bytes]:
  """Every document, UTF-8, in a fixed order (checked against CORPUS_SHA256)."""
  return list(_documents())


def split_documents(docs: list[bytes], heldout_fraction: float) -> tuple[list[int], list[int]]:
  """(train, heldout) document indices; disjoint, sorted, fixed by SPLIT_SEED."""
  order = _shuffled(len(docs), SplitMix64(SPLIT_SEED))
  num_heldout = max(1, int(round(heldout_fraction * len(docs))))
  return sorted(order[num_heldout:]), sorted(order[:num_heldout])
