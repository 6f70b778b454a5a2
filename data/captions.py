"""Caption templates for digit images and DTMF tones.

"the digit {word}" is drawn for 40% of the captions of each modality; its prefix `EVAL_PROMPT` is
what the cross-modal evaluation feeds after the media, asking the model for the English word.
"""
import numpy as np

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


def table(templates) -> tuple[np.ndarray, list[list[str]]]:
  """(cumulative probabilities [T], captions[template][digit]) for drawing with one uniform."""
  probs = np.asarray([p for _, p in templates], np.float64)
  assert abs(probs.sum() - 1.0) < 1e-9, probs
  captions = [[render(t, d) for d in range(10)] for t, _ in templates]
  return np.cumsum(probs), captions
