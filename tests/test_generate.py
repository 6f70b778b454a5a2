"""Generation (train/generate.py, train/media_spans.py): the tokens' positions follow the data's
layout of real media (data/examples.py, the oracle), the logits every token was chosen from equal
one forward pass over the finished sequence (to 1e-5), and constrained decoding keeps every media
span whole with an untrained model whose free choices would break it."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from omnimoe.data.config import DataConfig
from omnimoe.data.examples import audio_media, image_media, make_sequence
from omnimoe.data.vocab import EOS, PAD, Vocab
from omnimoe.model.config import ModelConfig, MoEConfig
from omnimoe.model.decoder import Decoder
from omnimoe.train import media_spans
from omnimoe.train.generate import feature_table, make_generate
from omnimoe.train.sampling import Sampler
from omnimoe.train.state import Setup

DATA = DataConfig()
VOCAB = Vocab.from_config(DATA)
SPANS = media_spans.spans_for(VOCAB, DATA)
F = 24
CFG = ModelConfig(num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8,
                  rope_sections=(2, 1, 1), attention_block=8,
                  moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=32, block_rows=8))
R = np.random.default_rng(0)
CODEBOOKS = {"image": R.normal(size=(64, 16)).astype(np.float32),
             "audio": R.normal(size=(64, 24)).astype(np.float32)}
IMAGE, AUDIO = SPANS.index("image"), SPANS.index("audio")


def _model():
  graphdef, state = nnx.split(Decoder(CFG, vocab_size=VOCAB.size, feature_dim=F, rngs=nnx.Rngs(0)))
  return Setup(graphdef, None, {}, {}, VOCAB.size, F), graphdef, nnx.to_pure_dict(state)


def _prompt(B, text=b"draw a seven:"):
  example = make_sequence([VOCAB.encode_text(text)], F, eos=False, specials=VOCAB)
  rows = lambda a: np.repeat(a[None], B, axis=0)
  P = len(example.tokens_N)
  batch = {"tokens": rows(example.tokens_N), "features": rows(example.features_NxF),
           "modality": rows(example.modality_N), "segment_ids": np.ones((B, P), np.int32),
           "positions": rows(example.positions_Nx3)}
  return batch, np.full(B, example.positions_Nx3[-1, 0] + 1, np.int32), example


def test_positions_follow_the_layout_of_real_media():
  """A scripted row (text, an image, text, a tone, EOS) gets the positions make_sequence gives the
  same parts; the state closes each span after exactly one item."""
  image, tone = VOCAB.image_ids(np.arange(4) + 3), VOCAB.audio_ids(np.arange(11) % 5)
  text1, text2 = VOCAB.encode_text(b"a "), VOCAB.encode_text(b"b")
  tokens = np.concatenate([text1, image, text2, tone, [EOS, PAD, PAD]]).astype(np.int32)
  grid = (2, 2)
  want = make_sequence([VOCAB.encode_text(b"x"), text1, image_media(image, np.zeros((4, 1)), grid, F),
                        text2, audio_media(tone, np.zeros((11, 1)), F)], F,
                       specials=VOCAB).positions_Nx3[2:]
  state = media_spans.initial_state(np.asarray([2]))
  got, live, closed_after = [], [], []
  for t in tokens:
    assert bool(media_spans.allowed(SPANS, state, ("image", "audio"))[0, t]), t
    state, pos, lv = media_spans.advance(SPANS, state, jnp.asarray([t]))
    got.append(np.asarray(pos[0])), live.append(bool(lv[0])), closed_after.append(bool(state.closed[0]))
  np.testing.assert_array_equal(np.stack(got)[:len(want)], want)
  assert live == [True] * (len(tokens) - 2) + [False, False]
  assert [i for i, c in enumerate(closed_after) if c] == [len(text1) + 3, len(text1) + 4 + len(text2) + 10]


N, B = 40, 16
FORCE = np.asarray([IMAGE, AUDIO, 0, 0] * 4)      # rows made to start with an image or a tone


@functools.cache
def _compiled():
  """One compiled generation (temperature 1, top-p 0.9, logits kept) that every test reuses."""
  setup, _, params = _model()
  prompt, next_pos, example = _prompt(B)
  gen = make_generate(setup, SPANS, prompt_len=len(example.tokens_N), max_new_tokens=N,
                      sampler=Sampler(temperature=1.0, top_p=0.9), free=("image", "audio"),
                      keep_logits=True)
  return gen, params, prompt, next_pos, feature_table(SPANS, CODEBOOKS, F)


def _generate(seed=0):
  gen, params, prompt, next_pos, table = _compiled()
  return gen(params, prompt, next_pos, jax.random.key(seed), None, FORCE, table), prompt


def test_generated_logits_equal_a_full_forward_of_the_finished_sequence():
  """Sampled rows (some made to start with an image or a tone): the logits each token was chosen
  from equal the logits of one forward pass over prompt + generation, whose features are the
  codebook centroids of the codes (looked up here in numpy) and modality the vocabulary's."""
  out, prompt = _generate()
  tokens = np.asarray(out.tokens)
  assert VOCAB.modality_of(tokens[0, :4]).tolist() == [2] * 4        # the forced image
  assert VOCAB.modality_of(tokens[1, :11]).tolist() == [3] * 11      # the forced tone
  features = np.zeros(tokens.shape + (F,), np.float32)
  for name, book in CODEBOOKS.items():
    offset = getattr(VOCAB, f"{name}_offset")
    at = (tokens >= offset) & (tokens < offset + len(book))
    features[at, :book.shape[1]] = book[tokens[at] - offset]
  full = {"tokens": np.concatenate([prompt["tokens"], tokens], 1),
          "features": np.concatenate([prompt["features"], features], 1),
          "modality": np.concatenate([prompt["modality"],
                                      VOCAB.modality_of(tokens, specials_as_text=True)], 1),
          "segment_ids": np.concatenate([prompt["segment_ids"], np.asarray(out.live, np.int32)], 1),
          "positions": np.concatenate([prompt["positions"], np.asarray(out.positions)], 1)}
  _, graphdef, params = _model()
  logits = jax.jit(lambda p, b: nnx.merge(graphdef, p)(b)[0])(params, full)
  P = prompt["tokens"].shape[1]
  np.testing.assert_allclose(np.asarray(out.logits), np.asarray(logits)[:, P - 1:P - 1 + N],
                             rtol=1e-5, atol=1e-5)


