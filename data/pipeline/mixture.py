"""The training stream: prepared folders mixed by weight on grain, packed first-fit into batches.

The global example stream is a grain MapDataset of keys (folder, record index):
- every folder: each epoch is a fresh permutation of its training records (`EpochShuffle`, a numpy
  permutation per epoch: O(1) per element; grain's index_shuffle took ~0.8 ms per element on a
  30-record folder), read through `ArrayRecordDataSource`;
- several folders (the built-in dataset is three): `MapDataset.mix(..., weights)`, grain's
  deterministic interleaving by weight;
- `data.image_shift` > 0 moves every training image by up to that many pixels, drawn per stream
  position, so a resumed run sees the same shifts;
- `data.caption_first` > 0 shows that share of the training records made of one image or tone
  then text in the other order (text, then the media), drawn per stream position: the same
  tokens, so the same length and packing; with `data.image_loss=caption_first` only those records'
  image codes carry loss.

Packing is global and deterministic: global batch b takes the next examples of the stream in order
and puts each into the first of its `batch_size` rows with room (data/pipeline/first_fit.py); the
first example that fits in no row starts the next batch. Nothing is cut, so no token is lost or
repeated; rows are about 97% full with the default mixture (greedy row-by-row filling gave 84%).
Every host plans the same global batch from the examples' lengths alone (the index stores them),
and builds only its own rows [p * B/P, (p+1) * B/P). So:
- hosts are disjoint and together give exactly the 1-host batch; over an epoch they cover every
  training record once;
- the iterator state is the global position `{"next_example": k}` (the same on every host, JSON);
  resuming on another number of hosts continues the same global stream;
- segment ids, multimodal positions and per-modality loss weights are those of data/packing.py.
"""
import dataclasses
import sys
from typing import NamedTuple

import grain
import numpy as np

from omnimoe.data import records
from omnimoe.data.config import DataConfig
from omnimoe.data.examples import Example
from omnimoe.data.packing import loss_weight_table, pack
from omnimoe.data.pipeline import sources as sources_lib
from omnimoe.data.pipeline.first_fit import plan_rows
from omnimoe.data.prepare import folder as folder_lib
from omnimoe.data.prepare import image_io
from omnimoe.data.video_layout import Clock

ENDLESS = 1 << 62           # every folder's stream is effectively endless
SHIFT_STREAM = 5            # rng = default_rng([SHIFT_STREAM, seed, position]): image shifts
CAPTION_FIRST_STREAM = 6    # ... whether a record is shown caption first


def stream_rng(stream: int, seed: int, index: int) -> np.random.Generator:
  """An independent random stream per (purpose, run seed, index)."""
  return np.random.default_rng([stream, seed % (1 << 63), index])


class Item(NamedTuple):
  """One planned example: where it comes from and how long it is; built only where needed."""
  folder: int                 # index into Mixture.folders
  key: int                    # record index in that folder
  length: int
  position: int = -1          # place in the training stream (draws the image shift); -1 held out


class EpochShuffle:
  """Position g of an endless stream -> a record id: epoch g // N is a permutation of `ids` drawn
  from (seed, epoch); the last two epochs' permutations are cached (8 bytes per record each)."""

  def __init__(self, ids: np.ndarray, seed: int):
    self.ids, self.seed, self._cache = ids, seed, {}

  def permutation(self, epoch: int) -> np.ndarray:
    if epoch not in self._cache:
      if len(self._cache) >= 2:
        self._cache.pop(min(self._cache))
      self._cache[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.ids)
    return self._cache[epoch]

  def __call__(self, g: int) -> int:
    epoch, i = divmod(int(g), len(self.ids))
    return int(self.permutation(epoch)[i])


class _Key:
  """Maps a folder's record id to (folder, record id); a class so grain can pickle it."""

  def __init__(self, folder: int):
    self.folder = folder

  def __call__(self, i):
    return self.folder, int(i)


def key_stream(mix: sources_lib.Mixture, seed: int) -> grain.MapDataset:
  """The endless global stream of (folder, training record id)."""
  parts = []
  for f, resolved in enumerate(mix.folders):
    shuffle = EpochShuffle(resolved.folder.train_ids, sources_lib.seed_for(seed, f))
    parts.append(grain.MapDataset.range(ENDLESS).map(shuffle).map(_Key(f)))
  if len(parts) == 1:
    return parts[0]
  return grain.MapDataset.mix(parts, [f.weight for f in mix.folders])


