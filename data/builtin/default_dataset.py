"""The embedded default dataset, built in-process in about a second and cached.

Digit images (train / held-out), a DTMF tone synthesizer, captions, the text stream, and two k-means
codebooks. The split and the codebooks use fixed seeds, not the run seed: the vocabulary means the
same thing in every run, so a checkpoint stays valid under any `seed` (the run seed only picks which
examples are drawn).
"""
import dataclasses
import functools

import numpy as np

from omnimoe.data.builtin import captions as captions_lib
from omnimoe.data.builtin import digits
from omnimoe.data.builtin import dtmf
from omnimoe.data.prepare import kmeans
from omnimoe.data.builtin import text_corpus
from omnimoe.data.config import DataConfig, feature_dim as feature_dim_of
from omnimoe.data.examples import Media, audio_media, image_media
from omnimoe.data.vocab import Vocab

CODEBOOK_SEED = 4242
AUDIO_POOL_PER_DIGIT = 50   # training tones per digit whose frames fit the audio codebook


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  vocab: Vocab
  feature_dim: int            # F: width of the `features` vectors


@dataclasses.dataclass(frozen=True)
class CaptionTable:
  cumulative_T: np.ndarray               # float64 [T] cumulative template probabilities
  ids: tuple[tuple[np.ndarray, ...], ...]  # ids[template][digit]: int32 text ids

  def draw(self, digit: int, rng: np.random.Generator) -> np.ndarray:
    return self.ids[int(np.searchsorted(self.cumulative_T, rng.random(), side="right"))][digit]


@dataclasses.dataclass(frozen=True)
class Split:
  """What one side (train or held-out) of the mixture draws from."""
  images: tuple[Media, ...]
  image_labels: np.ndarray               # int32 [N]
  image_indices: np.ndarray              # rows of sklearn's load_digits()
  text_pieces: tuple[tuple[np.ndarray, bool], ...]  # (text ids, ends its document)
  pixels_NxHxW: np.ndarray               # float32 [N, 8, 8] the images behind `images`
  text_piece_bytes: tuple[int, ...] = ()  # UTF-8 bytes of each text piece (bits per byte)


@dataclasses.dataclass(frozen=True, eq=False)
class DefaultDataset:
  cfg: DataConfig
  vocab: Vocab
  feature_dim: int
  image_codebook_KxD: np.ndarray
  audio_codebook_KxD: np.ndarray
  frames_per_tone: int
  patches_per_image: int
  image_grid: tuple[int, int]
  train: Split
  heldout: Split
  image_captions: CaptionTable
  audio_captions: CaptionTable

  @property
  def info(self) -> DatasetInfo:
    return DatasetInfo(self.vocab, self.feature_dim)

  def tone(self, digit: int, rng: np.random.Generator) -> Media:
    """A freshly drawn tone for `digit`, as codes + frames."""
    frames = dtmf.tone_features(digit, rng, self.cfg)
    codes = kmeans.assign(frames, self.audio_codebook_KxD)
    return audio_media(self.vocab.audio_ids(codes), frames, self.feature_dim)


def validate(cfg: DataConfig) -> None:
  weights = (cfg.weight_image, cfg.weight_audio, cfg.weight_text)
  if min(weights) < 0 or sum(weights) <= 0:
    raise ValueError(f"data.weight_image/audio/text must be >= 0 with a positive sum, "
                     f"got {weights}")
  if cfg.image_shift < 0:
    raise ValueError(f"data.image_shift must be >= 0, got {cfg.image_shift}")
  for name in ("image_codebook", "audio_codebook", "n_mels", "frame_hop", "sample_rate"):
    if getattr(cfg, name) <= 0:
      raise ValueError(f"data.{name} must be positive, got {getattr(cfg, name)}")
  dtmf.num_frames(cfg)   # raises if a tone is shorter than one frame


