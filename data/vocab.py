"""The unified vocabulary: `[specials | text tokens | image codes | audio codes | video codes]`.

One output head predicts every modality, so every id lives in one range:

  0 PAD, 1 BOS, 2 EOS, 3 reserved | 4..259 the 256 byte values | image codes | audio codes |
  video codes

That is byte-level text, the default. With `data.tokenizer` naming a sentencepiece model, the text
range holds the model's pieces instead (4..4+pieces-1) and the codes move up accordingly; the
trainer reads the size from the dataset (data.dataset_info), so the model adapts.

A Hugging Face `tokenizer.json` keeps its ids as they are, so that a model imported from (and
exported to) Hugging Face needs no remapping:

  0..V-1 the Hugging Face ids | the specials it lacks (PAD, then BOS) | image codes | ...

EOS is the model's own end-of-text token, BOS its begin token when that differs from EOS, PAD its
padding token when that differs from both (`config.json` beside the file, else
`tokenizer_config.json`: data/hf_tokenizer.py); a special it lacks gets a new id after the text.
The ids of the specials are fields of `Vocab` (`pad`, `bos`, `eos`); code never assumes 0, 1, 2.

`size` is rounded up to a multiple of 128 so the embedding and the output head shard evenly;
ids between the last video code and `size` never appear.
"""
import dataclasses

import numpy as np

from omnimoe.data import tokenizer as tokenizer_lib
from omnimoe.model.modality import AUDIO, IMAGE, PAD as NO_MODALITY, TEXT, VIDEO
from omnimoe.data.config import DataConfig

PAD, BOS, EOS = 0, 1, 2
NUM_SPECIALS = 4            # PAD, BOS, EOS and one reserved id
NUM_BYTES = 256
SIZE_MULTIPLE = 128