class Builder:
  """Lengths and examples of records of a mixture's folders."""

  def __init__(self, mix: sources_lib.Mixture, seed: int):
    self.mix, self.seed = mix, seed

  def item(self, folder: int, key: int, position: int = -1) -> Item:
    """`position`: the item's place in the training stream (draws its image shift)."""
    return Item(folder, key, int(self.mix.folders[folder].folder.lengths_N[key]), position)

  def example(self, item: Item) -> Example:
    record = self.mix.folders[item.folder].folder.record(item.key)
    if item.position >= 0 and self.mix.cfg.image_shift > 0:
      record = self.shifted(record, item.position)
    flipped = False
    if item.position >= 0 and self.mix.cfg.caption_first > 0:
      draw = stream_rng(CAPTION_FIRST_STREAM, self.seed, item.position).uniform()
      flipped = draw < self.mix.cfg.caption_first
      record = caption_first(record) if flipped else record
    example = folder_lib.to_example(record, self.mix.vocab, self.mix.codebooks,
                                    self.mix.feature_dim, Clock.from_config(self.mix.cfg))
    if self.mix.cfg.image_loss == "caption_first" and not flipped:
      example = example._replace(image_loss=False)
    return example

  def shifted(self, record: records.Record, position: int) -> records.Record:
    """Training augmentation: each image moved by up to data.image_shift pixels each way (zero
    fill), drawn from the item's stream position (the same every time it is built)."""
    if not any(isinstance(part, records.ImagePart) for part in record.parts):
      return record
    s, rng = self.mix.cfg.image_shift, stream_rng(SHIFT_STREAM, self.seed, position)
    parts = []
    for part in record.parts:
      if isinstance(part, records.ImagePart):
        dy, dx = (int(v) for v in rng.integers(-s, s + 1, size=2))
        part = records.ImagePart(image_io.shift_patches(part.patches_MxD, part.grid,
                                                        self.mix.cfg.image_patch, dy, dx),
                                 part.grid)
      parts.append(part)
    return dataclasses.replace(record, parts=tuple(parts))

  def pack_rows(self, rows: list[list[Item]]) -> dict[str, np.ndarray]:
    cfg = self.mix.cfg
    return pack([[self.example(item) for item in row] for row in rows], cfg.seq_len,
                self.mix.feature_dim, loss_weight_table(cfg))


def caption_first(record: records.Record) -> records.Record:
  """A record of one image or tone then text, text first; any other record as it is."""
  parts = record.parts
  if (len(parts) == 2 and isinstance(parts[0], (records.ImagePart, records.AudioPart))
      and isinstance(parts[1], bytes)):
    return dataclasses.replace(record, parts=(parts[1], parts[0]))
  return record


class MixedBatches(grain.IterDataset):
  """Endless packed training batches of this host (see the module docstring)."""

  def __init__(self, cfg: DataConfig, *, batch_size: int, seed: int, process_index: int,
               process_count: int):
    super().__init__()
    self.mix = sources_lib.resolve(cfg)
    self.keys = key_stream(self.mix, seed)
    self.builder = Builder(self.mix, seed)
    self.batch_size = batch_size
    per_host = batch_size // process_count
    self.host_rows = slice(process_index * per_host, (process_index + 1) * per_host)

  def plan(self, start: int) -> tuple[list[list[Item]], int]:
    """Global batch starting at example `start`: its rows and the first example of the next."""
    items = (self.builder.item(*self.keys[g], g) for g in range(start, sys.maxsize))
    rows, consumed = plan_rows(items, self.mix.cfg.seq_len, self.batch_size)
    return rows, start + consumed

  def __iter__(self) -> grain.DatasetIterator:
    return _MixedIterator(self)


class _MixedIterator(grain.DatasetIterator):

  def __init__(self, dataset: MixedBatches):
    super().__init__()
    self._dataset, self._next = dataset, 0

  def __next__(self) -> dict[str, np.ndarray]:
    rows, following = self._dataset.plan(self._next)
    batch = self._dataset.builder.pack_rows(rows[self._dataset.host_rows])
    self._next = following
    return batch

  def get_state(self) -> dict:
    return {"next_example": self._next}

  def set_state(self, state: dict) -> None:
    if "next_example" not in state:
      raise ValueError(f"data iterator state {state} is not this pipeline's (a checkpoint of an "
                       f"omnimoe that trained the default dataset in memory?); start a new workdir")
    self._next = int(state["next_example"])


def train_iterator(cfg: DataConfig, *, batch_size: int, seed: int, process_index: int,
                   process_count: int) -> grain.DatasetIterator:
  dataset = MixedBatches(cfg, batch_size=batch_size, seed=seed, process_index=process_index,
                         process_count=process_count)
  if cfg.prefetch > 0:
    dataset = grain.experimental.ThreadPrefetchIterDataset(dataset,
                                                           prefetch_buffer_size=cfg.prefetch)
  return iter(dataset)