def _caption_table(vocab: Vocab, templates) -> CaptionTable:
  cumulative, texts = captions_lib.table(templates)
  ids = tuple(tuple(vocab.encode_text(t) for t in row) for row in texts)
  return CaptionTable(cumulative, ids)


def _text_split(cfg: DataConfig, vocab: Vocab):
  """((train pieces, their bytes), (held-out pieces, their bytes)); a piece is at most seq_len - 2
  tokens (bytes, or sentencepiece pieces) of one document."""
  docs = text_corpus.documents()
  train, heldout = text_corpus.split_documents(docs, cfg.heldout_fraction)

  def pieces(idx):
    out, nbytes = [], []
    for i in idx:
      for piece, ids, last in vocab.text_pieces(docs[i], cfg.seq_len - 2):
        out.append((ids, last))
        nbytes.append(len(piece))
    return tuple(out), tuple(nbytes)
  return pieces(train), pieces(heldout)


@functools.lru_cache(maxsize=4)
def build(cfg: DataConfig) -> DefaultDataset:
  validate(cfg)
  vocab = Vocab.from_config(cfg)
  feature_dim = feature_dim_of(cfg)
  train_images, heldout_images = digits.load_split(cfg)
  train_patches = train_images.patches_NxPxD.reshape(-1, cfg.image_patch ** 2)
  image_codebook = kmeans.fit(train_patches, cfg.image_codebook, CODEBOOK_SEED)
  pool_rng = np.random.default_rng(CODEBOOK_SEED)
  pool = [dtmf.tone_features(d, pool_rng, cfg) for d in range(10)
          for _ in range(AUDIO_POOL_PER_DIGIT)]
  audio_codebook = kmeans.fit(np.concatenate(pool), cfg.audio_codebook, CODEBOOK_SEED)

  def image_split(images: digits.DigitImages) -> tuple[Media, ...]:
    n, p, d = images.patches_NxPxD.shape
    codes = kmeans.assign(images.patches_NxPxD.reshape(-1, d), image_codebook).reshape(n, p)
    return tuple(image_media(vocab.image_ids(c), x, images.grid, feature_dim)
                 for c, x in zip(codes, images.patches_NxPxD))

  (train_text, train_bytes), (heldout_text, heldout_bytes) = _text_split(cfg, vocab)
  ds = DefaultDataset(
      cfg=cfg, vocab=vocab, feature_dim=feature_dim,
      image_codebook_KxD=image_codebook, audio_codebook_KxD=audio_codebook,
      frames_per_tone=dtmf.num_frames(cfg),
      patches_per_image=train_images.patches_NxPxD.shape[1], image_grid=train_images.grid,
      train=Split(image_split(train_images), train_images.labels_N, train_images.indices_N,
                  train_text, train_images.pixels_NxHxW, train_bytes),
      heldout=Split(image_split(heldout_images), heldout_images.labels_N,
                    heldout_images.indices_N, heldout_text, heldout_images.pixels_NxHxW,
                    heldout_bytes),
      image_captions=_caption_table(vocab, captions_lib.IMAGE_TEMPLATES),
      audio_captions=_caption_table(vocab, captions_lib.AUDIO_TEMPLATES))
  _check_fits(ds)
  return ds


def _check_fits(ds: DefaultDataset) -> None:
  longest_caption = max(len(c) for table in (ds.image_captions, ds.audio_captions)
                        for row in table.ids for c in row)
  longest = 2 + max(ds.patches_per_image, ds.frames_per_tone) + longest_caption
  if ds.cfg.seq_len < longest:
    raise ValueError(f"data.seq_len={ds.cfg.seq_len} is shorter than the longest image/tone "
                     f"example ({longest} tokens); raise it or use a larger data.image_patch")


@functools.lru_cache(maxsize=16)
def dataset_info(cfg: DataConfig, seed: int) -> DatasetInfo:
  """Vocabulary and feature width of the default dataset (builds and caches it).

  `seed` is accepted for symmetry with the iterators; the split and codebooks do not depend on it.
  """
  del seed
  return build(cfg).info
