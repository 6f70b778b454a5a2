"""The mixed pipeline: prepared folders (and the default dataset) mixed by weight, on grain.

The global example stream is a grain MapDataset of keys (source, index):
- a prepared source: every epoch is a fresh permutation of its training records (`EpochShuffle`,
  a numpy permutation per epoch: O(1) per element; grain's index_shuffle took ~0.8 ms per element
  on a 30-record folder), read through `ArrayRecordDataSource`;
- the default dataset trains from its own prepared folders (images, tones, text; data/sources.py
  `train_sources`); its held-out side draws example j from its own RNG (`sampler.draw_recipe` /
  `cook`): held-out images and text, fresh tones;
- `data.image_shift` > 0 moves every training image by up to that many pixels, drawn per stream
  position, so a resumed run sees the same shifts;
- several sources: `MapDataset.mix(..., weights)`, grain's deterministic interleaving by weight.

Packing is global and deterministic: global batch b takes the next examples of the stream in order
and puts each into the first of its `batch_size` rows with room (first fit); the first example that
fits in no row starts the next batch. Nothing is cut, so no token is lost or repeated; rows are
about 97% full with the default mixture (greedy row-by-row filling gave 84%). Every
host plans the same global batch from the examples' lengths alone (the index stores them), and
builds only its own rows [p * B/P, (p+1) * B/P). So:
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
from omnimoe.data.prepare import image_io
from omnimoe.data.prepare import folder as prepared_lib
from omnimoe.data.pipeline import sampler
from omnimoe.data.pipeline import sources as sources_lib
from omnimoe.data.config import DataConfig
from omnimoe.data.examples import Example
from omnimoe.data.packing import loss_weight_table, pack

NUM_DEFAULT = 1 << 62       # every component stream is effectively endless


class Item(NamedTuple):
  """One planned example: where it comes from and how long it is; built only where needed."""
  source: int
  key: int                    # record index (prepared) or draw index (default)
  length: int
  recipe: object = None       # (Recipe, rng) for a default-dataset held-out draw
  position: int = -1          # place in the training stream (draws the image shift)


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
  """Maps a component's record id to (source, record id); a class so grain can pickle it."""

  def __init__(self, source: int):
    self.source = source

  def __call__(self, i):
    return self.source, int(i)


def key_stream(mix: sources_lib.Mixture, seed: int) -> grain.MapDataset:
  """The endless global stream of (training source, record id) (`mix.train_sources`)."""
  parts = []
  for s, source in enumerate(mix.train_sources):
    shuffle = EpochShuffle(source.folder.train_ids, sources_lib.seed_for(seed, s))
    parts.append(grain.MapDataset.range(NUM_DEFAULT).map(shuffle).map(_Key(s)))
  if len(parts) == 1:
    return parts[0]
  return grain.MapDataset.mix(parts, [s.weight for s in mix.train_sources])


class Builder:
  """Lengths and examples of keys, for one split of a mixture: training (`mix.train_sources`,
  prepared folders only) or held-out (`mix.sources`: prepared folders and the default dataset's
  own held-out draws)."""

  def __init__(self, mix: sources_lib.Mixture, seed: int, heldout: bool):
    self.mix, self.seed, self.heldout = mix, seed, heldout
    self.sources = mix.sources if heldout else mix.train_sources

  def item(self, source: int, key: int, position: int = -1) -> Item:
    """`position`: the item's place in the training stream (draws its image shift)."""
    folder = self.sources[source].folder
    if folder is not None:
      return Item(source, key, int(folder.lengths_N[key]), position=position)
    ds = self.mix.default                     # only held out: training reads its folders
    rng = sampler.row_rng(sampler.MIXED_EVAL_STREAM, self.seed, key)
    recipe = sampler.draw_recipe(ds, ds.heldout, rng)
    return Item(source, key, recipe.length, (recipe, rng))

  def example(self, item: Item) -> Example:
    folder = self.sources[item.source].folder
    if folder is not None:
      record = folder.record(item.key)
      if not self.heldout and self.mix.cfg.image_shift > 0:
        record = self.shifted(record, item.position)
      return prepared_lib.to_example(record, self.mix.vocab, self.mix.codebooks,
                                     self.mix.feature_dim)
    ds = self.mix.default
    recipe, rng = item.recipe
    return self.mix.recode(sampler.cook(ds, ds.heldout, recipe, rng))

  def shifted(self, record: records.Record, position: int) -> records.Record:
    """Training augmentation: each image moved by up to data.image_shift pixels each way (zero
    fill), drawn from the item's stream position (the same every time it is built)."""
    if not any(isinstance(part, records.ImagePart) for part in record.parts):
      return record
    s, rng = self.mix.cfg.image_shift, sampler.row_rng(sampler.SHIFT_STREAM, self.seed, position)
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


