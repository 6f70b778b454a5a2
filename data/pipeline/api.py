"""The run's data: the public entry points of data/, over one pipeline (data/mixture.py).

Every run, the default one included, trains from prepared folders mixed by weight (data/sources.py
says which: `data.sources`, where `[]` is the default dataset, itself trained from its prepared
folders, data/default_prepared.py). The batch contract, the iterator state
(`{"next_example": k}`), per-host sharding and prefetch are those of data/mixture.py.
"""
import functools

import grain
import numpy as np

from omnimoe.data.builtin import default_dataset
from omnimoe.data.pipeline import mixture
from omnimoe.data.pipeline import sources as sources_lib
from omnimoe.data.config import DataConfig
from omnimoe.data.builtin.default_dataset import DatasetInfo


@functools.lru_cache(maxsize=16)
def dataset_info(cfg: DataConfig, seed: int) -> DatasetInfo:
  """Vocabulary and feature width of the run's data (checks every source; cached)."""
  if sources_lib.is_default_only(cfg):
    return default_dataset.dataset_info(cfg, seed)
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
  return mixture.train_iterator(cfg, batch_size=batch_size, seed=seed,
                                process_index=process_index, process_count=process_count)


def eval_batches(cfg: DataConfig, *, batch_size: int, seed: int,
                 num_batches: int) -> list[dict[str, np.ndarray]]:
  """Held-out batches of every source (the default dataset's: held-out images and text, freshly
  drawn tones)."""
  return mixture.eval_batches(cfg, batch_size=batch_size, seed=seed, num_batches=num_batches)


def eval_batches_by_source(cfg: DataConfig, *, batch_size: int, seed: int,
                           num_batches: int) -> list[tuple[str, list[dict[str, np.ndarray]]]]:
  """The batches of `eval_batches`, grouped by source: [(label, batches), ...] in config order;
  the label is `default` or the prepared folder's basename (data.sources.labels)."""
  return mixture.eval_batches_by_source(cfg, batch_size=batch_size, seed=seed,
                                        num_batches=num_batches)
