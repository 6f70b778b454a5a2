"""Every held-out text document, packed into batches for bits per byte.

Pieces (at most L-2 tokens, EOS only where a document ends) are packed in a fixed order, each into
the current row if it fits, else into a new row. `loss_weights` is 1 exactly where the target is a
text token, so every held-out text token is predicted exactly once. Bits per byte is
sum(nll) / ln(2) / (UTF-8 bytes of the held-out text): `heldout_text_bytes` gives the bytes of each
batch. With byte-level text (the default) that byte count equals sum(loss_weights); with a
sentencepiece tokenizer it does not (a token covers several bytes), and bits per byte stays per byte.
"""
import numpy as np

from omnimoe.data.config import DataConfig
from omnimoe.data.builtin.default_dataset import build
from omnimoe.data.examples import make_example
from omnimoe.data.packing import pack
from omnimoe.data.packing import loss_weight_table


def _rows(cfg: DataConfig) -> list[list[tuple]]:
  """Rows of (example, bytes of its text)."""
  ds = build(cfg)
  rows, row, used = [], [], 0
  for (ids, ends_document), nbytes in zip(ds.heldout.text_pieces, ds.heldout.text_piece_bytes,
                                          strict=True):
    example = make_example(ids, ds.feature_dim, eos=ends_document)
    if used + len(example.tokens_N) > cfg.seq_len:
      rows.append(row)
      row, used = [], 0
    row.append((example, nbytes))
    used += len(example.tokens_N)
  rows.append(row)
  return rows


def heldout_text_batches(cfg: DataConfig, *, batch_size: int,
                         seed: int) -> list[dict[str, np.ndarray]]:
  """All held-out documents in ceil(rows / batch_size) batches; the last is padded with empty rows.

  `seed` is accepted for symmetry; the held-out documents and their order do not depend on it.
  """
  del seed
  ds = build(cfg)
  rows = [[example for example, _ in row] for row in _rows(cfg)]
  rows += [[] for _ in range(-len(rows) % batch_size)]
  batches = []
  for start in range(0, len(rows), batch_size):
    batch = pack(rows[start:start + batch_size], cfg.seq_len, ds.feature_dim,
                 loss_weight_table(cfg))
    batch["loss_weights"] = ds.vocab.is_text(batch["targets"]).astype(np.float32)
    batches.append(batch)
  return batches


def heldout_text_bytes(cfg: DataConfig, *, batch_size: int) -> list[int]:
  """UTF-8 bytes of held-out text in each batch of `heldout_text_batches` (same batch_size): the
  denominator of bits per byte."""
  rows = [sum(nbytes for _, nbytes in row) for row in _rows(cfg)]
  return [sum(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]