class _RoomTree:
  """Space left in each of n rows, as a max segment tree: the first row with room for an item in
  O(log n), so first fit stays cheap for batches of thousands of rows."""

  def __init__(self, n: int, room: int):
    self.size = 1 << max(0, (n - 1).bit_length())
    self.max = [0] * (2 * self.size)
    self.max[self.size:self.size + n] = [room] * n
    for i in range(self.size - 1, 0, -1):
      self.max[i] = max(self.max[2 * i], self.max[2 * i + 1])

  def first_with(self, need: int) -> int | None:
    if self.max[1] < need:
      return None
    i = 1
    while i < self.size:
      i = 2 * i if self.max[2 * i] >= need else 2 * i + 1
    return i - self.size

  def take(self, row: int, amount: int) -> None:
    i = row + self.size
    self.max[i] -= amount
    while i > 1:
      i //= 2
      self.max[i] = max(self.max[2 * i], self.max[2 * i + 1])


def plan_rows(items, seq_len: int, num_rows: int) -> tuple[list[list[Item]], int]:
  """First-fit rows from an item iterator: each item goes into the first of `num_rows` rows with
  room for it; the plan ends at the first item that fits in none (not consumed) or when the items
  run out. Returns (the non-empty rows, items consumed)."""
  rows, room, consumed = [[] for _ in range(num_rows)], _RoomTree(num_rows, seq_len), 0
  for item in items:
    if item.length > seq_len:
      raise ValueError(f"an example of {item.length} tokens does not fit data.seq_len={seq_len}")
    r = room.first_with(item.length)
    if r is None:
      break
    rows[r].append(item)
    room.take(r, item.length)
    consumed += 1
  return [row for row in rows if row], consumed


class MixedBatches(grain.IterDataset):
  """Endless packed training batches of this host (see the module docstring)."""

  def __init__(self, cfg: DataConfig, *, batch_size: int, seed: int, process_index: int,
               process_count: int):
    super().__init__()
    self.mix = sources_lib.resolve(cfg)
    self.keys = key_stream(self.mix, seed)
    self.builder = Builder(self.mix, seed, heldout=False)
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


def eval_batches_by_source(cfg: DataConfig, *, batch_size: int, seed: int,
                           num_batches: int) -> list[tuple[str, list[dict[str, np.ndarray]]]]:
  """Held-out batches of each source, as (label, batches) in config order: a prepared folder's
  held-out records in file order, the default dataset's held-out draws; at most `num_batches`
  batches from each source. Every batch holds one source only."""
  mix = sources_lib.resolve(cfg)
  builder = Builder(mix, seed, heldout=True)
  out = []
  for s, source in enumerate(mix.sources):
    keys = range(NUM_DEFAULT) if source.folder is None else source.folder.heldout_ids
    items = (builder.item(s, int(k)) for k in keys)
    rows, _ = plan_rows(items, cfg.seq_len, num_batches * batch_size)
    rows += [[] for _ in range(-len(rows) % batch_size)]
    out.append((source.label, [builder.pack_rows(rows[i:i + batch_size])
                               for i in range(0, len(rows), batch_size)]))
  return out


def eval_batches(cfg: DataConfig, *, batch_size: int, seed: int,
                 num_batches: int) -> list[dict[str, np.ndarray]]:
  """Held-out batches, source by source (`eval_batches_by_source`, labels dropped)."""
  return [b for _, batches in eval_batches_by_source(cfg, batch_size=batch_size, seed=seed,
                                                     num_batches=num_batches) for b in batches]
