"""The unified vocabulary: layout, text round trip, modality lookup in numpy and under jit."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omnimoe.data.config import DataConfig
from omnimoe.data.vocab import BOS, EOS, PAD, Vocab


@pytest.fixture
def vocab():
  return Vocab.from_config(DataConfig(image_codebook=64, audio_codebook=64))


def test_layout_and_size(vocab):
  assert (PAD, BOS, EOS) == (0, 1, 2)
  assert vocab.text_offset == 4
  assert vocab.image_offset == 4 + 256
  assert vocab.audio_offset == 4 + 256 + 64
  assert vocab.video_offset == 4 + 256 + 128
  assert vocab.used_size == 4 + 256 + 192       # image, audio and video codes: 64 each
  assert vocab.size == 512
  odd = Vocab.from_config(DataConfig(image_codebook=100, audio_codebook=29, video_codebook=3))
  assert odd.used_size == 392 and odd.size == 512
  exact = Vocab(image_codes=124, audio_codes=128)   # 4 + 256 + 252 = 512 exactly
  assert exact.size == 512


def test_text_round_trip(vocab):
  for text in ["the digit seven", "", "naïve — ünïcode ✓", "\x00\xff"]:
    ids = vocab.encode_text(text)
    assert ids.dtype == np.int32
    assert ids.min(initial=vocab.text_offset) >= vocab.text_offset
    assert ids.max(initial=vocab.text_offset) < vocab.image_offset
    assert vocab.decode_text(ids) == text.encode("utf-8")
  raw = bytes(range(256))
  assert vocab.decode_text(vocab.encode_text(raw)) == raw


def test_decode_skips_non_text(vocab):
  ids = np.concatenate([[BOS], vocab.encode_text("ab"), [vocab.image_offset + 3],
                        vocab.encode_text("c"), [vocab.audio_offset, EOS, PAD]])
  assert vocab.decode_text(ids) == b"abc"


def test_modality_of_numpy(vocab):
  ids = np.array([PAD, BOS, EOS, 3, vocab.text_offset, vocab.image_offset - 1, vocab.image_offset,
                  vocab.audio_offset - 1, vocab.audio_offset, vocab.video_offset - 1,
                  vocab.video_offset, vocab.used_size - 1])
  expected = np.array([0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4], np.int8)
  out = vocab.modality_of(ids)
  assert out.dtype == np.int8
  np.testing.assert_array_equal(out, expected)
  with_specials = vocab.modality_of(ids, specials_as_text=True)
  np.testing.assert_array_equal(with_specials, [0, 1, 1, 1, 1, 1, 2, 2, 3, 3, 4, 4])
  np.testing.assert_array_equal(vocab.is_text(ids), expected == 1)


def test_modality_of_under_jit(vocab):
  ids = np.arange(vocab.size, dtype=np.int32).reshape(4, -1)
  out = jax.jit(lambda x: vocab.modality_of(x, xp=jnp))(ids)
  assert out.dtype == jnp.int8
  np.testing.assert_array_equal(np.asarray(out), vocab.modality_of(ids))
  text = jax.jit(lambda x: vocab.is_text(x, xp=jnp))(ids)
  np.testing.assert_array_equal(np.asarray(text), vocab.is_text(ids))
