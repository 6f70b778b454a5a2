"""Every held-out text document of the built-in dataset, packed into batches for bits per byte.

The documents are the held-out records of its prepared text folder (data/builtin/cache.py), in file
order: pieces of at most L-2 tokens, EOS only where a document ends, as `omnimoe prepare` cut them.
Each piece goes into the current row if it fits, else into a new row. `loss_weights` is 1 exactly
where the target is a text token, so every held-out text token is predicted exactly once. Bits per
byte is sum(nll) / ln(2) / (UTF-8 bytes of the held-out text): `heldout_text_bytes` gives the bytes
of each batch. With byte-level text (the default) that byte count equals sum(loss_weights); with a
sentencepiece tokenizer it does not (a token covers several bytes), and bits per byte stays per byte.
"""
import functools

import numpy as np

from omnimoe.data.builtin import cache
from omnimoe.data.config import DataConfig, feature_dim
from omnimoe.data.packing import loss_weight_table, pack
from omnimoe.data.prepare import folder as folder_lib
from omnimoe.data.vocab import Vocab


@functools.lru_cache(maxsize=4)
def _rows(cfg: DataConfig) -> list[list[tuple]]:
  """Rows of (example, bytes of its text); read once per config."""
  folder = folder_lib.open_folder(cache.path(cfg, "text"))
  vocab, f = Vocab.from_config(cfg), feature_dim(cfg)
  rows, row, used = [], [], 0
  for key in folder.heldout_ids:
    record = folder.record(int(key))
    example = folder_lib.to_example(record, vocab, {}, f)
    if used + len(example.tokens_N) > cfg.seq_len:
      rows.append(row)
      row, used = [], 0
    row.append((example, sum(len(p) for p in record.parts)))
    used += len(example.tokens_N)
  rows.append(row)
  return rows


def heldout_text_batches(cfg: DataConfig, *, batch_size: int,
                         seed: int) -> list[dict[str, np.ndarray]]:
  """All held-out documents in ceil(rows / batch_size) batches; the last is padded with empty rows.

  `seed` is accepted for symmetry; the held-out documents and their order do not depend on it.
  """
  del seed
  vocab = Vocab.from_config(cfg)
  rows = [[example for example, _ in row] for row in _rows(cfg)]
  rows += [[] for _ in range(-len(rows) % batch_size)]
  batches = []
  for start in range(0, len(rows), batch_size):
    batch = pack(rows[start:start + batch_size], cfg.seq_len, feature_dim(cfg),
                 loss_weight_table(cfg))
    batch["loss_weights"] = vocab.is_text(batch["targets"]).astype(np.float32)
    batches.append(batch)
  return batches


def heldout_text_bytes(cfg: DataConfig, *, batch_size: int) -> list[int]:
  """UTF-8 bytes of held-out text in each batch of `heldout_text_batches` (same batch_size): the
  denominator of bits per byte."""
  rows = [sum(nbytes for _, nbytes in row) for row in _rows(cfg)]
  return [sum(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]
