"""Text -> image and text -> audio accuracy, for runs that learn to draw and sound
(`data.caption_first` > 0 with the default dataset; docs/generation.md).

For every caption template of a modality (data/builtin/captions.py) and digit, the prompt
`[BOS] caption` (e.g. "the digit seven") is continued greedily with exactly one whole image or tone
(constrained decoding, train/media_spans.py, on the KV cache). The codes are turned back into media
(train/media_out.py) and scored by train/media_scores.py: `eval/text_to_image_accuracy` is the share
of images the fitted digit classifier recognises as the digit asked for, `eval/text_to_audio_accuracy`
the share of tones (Griffin-Lim waveforms) in which the DTMF detector hears it. Prompts of different
lengths are left-padded (segment 0, invisible) to one length: positions start at 0 at each BOS.
"""
import jax
import numpy as np

from omnimoe.data.builtin.captions import AUDIO_TEMPLATES, IMAGE_TEMPLATES, WORDS, render
from omnimoe.data.examples import make_sequence
from omnimoe.data.pipeline import sources as sources_lib
from omnimoe.train import media_out, media_scores, media_spans
from omnimoe.train.generate import feature_table, make_generate

KEYS = {"image": "eval/text_to_image_accuracy", "audio": "eval/text_to_audio_accuracy"}
TEMPLATES = {"image": IMAGE_TEMPLATES, "audio": AUDIO_TEMPLATES}


def left_padded(examples, feature_dim: int) -> tuple[dict, np.ndarray]:
  """Examples (no EOS) as one prompt batch that ends every row at the same column, and each row's
  next running index."""
  P = max(len(e.tokens_N) for e in examples)
  B = len(examples)
  batch = {"tokens": np.zeros((B, P), np.int32), "features": np.zeros((B, P, feature_dim), np.float32),
           "modality": np.zeros((B, P), np.int8), "segment_ids": np.zeros((B, P), np.int32),
           "positions": np.zeros((B, P, 3), np.int32)}
  for b, e in enumerate(examples):
    n = len(e.tokens_N)
    batch["tokens"][b, P - n:] = e.tokens_N
    batch["features"][b, P - n:] = e.features_NxF
    batch["modality"][b, P - n:] = e.modality_N
    batch["segment_ids"][b, P - n:] = 1
    batch["positions"][b, P - n:] = e.positions_Nx3
  return batch, np.asarray([e.positions_Nx3[-1, 0] + 1 for e in examples], np.int32)


class MediaEvals:
  """`__call__(params, router=None)` -> {eval/text_to_image_accuracy, eval/text_to_audio_accuracy}."""

  def __init__(self, cfg, setup):
    self.cfg = cfg
    mix = sources_lib.resolve(cfg.data)
    self.mix, self.spans = mix, media_spans.spans_for(mix.vocab, cfg.data)
    self.table = feature_table(self.spans, mix.codebooks, mix.feature_dim)
    self.classifier = media_scores.DigitClassifier(cfg.data)
    self.sets = {}
    for name in ("image", "audio"):
      asked = [(render(t, d), d) for t, _ in TEMPLATES[name] for d in range(len(WORDS))]
      examples = [make_sequence([mix.vocab.encode_text(text)], mix.feature_dim, eos=False,
                                specials=mix.vocab)
                  for text, _ in asked]
      prompt, next_position = left_padded(examples, mix.feature_dim)
      k = self.spans.index(name)
      run = make_generate(setup, self.spans, prompt_len=prompt["tokens"].shape[1],
                          max_new_tokens=int(self.spans.length[k - 1]),
                          out_shardings=setup.shardings["step"])
      self.sets[name] = (run, prompt, next_position, np.full(len(asked), k, np.int32),
                         np.asarray([d for _, d in asked]))

  def heard_or_seen(self, name: str, codes_NxC: np.ndarray) -> np.ndarray:
    """The digit the scorer finds in each generated item."""
    book, data_cfg = self.mix.codebooks[name], self.cfg.data
    if name == "image":
      return self.classifier.predict(np.stack([media_out.image_pixels(c, book, data_cfg)
                                               for c in codes_NxC]))
    return np.asarray([media_scores.dtmf_digit(media_out.audio_waveform(c, book, data_cfg), data_cfg)
                       for c in codes_NxC])

  def generate(self, name: str, params, router=None) -> tuple[np.ndarray, np.ndarray]:
    """(codes [N, item length], the digit each row asked for), rows by template then digit."""
    run, prompt, next_position, force, digits = self.sets[name]
    out = run(params, prompt, next_position, jax.random.PRNGKey(0), router, force, self.table)
    return np.asarray(jax.device_get(out.tokens)) - self.spans.lo[self.spans.index(name) - 1], digits

  def __call__(self, params, router=None) -> dict:
    metrics = {}
    for name in self.sets:
      codes, digits = self.generate(name, params, router)
      metrics[KEYS[name]] = float(np.mean(self.heard_or_seen(name, codes) == digits))
    return metrics
