"""A random batch that honours the data contract (tests, benchmarks, smoke runs).

Rows are packed with documents of random length (segment ids 1, 2, ...), end in padding
(segment 0, modality 0), and mix text / image / audio positions; features are non-zero only on
image and audio positions; positions are (t, h, w) = running index within each document.
"""
import numpy as np


def synthetic_batch(batch_size: int, seq_len: int, vocab_size: int, feature_dim: int, *,
                    seed: int = 0, min_doc: int = 3, max_doc: int = 40, pad: int = 3) -> dict:
  r = np.random.default_rng(seed)
  B, L = batch_size, seq_len
  seg = np.zeros((B, L), np.int32)
  pos = np.zeros((B, L), np.int32)
  for b in range(B):
    start, doc = 0, 1
    while start < L - pad:
      n = min(int(r.integers(min_doc, max_doc + 1)), L - pad - start)
      seg[b, start:start + n] = doc
      pos[b, start:start + n] = np.arange(n)
      start, doc = start + n, doc + 1
  modality = np.where(seg > 0, r.integers(1, 4, (B, L)), 0).astype(np.int8)
  features = np.where((modality >= 2)[..., None], r.normal(size=(B, L, feature_dim)), 0)
  return {
      "tokens": np.where(seg > 0, r.integers(0, vocab_size, (B, L)), 0).astype(np.int32),
      "features": features.astype(np.float32),
      "modality": modality,
      "segment_ids": seg,
      "positions": np.repeat(pos[..., None], 3, axis=-1),
      "targets": r.integers(0, vocab_size, (B, L)).astype(np.int32),
      "loss_weights": (seg > 0).astype(np.float32),
  }
