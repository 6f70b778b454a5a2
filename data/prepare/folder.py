"""Reading a prepared folder (written by data/prepare/write.py): card, index, codebooks and records.

Records are read through grain (`grain.sources.ArrayRecordDataSource`, random access by index).
A record becomes an example (`to_example`) with codes assigned against the run's codebooks.
"""
import dataclasses
import functools
import json
import pathlib

import grain
import numpy as np

from omnimoe.data import records
from omnimoe.data.prepare import kmeans
from omnimoe.data import tokenizer as tokenizer_lib
from omnimoe.data.config import DataConfig
from omnimoe.data.examples import Example, Media, audio_media, image_media, make_sequence
from omnimoe.data.prepare.write import FORMAT, PREPARED_KEYS, VIDEO_KEYS
from omnimoe.data.video_layout import Clock, clip_media
from omnimoe.data.vocab import Vocab


@dataclasses.dataclass(frozen=True, eq=False)
class PreparedFolder:
  path: pathlib.Path
  card: dict
  lengths_N: np.ndarray       # int32 [N] tokens of each record's example
  train_ids: np.ndarray       # int64 record indices of the training share, in file order
  heldout_ids: np.ndarray     # int64 record indices of the held-out share, in file order
  codebooks: dict             # "image" / "audio" / "video" -> float32 [K, D], for those it holds

  @functools.cached_property
  def source(self) -> grain.sources.ArrayRecordDataSource:
    return grain.sources.ArrayRecordDataSource([str(self.path / s) for s in self.card["shards"]])

  def record(self, index: int) -> records.Record:
    return records.decode(self.source[index])


def open_folder(path: str | pathlib.Path) -> PreparedFolder:
  """The prepared folder at `path`; raises ValueError when it is not one. Cached per version."""
  given = pathlib.Path(path)
  path = given.absolute()
  card = path / "card.json"
  if not card.is_file():
    if not path.exists():
      why = "it does not exist" + ("" if given.is_absolute() else
                                   f"; the relative path '{given}' is read from the current "
                                   f"directory")
    else:
      why = "no card.json"
    raise ValueError(f"'{path}' is not a prepared folder ({why}); write one with "
                     f"`omnimoe prepare MANIFEST.jsonl --out {path}`")
  stat = card.stat()
  return _open(path, stat.st_ino, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _open(path: pathlib.Path, inode: int, mtime_ns: int) -> PreparedFolder:
  del inode, mtime_ns   # cache keys: a folder prepared again is read again
  card = json.loads((path / "card.json").read_text())
  if card.get("format") != FORMAT:
    raise ValueError(f"'{path}' has format {card.get('format')!r}; this omnimoe reads {FORMAT!r} "
                     f"(prepare it again)")
  index = np.load(path / "index.npz")
  with np.load(path / "codebooks.npz") as books:
    codebooks = {k: books[k] for k in books.files}
  heldout = index["heldout"]
  return PreparedFolder(path, card, index["lengths"], np.flatnonzero(~heldout),
                        np.flatnonzero(heldout), codebooks)


def check_matches(folder: PreparedFolder, cfg: DataConfig, where: str) -> None:
  """Raises ValueError naming the key when the run's data config cannot read `folder`."""
  prepared = folder.card["prepared_with"]
  for key in PREPARED_KEYS + (VIDEO_KEYS if "video" in folder.codebooks else ()):
    if prepared[key] != getattr(cfg, key):
      raise ValueError(f"{where} was prepared with data.{key}={prepared[key]}; this run has "
                       f"data.{key}={getattr(cfg, key)} (set it, or prepare the folder again)")
  # Lengths and cuts count tokens: the run must tokenize text as the folder was prepared.
  theirs = prepared.get("tokenizer", tokenizer_lib.BYTES)   # folders from before tokenizers: bytes
  ours = tokenizer_lib.load(cfg.tokenizer)
  if theirs != ours.fingerprint:
    raise ValueError(f"{where} was prepared with "
                     f"{tokenizer_lib.describe(theirs, prepared.get('tokenizer_path', ''))}; this "
                     f"run has {tokenizer_lib.describe(ours.fingerprint, ours.path)} (set "
                     f"data.tokenizer to match, or prepare the folder again)")
  longest = folder.card["longest_record_tokens"]
  if longest > cfg.seq_len:
    raise ValueError(f"{where} holds examples of up to {longest} tokens; data.seq_len="
                     f"{cfg.seq_len} is shorter (raise it, or prepare with this data.seq_len)")
  if not len(folder.train_ids):
    raise ValueError(f"{where} has no training records (all {len(folder.heldout_ids)} are held out)")


def media_of(part: records.ImagePart | records.AudioPart | records.VideoPart, vocab: Vocab,
             codebooks: dict, feature_dim: int, clock: Clock | None = None) -> Media:
  """An image, audio or video part as media, its codes assigned against `codebooks`; a video is
  laid out on `clock` with its sound (data/video_layout.py)."""
  if isinstance(part, records.VideoPart):
    if clock is None:
      raise ValueError("a video part needs the run's clock (data/video_layout.py Clock)")
    U, M, D = part.tokens_UxMxD.shape
    video = (vocab.video_ids(kmeans.assign(part.tokens_UxMxD.reshape(U * M, D),
                                           codebooks["video"])).reshape(U, M)
             if U else np.zeros((0, M), np.int32))
    sound = (vocab.audio_ids(kmeans.assign(part.sound_AxD, codebooks["audio"]))
             if len(part.sound_AxD) else np.zeros(0, np.int32))
    return clip_media(video, part.tokens_UxMxD, part.grid, sound, part.sound_AxD, clock,
                      feature_dim)
  if isinstance(part, records.ImagePart):
    codes = kmeans.assign(part.patches_MxD, codebooks["image"])
    return image_media(vocab.image_ids(codes), part.patches_MxD, part.grid, feature_dim)
  codes = kmeans.assign(part.frames_MxD, codebooks["audio"])
  return audio_media(vocab.audio_ids(codes), part.frames_MxD, feature_dim)


def to_example(record: records.Record, vocab: Vocab, codebooks: dict,
               feature_dim: int, clock: Clock | None = None) -> Example:
  """A record as an example; image patches, audio frames and video tokens get the codes of
  `codebooks`; a video is laid out on `clock`."""
  parts = [vocab.encode_text(part) if isinstance(part, bytes)
           else media_of(part, vocab, codebooks, feature_dim, clock) for part in record.parts]
  return make_sequence(parts, feature_dim, eos=record.eos, specials=vocab)
