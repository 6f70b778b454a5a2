"""Caption templates for digit images and DTMF tones.

"the digit {word}" is drawn for 40% of the captions of each modality; its prefix `EVAL_PROMPT` is
what the cross-modal evaluation feeds after the media, asking the model for the English word.

The files written for `omnimoe prepare` (data/builtin/files.py) repeat each image or tone once per
template, `copies` times (2, 1, 1, 1 for images; 4, 3, 3 for tones), so drawing a folder's records
uniformly gives each template exactly its probability.
"""
import fractions
import math


WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
EVAL_TEMPLATE = "the digit {word}"
EVAL_PROMPT = "the digit "

# (template, probability); {word} is the English word, {digit} the numeral.
IMAGE_TEMPLATES = (
    (EVAL_TEMPLATE, 0.4),
    ("{word}", 0.2),
    ("a handwritten {word}", 0.2),
    ("{digit}, written by hand", 0.2),
)
AUDIO_TEMPLATES = (
    (EVAL_TEMPLATE, 0.4),
    ("the tone of {word}", 0.3),
    ("key {digit}", 0.3),
)
assert EVAL_TEMPLATE.startswith(EVAL_PROMPT)


def render(template: str, digit: int) -> str:
  return template.format(word=WORDS[digit], digit=digit)


MAX_COPIES = 100            # `copies` refuses probabilities that need more copies than this


def copies(templates) -> tuple[int, ...]:
  """The smallest whole numbers of copies per template in exact proportion to its probability:
  ((t, 0.4), (u, 0.2), (v, 0.2), (w, 0.2)) -> (2, 1, 1, 1)."""
  probs = [fractions.Fraction(p).limit_denominator(MAX_COPIES) for _, p in templates]
  denominator = math.lcm(*(p.denominator for p in probs))
  counts = [int(p * denominator) for p in probs]
  divisor = math.gcd(*counts)
  counts = tuple(c // divisor for c in counts)
  total = sum(counts)
  for (template, p), c in zip(templates, counts):
    if abs(c / total - p) > 1e-12:
      raise ValueError(f"caption template {template!r}: probability {p} is not a fraction with a "
                       f"denominator of at most {MAX_COPIES}; it cannot be repeated exactly")
  return counts
