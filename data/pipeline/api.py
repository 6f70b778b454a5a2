"""The run's data: the public entry points of omnimoe.data, over one pipeline.

Every run, the default one included, trains and evaluates from prepared folders mixed by weight
(data/pipeline/sources.py says which: `data.sources`, where `[]` is the built-in dataset's three
folders, data/builtin/cache.py), except `data.task=needle`, whose documents are generated
(data/pipeline/needle.py). The batch contract, the iterator state (`{"next_example": k}`),
per-host sharding and prefetch are those of data/pipeline/mixture.py.
"""
import dataclasses
import functools

import grain
import numpy as np

from omnimoe.data.config import DataConfig, feature_dim
from omnimoe.data.pipeline import heldout, mixture, needle
from omnimoe.data.pipeline import sources as sources_lib
from omnimoe.data.vocab import Vocab


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  vocab: Vocab
  feature_dim: int            # F: width of the `features` vectors


@functools.lru_cache(maxsize=16)
def dataset_info(cfg: DataConfig, seed: int) -> DatasetInfo:
  """Vocabulary and feature width of the run's data (opens and checks every source; cached).

  `seed` is accepted for symmetry with the iterators; neither depends on it."""
  del seed
  needle.check(cfg)
  if cfg.task == "needle":   # generated text: no folders to open
    return DatasetInfo(Vocab.from_config(cfg), feature_dim(cfg))
  mix = sources_lib.resolve(cfg)
  return DatasetInfo(mix.vocab, mix.feature_dim)


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
  needle.check(cfg)
  if cfg.task == "needle":
    return needle.train_iterator(cfg, batch_size=batch_size, seed=seed,
                                 process_index=process_index, process_count=process_count)
  return mixture.train_iterator(cfg, batch_size=batch_size, seed=seed,
                                process_index=process_index, process_count=process_count)


def eval_batches_by_source(cfg: DataConfig, *, batch_size: int, seed: int,
                           num_batches: int) -> list[tuple[str, list[dict[str, np.ndarray]]]]:
  """Held-out batches grouped by source: [(label, batches), ...] in config order; the label is
  `default` or the prepared folder's basename (data/pipeline/sources.py `labels`); at most
  `num_batches` batches per source (data/pipeline/heldout.py). A needle run has one source,
  `needle`: held-out documents of its last training length (data/pipeline/needle.py)."""
  needle.check(cfg)
  if cfg.task == "needle":
    return [("needle", needle.loss_batches(cfg, batch_size=batch_size, seed=seed,
                                           num_batches=num_batches))]
  return heldout.eval_batches_by_source(cfg, batch_size=batch_size, seed=seed,
                                        num_batches=num_batches)


def eval_batches(cfg: DataConfig, *, batch_size: int, seed: int,
                 num_batches: int) -> list[dict[str, np.ndarray]]:
  """The batches of `eval_batches_by_source`, source after source, labels dropped."""
  return [b for _, batches in eval_batches_by_source(cfg, batch_size=batch_size, seed=seed,
                                                     num_batches=num_batches) for b in batches]
