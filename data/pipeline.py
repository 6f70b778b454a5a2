"""The grain pipeline: batch i of the training stream is a pure function of (cfg, seed, i).

`grain.MapDataset.range(NUM_BATCHES).map(batch_fn)`: element i is this host's share of global batch
i, and global row r of batch i is drawn from `default_rng([TRAIN_STREAM, seed, i * B + r])`. So
- the iterator state is just the next batch index (`{"next_index": i}`, JSON);
- host p of P takes rows [p * B/P, (p+1) * B/P) of every global batch: hosts are disjoint and
  together give exactly the 1-host batch;
- resuming on a different number of hosts continues the same global stream.
Prefetch: grain's thread pool (`ReadOptions`) keeps `cfg.prefetch` batches in flight.

That is the default dataset alone (`data.sources` empty or only `default`). With a prepared folder
among the sources, `train_iterator`, `eval_batches` and `dataset_info` hand over to data/mixture.py
(same signatures, same batch contract; see data/sources.py for how sources combine).
"""
import dataclasses
import functools

import grain
import numpy as np

from data import default_dataset, mixture, sampler
from data import sources as sources_lib
from data.config import DataConfig
from data.default_dataset import DatasetInfo, DefaultDataset, Split, build
from data.packing import loss_weight_table, pack

NUM_BATCHES = 1 << 62       # effectively endless; the stream never repeats a row


@functools.lru_cache(maxsize=16)
def dataset_info(cfg: DataConfig, seed: int) -> DatasetInfo:
  """Vocabulary and feature width of the run's data (checks every source; cached)."""
  if sources_lib.is_default_only(cfg):
    return default_dataset.dataset_info(cfg, seed)
  mix = sources_lib.resolve(cfg)
  return DatasetInfo(mix.vocab, mix.feature_dim)


def mixture_batch(ds: DefaultDataset, split: Split, stream: int, seed: int,
                  rows: range) -> dict[str, np.ndarray]:
  """Packed rows `rows` (global row ids) of a mixture stream."""
  examples = [sampler.sample_row(ds, split, sampler.row_rng(stream, seed, r)) for r in rows]
  return pack(examples, ds.cfg.seq_len, ds.feature_dim, loss_weight_table(ds.cfg))


@dataclasses.dataclass(frozen=True)
class TrainBatchFn:
  """index of a global batch -> this host's rows of it."""
  cfg: DataConfig
  seed: int
  batch_size: int             # global
  process_index: int
  process_count: int

  def __call__(self, index: int) -> dict[str, np.ndarray]:
    per_host = self.batch_size // self.process_count
    first = index * self.batch_size + self.process_index * per_host
    ds = build(self.cfg)
    return mixture_batch(ds, ds.train, sampler.TRAIN_STREAM, self.seed,
                         range(first, first + per_host))


def _check_sharding(batch_size: int, process_index: int, process_count: int) -> None:
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  if process_count <= 0 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is not in [0, process_count={process_count})")
  if batch_size % process_count:
    raise ValueError(f"global batch_size={batch_size} is not divisible by the number of processes "
                     f"({process_count}); every host must load the same number of rows")


def train_iterator(cfg: DataConfig, *, batch_size: int, seed: int, process_index: int = 0,
                   process_count: int = 1) -> grain.DatasetIterator:
  """Endless training batches (this host's `batch_size // process_count` rows of each global batch).

  Supports `get_state()` / `set_state()`; call `close()` when done to stop the prefetch threads.
  """
  _check_sharding(batch_size, process_index, process_count)
  if not sources_lib.is_default_only(cfg):
    return mixture.train_iterator(cfg, batch_size=batch_size, seed=seed,
                                  process_index=process_index, process_count=process_count)
  build(cfg)   # build (and validate) once here, not inside a prefetch thread
  batch_fn = TrainBatchFn(cfg, seed, batch_size, process_index, process_count)
  dataset = grain.MapDataset.range(NUM_BATCHES).map(batch_fn)
  read_options = grain.ReadOptions(num_threads=1 if cfg.prefetch > 0 else 0,
                                   prefetch_buffer_size=max(cfg.prefetch, 0))
  return iter(dataset.to_iter_dataset(read_options))


def eval_batches(cfg: DataConfig, *, batch_size: int, seed: int,
                 num_batches: int) -> list[dict[str, np.ndarray]]:
  """Held-out mixture batches: held-out images, fresh tones (own RNG stream), held-out text."""
  if not sources_lib.is_default_only(cfg):
    return mixture.eval_batches(cfg, batch_size=batch_size, seed=seed, num_batches=num_batches)
  ds = build(cfg)
  return [mixture_batch(ds, ds.heldout, sampler.EVAL_STREAM, seed,
                        range(b * batch_size, (b + 1) * batch_size)) for b in range(num_batches)]


def eval_batches_by_source(cfg: DataConfig, *, batch_size: int, seed: int,
                           num_batches: int) -> list[tuple[str, list[dict[str, np.ndarray]]]]:
  """The batches of `eval_batches`, grouped by source: [(label, batches), ...] in config order;
  the label is `default` or the prepared folder's basename (data.sources.labels)."""
  if not sources_lib.is_default_only(cfg):
    return mixture.eval_batches_by_source(cfg, batch_size=batch_size, seed=seed,
                                          num_batches=num_batches)
  return [(sources_lib.labels(cfg)[0], eval_batches(cfg, batch_size=batch_size, seed=seed,
                                                    num_batches=num_batches))]
