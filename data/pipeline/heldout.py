"""Held-out batches for `eval/loss`: every source's held-out records, packed first fit.

A source is what the user named in `data.sources` (`default` or a folder's basename): the built-in
dataset's three folders are one source, their held-out records interleaved by weight as in training.
Each folder's held-out records come in a fixed shuffled order drawn from the seed (so a prefix is a
fair sample: the built-in folders list each image's captions and each digit's tones together), and
at most `num_batches` batches are built per source. Every batch holds one source only.
"""
from typing import Iterator, Sequence

import numpy as np

from omnimoe.data.config import DataConfig
from omnimoe.data.pipeline import sources as sources_lib
from omnimoe.data.pipeline.first_fit import plan_rows
from omnimoe.data.pipeline.mixture import Builder, Item, stream_rng

HELDOUT_STREAM = 4          # rng = default_rng([HELDOUT_STREAM, seed, folder]): held-out order


def interleave(lists: Sequence[Sequence], weights: Sequence[float]) -> Iterator[tuple[int, object]]:
  """(list index, element) from several finite lists by weight: the next element comes from the
  list that has given the least for its weight (ties: the first such list); once a list runs out,
  the others go on, so every element comes exactly once."""
  taken = [0] * len(lists)
  while True:
    live = [i for i in range(len(lists)) if taken[i] < len(lists[i])]
    if not live:
      return
    i = min(live, key=lambda j: ((taken[j] + 1) / weights[j], j))
    yield i, lists[i][taken[i]]
    taken[i] += 1


def heldout_items(builder: Builder, members: list[int]) -> Iterator[Item]:
  """The held-out items of the folders `members` (indices into mix.folders), interleaved."""
  mix = builder.mix
  orders = [stream_rng(HELDOUT_STREAM, builder.seed, f).permutation(
      mix.folders[f].folder.heldout_ids) for f in members]
  for j, key in interleave(orders, [mix.folders[f].weight for f in members]):
    yield builder.item(members[j], int(key))


def batches_of(builder: Builder, rows: list[list[Item]], batch_size: int) -> list[dict]:
  """Rows in batches of `batch_size`; the last is padded with empty rows."""
  rows = rows + [[] for _ in range(-len(rows) % batch_size)]
  return [builder.pack_rows(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]


def eval_batches_by_source(cfg: DataConfig, *, batch_size: int, seed: int,
                           num_batches: int) -> list[tuple[str, list[dict[str, np.ndarray]]]]:
  """[(label, batches)] in config order (see the module docstring)."""
  mix = sources_lib.resolve(cfg)
  builder = Builder(mix, seed)
  out = []
  for label, members in mix.by_label():
    rows, _ = plan_rows(heldout_items(builder, members), cfg.seq_len, num_batches * batch_size)
    out.append((label, batches_of(builder, rows, batch_size)))
  return out
