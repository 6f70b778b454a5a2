"""Teaching text -> media: `data.caption_first` reorders "media, text" records (the same tokens), and
the text -> media evaluation's left-padded prompts generate what the unpadded prompts generate."""
import jax
import numpy as np
from flax import nnx

from omnimoe.data import records
from omnimoe.data.examples import make_sequence
from omnimoe.data.pipeline.mixture import caption_first
from omnimoe.train.generate import make_generate
from omnimoe.train.media_evals import left_padded
from test_generate import CFG, F, SPANS, VOCAB, _model


def test_caption_first_puts_the_text_before_one_image_or_tone():
  image = records.ImagePart(np.zeros((4, 16), np.float32), (2, 2))
  tone = records.AudioPart(np.zeros((11, 24), np.float32))
  for media in (image, tone):
    r = records.Record((media, b"the digit seven"), eos=True, line=3)
    assert caption_first(r).parts == (b"the digit seven", media) and caption_first(r).eos
  for parts in [(b"text only",), (b"text", image), (image, image), (image, b"a", b"b")]:
    r = records.Record(parts, eos=True, line=0)
    assert caption_first(r) is r


def test_left_padded_prompts_generate_what_unpadded_ones_do():
  """Prompts of 3 lengths left-padded to one: the most padded row's greedy tokens and the logits
  they came from equal those of its prompt alone (no padding)."""
  texts = [b"7", b"the digit seven", b"a seven"]
  examples = [make_sequence([VOCAB.encode_text(t)], F, eos=False, specials=VOCAB) for t in texts]
  batch, next_position = left_padded(examples, F)
  P = batch["tokens"].shape[1]
  assert P == max(len(e.tokens_N) for e in examples)
  np.testing.assert_array_equal(next_position, [len(e.tokens_N) for e in examples])
  setup, _, params = _model()
  force = np.asarray([SPANS.index("image")] * 3, np.int32)
  padded = make_generate(setup, SPANS, prompt_len=P, max_new_tokens=5, keep_logits=True)(
      params, batch, next_position, jax.random.key(0), None, force)
  for b, e in enumerate(examples):
    n = len(e.tokens_N)
    np.testing.assert_array_equal(batch["segment_ids"][b], [0] * (P - n) + [1] * n)
    np.testing.assert_array_equal(batch["positions"][b, P - n:], e.positions_Nx3)
  for b in (0,):                                # "7": 14 of 16 columns are padding
    n = len(examples[b].tokens_N)
    alone = {k: v[b:b + 1, P - n:] for k, v in batch.items()}
    one = make_generate(setup, SPANS, prompt_len=n, max_new_tokens=5, keep_logits=True)(
        params, alone, next_position[b:b + 1], jax.random.key(0), None, force[:1])
    np.testing.assert_array_equal(np.asarray(one.tokens[0]), np.asarray(padded.tokens[b]))
    np.testing.assert_allclose(np.asarray(one.logits[0]), np.asarray(padded.logits[b]),
                               rtol=1e-5, atol=1e-5)
