"""Rows for context parallelism: balanced causal work, and the checks a config must pass.

With the length of every row split over c `context` devices, causal attention gives the device
holding the row's end far more work than the one holding its start. `balance` cuts each row into
2c equal chunks and lays them out as chunk 0, 2c-1, 1, 2c-2, ..., so device i (which holds the
i-th contiguous slice of L / c positions) gets chunks i and 2c-1-i: an early and a late one, the
same causal work for every device. It is done once, on the host, where the batch is made: every
array of the batch is permuted along the length together (targets were formed before, so they move
with their positions), and the batch gains `order` int32 [B, L], each position's index in the row
before reordering, which the attention's causal mask uses (model/context_parallel.py); masks and
RoPE never read array indices. Packed documents may cross the shard (and chunk) boundaries.
"""
import numpy as np


def balanced_order(L: int, c: int) -> np.ndarray:
  """int32 [L]: the original index of each position of a balanced row (chunks i and 2c-1-i on
  device i)."""
  if L % (2 * c):
    raise ValueError(f"a row of {L} positions cannot be cut into 2 x {c} equal chunks")
  chunks = np.arange(L, dtype=np.int32).reshape(2 * c, L // (2 * c))
  return np.concatenate([np.concatenate([chunks[i], chunks[2 * c - 1 - i]]) for i in range(c)])


def balance(batch: dict[str, np.ndarray], c: int) -> dict[str, np.ndarray]:
  """Every [B, L, ...] array reordered by `balanced_order`, plus `order` [B, L]."""
  L = batch["tokens"].shape[1]
  order = balanced_order(L, c)
  out = {k: np.take(v, order, axis=1) for k, v in batch.items()}
  out["order"] = np.broadcast_to(order, batch["tokens"].shape).copy()
  return out


def check_length(seq_len: int, c: int, balanced: bool) -> None:
  """Rows of `seq_len` must cut into c (2c when balanced) equal parts: a one-line ValueError."""
  parts = 2 * c if balanced else c
  if c > 1 and seq_len % parts:
    how = (f"2 x mesh.within_rack.context = {parts} chunks (train.context_balance)" if balanced
           else f"mesh.within_rack.context = {c} devices")
    raise ValueError(f"config key 'data.seq_len' must be divisible by {how}, got {seq_len}")


def prepare(batch: dict[str, np.ndarray], c: int, balanced: bool) -> dict[str, np.ndarray]:
  """A host batch as the train step takes it on c `context` devices: balanced when c > 1 and
  `balanced` (train.context_balance), else unchanged."""
  return balance(batch, c) if c > 1 and balanced else batch
