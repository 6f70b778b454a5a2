"""`data.sources`: which sources a run mixes, and the one vocabulary and codebooks they share.

`data.sources` is a list of `{path, weight}`: a folder written by `omnimoe prepare` (a relative
path is read from the current directory, whether it came from a YAML file or the command line), or
the word `default` for the embedded dataset; `[]` means `[{path: default, weight: 1}]`. Sources
with weight 0 are left out. Every run reads its sources through one pipeline (data/mixture.py).

The default dataset trains from prepared folders like any other source: its files go through
`omnimoe prepare` once per data config (data/default_prepared.py, cached), and its weight is split
over its images, tones and text folders by data.weight_image/audio/text (`Mixture.train_sources`).
Its held-out side stays the embedded one (`Mixture.sources`, `Mixture.default`): held-out images
and text, freshly drawn tones, and the cross-modal evals.

How vocabularies and codebooks combine (one rule, enforced here):
- The unified vocabulary depends only on the config (`data.image_codebook`, `data.audio_codebook`):
  every source shares it.
- Every folder must have been prepared with the run's feature layout and codebook sizes
  (`prepare.PREPARED_KEYS`: image_patch, image_side, image_channels, sample_rate, n_mels,
  frame_len, frame_hop, image_codebook, audio_codebook); a mismatch is an error naming the key.
- The run codes every image patch with ONE image codebook and every audio frame with ONE audio
  codebook: for each modality, the codebook of the first source in `data.sources` that has that
  modality (the default dataset has both). Prepared records store vectors, not codes, so their
  codes are assigned when batches are built; the default dataset's examples are re-coded when the
  run's codebooks are not its own. So a code id means one thing in a run, whatever the source.
- The default dataset only exists in grayscale: mixing it needs `data.image_channels=1`.
"""
import dataclasses
import functools
import pathlib

import numpy as np

from omnimoe.data.builtin import default_dataset
from omnimoe.data.builtin import cache as default_prepared
from omnimoe.data.prepare import kmeans
from omnimoe.data.prepare import folder as prepared_lib
from omnimoe.data.config import DEFAULT_SOURCE, DataConfig, Source, feature_dim
from omnimoe.data.examples import Example
from omnimoe.data.vocab import Vocab
from omnimoe.model.modality import AUDIO, IMAGE

KINDS = ("image", "audio")


def _active(cfg: DataConfig):
  return [(i, s) for i, s in enumerate(cfg.sources) if s.weight > 0]


def is_default_only(cfg: DataConfig) -> bool:
  """True when the run reads the default dataset alone (`data.sources` empty or only `default`)."""
  return all(s.path == DEFAULT_SOURCE for _, s in _active(cfg))


def has_default(cfg: DataConfig) -> bool:
  """True when the default dataset is one of the run's sources (cross-modal eval needs it)."""
  return is_default_only(cfg) or any(s.path == DEFAULT_SOURCE for _, s in _active(cfg))


def labels(cfg: DataConfig) -> list[str]:
  """Short names of the run's sources (positive weights, config order), for metric keys such as
  `eval/loss/source/<label>`: `default`, or a prepared folder's basename; a name that two sources
  share gets `_<i>` appended, i its index in `data.sources`."""
  active = _active(cfg)
  base = [DEFAULT_SOURCE if s.path == DEFAULT_SOURCE else (pathlib.Path(s.path).absolute().name or "root")
          for _, s in active]
  if not active:   # `data.sources: []`: the default dataset
    return [DEFAULT_SOURCE]
  return [b if base.count(b) == 1 else f"{b}_{i}" for b, (i, _) in zip(base, active)]


@dataclasses.dataclass(frozen=True, eq=False)
class Resolved:
  name: str                   # `data.sources[i] 'path'`, for messages
  weight: float
  folder: prepared_lib.PreparedFolder | None   # None: the default dataset
  label: str = ""             # short name for metric keys (`labels`)


