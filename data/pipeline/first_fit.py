"""First-fit packing plans: which examples go into which row of a batch, from their lengths alone.

Each item goes into the first row with room for it; the plan ends at the first item that fits in no
row. Our own code rather than grain's `FirstFitPackIterDataset`: every host must plan the same
global batch from the lengths alone and resume from one integer (data/pipeline/mixture.py).
"""
from typing import Iterable, Protocol


class HasLength(Protocol):
  length: int


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


def plan_rows(items: Iterable[HasLength], seq_len: int, num_rows: int) -> tuple[list[list], int]:
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