def _runs(row):
  """[(modality, length)] of the maximal runs of media codes before EOS, and what follows EOS."""
  ends = np.flatnonzero(row == EOS)
  body, tail = (row, row[:0]) if len(ends) == 0 else (row[:ends[0]], row[ends[0] + 1:])
  kinds = VOCAB.modality_of(body)
  runs, i = [], 0
  while i < len(body):
    j = i
    while j < len(body) and kinds[j] == kinds[i]:
      j += 1
    runs.append((int(kinds[i]), j - i, j == len(body) and len(ends) == 0))
    i = j
  return runs, tail


def test_constrained_decoding_keeps_every_span_whole_with_an_untrained_model():
  force = FORCE
  out, _ = _generate()
  tokens = np.asarray(out.tokens)
  length = {2: 4, 3: 11}
  spans_seen = 0
  for b, row in enumerate(tokens):
    runs, tail = _runs(row)
    assert np.all(tail == PAD)
    if force[b]:
      assert runs and runs[0][0] == {IMAGE: 2, AUDIO: 3}[int(force[b])]
    for kind, n, cut_by_the_end in runs:
      assert kind != 0, f"row {b}: a special or unused id was written: {row}"
      if kind in length:
        assert n == length[kind] or (cut_by_the_end and n < length[kind]), (b, row)
        spans_seen += 1
  assert spans_seen >= B // 2
  # The free choices of this model would break spans: inside a span most of the probability
  # lies on other ids.
  logits = np.asarray(out.logits)[:, 1:4]             # steps 2-4 of the rows forced into an image
  p = jax.nn.softmax(logits[force == IMAGE], axis=-1)
  in_image = (np.arange(VOCAB.size) >= VOCAB.image_offset) & (np.arange(VOCAB.size) < VOCAB.audio_offset)
  assert float(np.asarray(p)[..., ~in_image].sum(-1).min()) > 0.5


def test_seeded_sampling_is_reproducible():
  """Temperature 1, top-p 0.9: the same seed gives the same tokens bit for bit, another seed not."""
  a, _ = _generate(seed=7)
  b, _ = _generate(seed=7)
  c, _ = _generate(seed=8)
  np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
  np.testing.assert_array_equal(np.asarray(a.log_probs), np.asarray(b.log_probs))
  assert not np.array_equal(np.asarray(a.tokens), np.asarray(c.tokens))
