"""`data.sources`: which prepared folders a run mixes, and the one vocabulary and codebooks they share.

`data.sources` is a list of `{path, weight}`: a folder written by `omnimoe prepare` (a relative path
is read from the current directory, whether it came from a YAML file or the command line), or the
word `default` for the built-in dataset; `[]` means `[{path: default, weight: 1}]`. Sources with
weight 0 are left out.

The built-in dataset is three prepared folders like any other (data/builtin/cache.py builds them
once per data config): its images, tones and text, which share its weight in the proportions
data.weight_image/audio/text and its label `default`. Its training and held-out examples both come
from those folders; nothing of it is drawn in memory.

How vocabularies and codebooks combine (one rule, enforced here):
- The unified vocabulary depends only on the config (`data.image_codebook`, `data.audio_codebook`,
  `data.tokenizer`): every source shares it.
- Every folder must have been prepared with the run's feature layout and codebook sizes
  (`write.PREPARED_KEYS`); a mismatch is an error naming the key.
- The run codes every image patch with ONE image codebook and every audio frame with ONE audio
  codebook: for each modality, the codebook of the first folder (in `data.sources` order, the
  built-in dataset's images before its tones) that has that modality. Records store vectors, not
  codes, so codes are assigned when batches are built: a code id means one thing in a run.
- The built-in dataset only exists in grayscale: mixing it needs `data.image_channels=1`.
"""
import dataclasses
import functools
import pathlib

import numpy as np

from omnimoe.data.builtin import cache
from omnimoe.data.config import DEFAULT_SOURCE, DataConfig, Source, feature_dim
from omnimoe.data.prepare import folder as folder_lib
from omnimoe.data.vocab import Vocab

KINDS = ("image", "audio", "video")


def _active(cfg: DataConfig) -> list[tuple[int | None, Source]]:
  """(index in data.sources, source) of every source with a positive weight; `[]` is the default."""
  active = [(i, s) for i, s in enumerate(cfg.sources) if s.weight > 0]
  return active or [(None, Source(DEFAULT_SOURCE, 1.0))]


def has_default(cfg: DataConfig) -> bool:
  """True when the built-in dataset is one of the run's sources (the cross-modal evals need it);
  never for `data.task=needle`, which reads no sources."""
  return cfg.task != "needle" and any(s.path == DEFAULT_SOURCE for _, s in _active(cfg))


def labels(cfg: DataConfig) -> list[str]:
  """Short names of the run's sources (positive weights, config order), for metric keys such as
  `eval/loss/source/<label>`: `default`, or a prepared folder's basename; a name that two sources
  share gets `_<i>` appended, i its index in `data.sources`."""
  active = _active(cfg)
  base = [DEFAULT_SOURCE if s.path == DEFAULT_SOURCE
          else (pathlib.Path(s.path).absolute().name or "root") for _, s in active]
  return [b if base.count(b) == 1 else f"{b}_{i}" for b, (i, _) in zip(base, active)]


@dataclasses.dataclass(frozen=True, eq=False)
class Resolved:
  """One prepared folder the run reads."""
  name: str                   # `data.sources[i] 'path'` (+ the folder, for the built-in one)
  weight: float               # its share of the training stream (weights need not sum to 1)
  folder: folder_lib.PreparedFolder
  label: str                  # the source's short name (`labels`); the built-in folders share one


@dataclasses.dataclass(frozen=True, eq=False)
class Mixture:
  cfg: DataConfig
  vocab: Vocab
  feature_dim: int
  folders: tuple[Resolved, ...]     # every folder read, in config order
  codebooks: dict                   # "image" / "audio" / "video" -> float32 [K, D] (run-wide)
  codebook_from: dict               # "image" / "audio" / "video" -> the folder's name

  def by_label(self) -> list[tuple[str, list[int]]]:
    """[(label, indices into `folders`)] in config order: the sources as the user named them."""
    out: dict[str, list[int]] = {}
    for i, f in enumerate(self.folders):
      out.setdefault(f.label, []).append(i)
    return list(out.items())


def resolve(cfg: DataConfig) -> Mixture:
  """Opens and checks every folder; raises ValueError naming the source and the key.

  Cached per config and per version of each prepared folder (a folder prepared again in the same
  process, e.g. a notebook, is read again)."""
  versions = []
  for _, s in _active(cfg):
    card = pathlib.Path(s.path).absolute() / "card.json"
    stat = card.stat() if s.path != DEFAULT_SOURCE and card.is_file() else None
    versions.append(None if stat is None else (str(card), stat.st_ino, stat.st_mtime_ns))
  return _resolve(cfg, tuple(versions))


def _open(path, cfg: DataConfig, name: str) -> folder_lib.PreparedFolder:
  try:
    folder = folder_lib.open_folder(path)
  except ValueError as e:
    raise ValueError(f"{name}: {e}") from None
  folder_lib.check_matches(folder, cfg, name)
  return folder


def _folders_of(i: int | None, s: Source, label: str, cfg: DataConfig) -> list[Resolved]:
  """The folders one entry of data.sources reads: itself, or the built-in dataset's three."""
  name = "the default dataset" if i is None else f"data.sources[{i}] '{s.path}'"
  if s.path != DEFAULT_SOURCE:
    return [Resolved(name, s.weight, _open(s.path, cfg, name), label)]
  if cfg.image_channels != 1:
    raise ValueError(f"{name}: the default dataset is grayscale; mixing it needs "
                     f"data.image_channels=1, got {cfg.image_channels}")
  parts = cache.ensure(cfg)
  total = sum(w for _, w in parts)
  return [Resolved(f"{name} ({path.name})", s.weight * w / total, _open(path, cfg, name), label)
          for path, w in parts if w > 0]


@functools.lru_cache(maxsize=8)
def _resolve(cfg: DataConfig, versions: tuple) -> Mixture:
  del versions   # cache key only
  folders = [f for (i, s), label in zip(_active(cfg), labels(cfg))
             for f in _folders_of(i, s, label, cfg)]
  codebooks, codebook_from = {}, {}
  for f in folders:
    for kind in KINDS:
      if kind not in codebooks and kind in f.folder.codebooks:
        codebooks[kind], codebook_from[kind] = f.folder.codebooks[kind], f.name
  return Mixture(cfg, Vocab.from_config(cfg), feature_dim(cfg), tuple(folders), codebooks,
                 codebook_from)


def seed_for(seed: int, folder_index: int) -> int:
  """A 32-bit shuffle seed per (run seed, folder)."""
  return int(np.random.SeedSequence([seed % (1 << 63), folder_index]).generate_state(1)[0])
