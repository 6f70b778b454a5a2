"""The grain training iterator: contract, determinism, checkpoint state, per-host sharding."""
import dataclasses
import json

import numpy as np
import pytest

from omnimoe import data
from omnimoe.data.config import DataConfig
from omnimoe.data.packing import BATCH_KEYS

CFG = DataConfig(seq_len=96)
B = 8


def take(it, n):
  return [next(it) for _ in range(n)]


def first_batches(cfg, n, **kwargs):
  """The first n batches of a fresh iterator (closed afterwards)."""
  it = data.train_iterator(cfg, batch_size=kwargs.pop("batch_size", B), **kwargs)
  batches = take(it, n)
  it.close()
  return batches


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_contract_dtypes_and_shapes():
  info = data.dataset_info(CFG, seed=0)
  it = data.train_iterator(CFG, batch_size=B, seed=0)
  batch = next(it)
  it.close()
  L, F = CFG.seq_len, info.feature_dim
  expected = {
      "tokens": (np.int32, (B, L)), "features": (np.float32, (B, L, F)),
      "modality": (np.int8, (B, L)), "segment_ids": (np.int32, (B, L)),
      "positions": (np.int32, (B, L, 3)), "targets": (np.int32, (B, L)),
      "loss_weights": (np.float32, (B, L)),
  }
  assert set(batch) == set(BATCH_KEYS) == set(expected)
  for key, (dtype, shape) in expected.items():
    assert batch[key].dtype == dtype, key
    assert batch[key].shape == shape, key
    assert isinstance(batch[key], np.ndarray)
  assert batch["tokens"].max() < info.vocab.used_size


def test_same_seed_same_batches_other_seed_different():
  a = first_batches(CFG, 3, seed=7)
  b = first_batches(CFG, 3, seed=7)
  c = first_batches(CFG, 3, seed=8)
  assert_batches_equal(a, b)
  assert not np.array_equal(a[0]["tokens"], c[0]["tokens"])
  assert not np.array_equal(a[0]["tokens"], a[1]["tokens"])   # the stream moves on


@pytest.mark.parametrize("prefetch", [0, 2])
def test_state_round_trip(prefetch):
  cfg = dataclasses.replace(CFG, prefetch=prefetch)
  it = data.train_iterator(cfg, batch_size=B, seed=1)
  take(it, 3)
  state = json.loads(json.dumps(it.get_state()))   # must survive JSON (the checkpoint format)
  expected = take(it, 4)
  it.close()
  fresh = data.train_iterator(cfg, batch_size=B, seed=1)
  fresh.set_state(state)
  assert_batches_equal(take(fresh, 4), expected)
  # Setting the state back rewinds a used iterator too.
  fresh.set_state(state)
  assert_batches_equal(take(fresh, 2), expected[:2])
  fresh.close()


def test_prefetch_does_not_change_batches():
  a = first_batches(dataclasses.replace(CFG, prefetch=0), 3, seed=2)
  b = first_batches(dataclasses.replace(CFG, prefetch=3), 3, seed=2)
  assert_batches_equal(a, b)


def test_hosts_get_disjoint_rows_that_make_up_the_global_batch():
  whole = first_batches(CFG, 2, seed=4)
  parts = [first_batches(CFG, 2, seed=4, process_index=p, process_count=2) for p in range(2)]
  for step in range(2):
    host0, host1 = parts[0][step], parts[1][step]
    assert host0["tokens"].shape == (B // 2, CFG.seq_len)
    rows0 = {r.tobytes() for r in host0["tokens"]}
    rows1 = {r.tobytes() for r in host1["tokens"]}
    assert not rows0 & rows1
    assert rows0 | rows1 == {r.tobytes() for r in whole[step]["tokens"]}
    for key in BATCH_KEYS:   # host p holds rows [p*B/2, (p+1)*B/2) of the global batch
      np.testing.assert_array_equal(np.concatenate([host0[key], host1[key]]), whole[step][key])


def test_indivisible_global_batch_is_refused():
  with pytest.raises(ValueError, match="not divisible by the number of processes"):
    data.train_iterator(CFG, batch_size=9, seed=0, process_index=0, process_count=2)
  with pytest.raises(ValueError, match="process_index"):
    data.train_iterator(CFG, batch_size=8, seed=0, process_index=2, process_count=2)


def test_mixture_weights_are_respected():
  only_audio = dataclasses.replace(CFG, weight_image=0.0, weight_text=0.0)
  [batch] = first_batches(only_audio, 1, seed=0)
  kinds = set(np.unique(batch["modality"]).tolist())
  assert {1, 3} <= kinds <= {0, 1, 3}
  only_text = dataclasses.replace(CFG, weight_image=0.0, weight_audio=0.0)
  [batch] = first_batches(only_text, 1, seed=0)
  assert set(np.unique(batch["modality"]).tolist()) <= {0, 1}
  assert np.all(batch["features"] == 0)