@dataclasses.dataclass(frozen=True)
class Vocab:
  image_codes: int            # number of image codebook entries
  audio_codes: int            # number of audio codebook entries
  video_codes: int = 0        # number of video codebook entries

  pad: int = PAD
  bos: int = BOS
  eos: int = EOS
  text_offset: int = NUM_SPECIALS
  text_tokens: int = NUM_BYTES          # text ids: the 256 bytes, or a sentencepiece model's pieces
  appended: int = 0                     # specials placed after the text ids (Hugging Face layout)
  tokenizer: str = ""                   # "" = bytes; else the sentencepiece model file (absolute)
  tokenizer_fingerprint: str = tokenizer_lib.BYTES   # which model exactly (sha256 prefix)

  @classmethod
  def from_config(cls, cfg: DataConfig) -> "Vocab":
    """Raises tokenizer.TokenizerError (a ValueError, one line) when data.tokenizer is bad."""
    tok = tokenizer_lib.load(cfg.tokenizer)
    layout = dict(text_tokens=tok.size)
    if getattr(tok, "specials", None) is not None:      # Hugging Face: its ids as they are
      layout = hf_layout(tok.size, **tok.specials)
    return cls(image_codes=cfg.image_codebook, audio_codes=cfg.audio_codebook,
               video_codes=cfg.video_codebook, tokenizer=tok.path,
               tokenizer_fingerprint=tok.fingerprint, **layout)

  @property
  def text_tokenizer(self):
    """The tokenizer behind the text ids (data/tokenizer.py)."""
    return tokenizer_lib.get(self.tokenizer, self.tokenizer_fingerprint)

  @property
  def text_end(self) -> int:
    """One past the last text id."""
    return self.text_offset + self.text_tokens

  @property
  def image_offset(self) -> int:
    return self.text_end + self.appended

  @property
  def audio_offset(self) -> int:
    return self.image_offset + self.image_codes

  @property
  def video_offset(self) -> int:
    return self.audio_offset + self.audio_codes

  @property
  def used_size(self) -> int:
    """One past the largest id that can appear."""
    return self.video_offset + self.video_codes

  @property
  def size(self) -> int:
    """Rows of the embedding table / columns of the output head (multiple of 128)."""
    return -(-self.used_size // SIZE_MULTIPLE) * SIZE_MULTIPLE

  def encode_text(self, text: str | bytes) -> np.ndarray:
    """Text (str, or UTF-8 bytes) -> int32 ids (no BOS/EOS)."""
    return self.text_tokenizer.encode(text) + self.text_offset

  def decode_text(self, ids) -> bytes:
    """Ids -> UTF-8 bytes; every id that is not a text id (specials, codes) is skipped."""
    ids = np.asarray(ids).reshape(-1)
    return self.text_tokenizer.decode(ids[self.is_text(ids)] - self.text_offset)

  def text_pieces(self, text: bytes, max_tokens: int) -> list[tuple[bytes, np.ndarray, bool]]:
    """A long text as [(piece, its ids, is_last_piece)], each piece at most `max_tokens` ids; the
    pieces concatenate to `text` (bytes: pieces of max_tokens bytes)."""
    pieces = self.text_tokenizer.cut(text, max_tokens)
    return [(p, self.encode_text(p), i == len(pieces) - 1) for i, p in enumerate(pieces)]

  def is_special(self, ids, xp=np):
    """True where an id is PAD, BOS, EOS or another special (reserved or appended) id."""
    ids = xp.asarray(ids)
    return ((ids < self.text_offset) | ((ids >= self.text_end) & (ids < self.image_offset))
            | (ids == self.pad) | (ids == self.bos) | (ids == self.eos))

  def is_text(self, ids, xp=np):
    """True where an id is a text token (not a special)."""
    ids = xp.asarray(ids)
    return (ids >= self.text_offset) & (ids < self.text_end) & ~self.is_special(ids, xp)

  def modality_of(self, ids, xp=np, specials_as_text: bool = False):
    """int8 array like `ids`: 0 pad/special, 1 text, 2 image, 3 audio, 4 video.

    `xp` is `numpy` or `jax.numpy` (works inside jit). With `specials_as_text=True`, BOS/EOS (every
    special except PAD) count as text, as in the batch's `modality` array and its loss weights.
    """
    ids = xp.asarray(ids)
    special = TEXT.code if specials_as_text else NO_MODALITY.code
    out = xp.where(ids < self.image_offset, TEXT.code, IMAGE.code)
    out = xp.where(self.is_special(ids, xp),
                   xp.where(ids == self.pad, NO_MODALITY.code, special), out)
    out = xp.where(ids >= self.audio_offset, AUDIO.code, out)
    out = xp.where(ids >= self.video_offset, VIDEO.code, out)
    return out.astype(xp.int8)

  def image_ids(self, codes: np.ndarray) -> np.ndarray:
    return np.asarray(codes, np.int32) + self.image_offset

  def audio_ids(self, codes: np.ndarray) -> np.ndarray:
    return np.asarray(codes, np.int32) + self.audio_offset

  def video_ids(self, codes: np.ndarray) -> np.ndarray:
    return np.asarray(codes, np.int32) + self.video_offset


def hf_layout(size: int, bos: int | None = None, eos: int | None = None,
              pad: int | None = None) -> dict:
  """The Vocab fields of a Hugging Face tokenizer of `size` ids whose own specials are `bos`,
  `eos`, `pad` (None: it has none): text ids 0..size-1 as they are; EOS the model's; BOS the
  model's when it differs from EOS; PAD the model's when it differs from both; each missing one
  appended after the text (PAD, BOS, EOS in that order)."""
  own = lambda i: i is not None and 0 <= int(i) < size
  eos = int(eos) if own(eos) else None
  bos = int(bos) if own(bos) and bos != eos else None
  pad = int(pad) if own(pad) and pad not in (bos, eos) else None
  ids, appended = {}, 0
  for name, given in (("pad", pad), ("bos", bos), ("eos", eos)):
    if given is None:
      given, appended = size + appended, appended + 1
    ids[name] = given
  return dict(text_offset=0, text_tokens=size, appended=appended, **ids)