@dataclasses.dataclass(frozen=True, eq=False)
class Mixture:
  cfg: DataConfig
  vocab: Vocab
  feature_dim: int
  sources: tuple[Resolved, ...]              # positive weights only, in config order
  train_sources: tuple[Resolved, ...]        # what training draws from: `sources` with the default
                                             # one replaced by its three prepared folders
  codebooks: dict                            # "image" / "audio" -> float32 [K, D] (run-wide)
  codebook_from: dict                        # "image" / "audio" -> the source's name
  default: default_dataset.DefaultDataset | None
  recode_default: bool                       # the default's own codebooks are not the run's

  def recode(self, example: Example) -> Example:
    """A default-dataset example with its media codes assigned against the run's codebooks."""
    if not self.recode_default:
      return example
    tokens = example.tokens_N.copy()
    for mod, kind, ids in ((IMAGE.code, "image", self.vocab.image_ids),
                           (AUDIO.code, "audio", self.vocab.audio_ids)):
      where = example.modality_N == mod
      if where.any():
        book = self.codebooks[kind]
        tokens[where] = ids(kmeans.assign(example.features_NxF[where][:, :book.shape[1]], book))
    return example._replace(tokens_N=tokens)


def resolve(cfg: DataConfig) -> Mixture:
  """Opens and checks every source; raises ValueError naming the source and the key.

  Cached per config and per version of each prepared folder (a folder prepared again in the same
  process, e.g. a notebook, is read again)."""
  versions = []
  for _, s in _active(cfg):
    folder = pathlib.Path(s.path).absolute()   # a relative path is read from the current directory
    card = folder / "card.json"
    stat = card.stat() if s.path != DEFAULT_SOURCE and card.is_file() else None
    versions.append(None if stat is None else (str(folder), stat.st_ino, stat.st_mtime_ns))
  return _resolve(cfg, tuple(versions))


@functools.lru_cache(maxsize=8)
def _resolve(cfg: DataConfig, versions: tuple) -> Mixture:
  del versions   # cache key only
  active = _active(cfg) or [(None, Source(DEFAULT_SOURCE, 1.0))]
  sources, train_sources, default = [], [], None
  for (i, s), label in zip(active, labels(cfg)):
    name = "the default dataset" if i is None else f"data.sources[{i}] '{s.path}'"
    if s.path == DEFAULT_SOURCE:
      if cfg.image_channels != 1:
        raise ValueError(f"{name}: the default dataset is grayscale; mixing it needs "
                         f"data.image_channels=1, got {cfg.image_channels}")
      default = default_dataset.build(cfg)
      sources.append(Resolved(name, s.weight, None, label))
      folders = default_prepared.ensure(cfg)
      total = sum(w for _, w in folders)
      for path, w in folders:
        if w > 0:
          folder = prepared_lib.open_folder(path)
          prepared_lib.check_matches(folder, cfg, name)
          train_sources.append(Resolved(f"{name} ({path.name})", s.weight * w / total, folder,
                                        label))
    else:
      try:
        folder = prepared_lib.open_folder(s.path)
      except ValueError as e:
        raise ValueError(f"data.sources[{i}]: {e}") from None
      prepared_lib.check_matches(folder, cfg, name)
      sources.append(Resolved(name, s.weight, folder, label))
      train_sources.append(sources[-1])

  codebooks, codebook_from = {}, {}
  for source in sources:
    own = ({"image": default.image_codebook_KxD, "audio": default.audio_codebook_KxD}
           if source.folder is None else source.folder.codebooks)
    for kind in KINDS:
      if kind not in codebooks and kind in own:
        codebooks[kind], codebook_from[kind] = own[kind], source.name
  recode = default is not None and any(
      codebooks[k] is not own_k for k, own_k in (("image", default.image_codebook_KxD),
                                                ("audio", default.audio_codebook_KxD)))
  return Mixture(cfg, Vocab.from_config(cfg), feature_dim(cfg), tuple(sources),
                 tuple(train_sources), codebooks, codebook_from, default, recode)


def seed_for(seed: int, source_index: int) -> int:
  """A 32-bit shuffle seed per (run seed, source) for grain's shuffle."""
  return int(np.random.SeedSequence([seed % (1 << 63), source_index]).generate_state(1)[0])
