"""Every held-out text document, packed into batches for bits per byte.

Pieces (at most L-2 bytes, EOS only where a document ends) are packed in a fixed order, each into
the current row if it fits, else into a new row. `loss_weights` is 1 exactly where the target is a
text byte, so sum(nll) / ln(2) / sum(loss_weights) is bits per byte and every held-out byte is
predicted exactly once.
"""
import numpy as np

from data.config import DataConfig
from data.default_dataset import build
from data.examples import make_example
from data.packing import pack
from data.pipeline import loss_weight_table


def heldout_text_batches(cfg: DataConfig, *, batch_size: int,
                         seed: int) -> list[dict[str, np.ndarray]]:
  """All held-out documents in ceil(rows / batch_size) batches; the last is padded with empty rows.

  `seed` is accepted for symmetry; the held-out documents and their order do not depend on it.
  """
  del seed
  ds = build(cfg)
  rows, row, used = [], [], 0
  for ids, ends_document in ds.heldout.text_pieces:
    example = make_example(ids, ds.feature_dim, eos=ends_document)
    if used + len(example.tokens_N) > cfg.seq_len:
      rows.append(row)
      row, used = [], 0
    row.append(example)
    used += len(example.tokens_N)
  rows.append(row)
  rows += [[] for _ in range(-len(rows) % batch_size)]
  batches = []
  for start in range(0, len(rows), batch_size):
    batch = pack(rows[start:start + batch_size], cfg.seq_len, ds.feature_dim,
                 loss_weight_table(cfg))
    batch["loss_weights"] = ds.vocab.is_text(batch["targets"]).astype(np.float32)
    batches.append(batch)
  return batches
