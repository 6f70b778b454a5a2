"""Sliding-window (local) attention layers: `model.local_layers` attend within
`model.attention_window` positions. The blockwise and xla backends, and both context-parallel
strategies, equal the float64 oracle with the window (output and every gradient); the blockwise loop
starts at the first key block the window reaches; scanned local layers equal unrolled ones; bad
settings stop in one line."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from oracles import attention_oracle
from omnimoe.model.attention import attend
from omnimoe.model.blockwise_attention import blocks_computed
from omnimoe.model.context_parallel import attend_over_context
from omnimoe.train import config as config_lib
from omnimoe.train import context_batch
from omnimoe.train.config import ConfigError
from test_scan import _loss_aux_grads, scanned_leaf

N, H, KV, D = 48, 4, 2, 8


def _case(seed, n=N):
  keys = jax.random.split(jax.random.key(seed), 4)
  seg = np.ones((2, n), np.int32)
  seg[1, 19:] = 2                              # two documents in row 1, then padding
  seg[1, 41:] = 0
  q = np.asarray(jax.random.normal(keys[0], (2, n, H, D)))
  k = np.asarray(jax.random.normal(keys[1], (2, n, KV, D)))
  v = np.asarray(jax.random.normal(keys[2], (2, n, KV, D)))
  r = np.asarray(jax.random.normal(keys[3], (2, n, H, D)))
  return q, k, v, seg, r


def _assert_oracle(o, grads, want_o, want_g):
  np.testing.assert_allclose(o, want_o, rtol=1e-5, atol=1e-5)
  for got, want, name in zip(grads, want_g, "qkv"):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=f"d{name}")


@pytest.mark.parametrize("impl,window,block", [("blockwise", 1, 8), ("blockwise", 6, 8),
                                               ("blockwise", 17, 5), ("xla", 6, 8)])
def test_windowed_attention_meets_the_float64_oracle(impl, window, block):
  q, k, v, seg, r = _case(window)

  def loss(q, k, v, w):
    o = attend(q, k, v, jnp.asarray(seg), implementation=impl, block=block, window=w)
    return jnp.sum(o * r), o
  # the window traced, as scanned layers pass it
  (_, o), grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(
      q, k, v, jnp.int32(window))
  order = np.broadcast_to(np.arange(N), seg.shape)
  want_o, want_g = attention_oracle(q, k, v, seg, order, r, window=window)
  _assert_oracle(o, grads, want_o, want_g)
  full_o, _ = attention_oracle(q, k, v, seg, order, r)
  assert np.abs(want_o - full_o).max() > 0.1        # the window really hides keys


def test_the_blockwise_loop_starts_where_the_window_reaches():
  """8 blocks of 8: a window of 1 computes the 8 diagonal pairs; 2 to 9 reach one block back
  (1 + 7 * 2 pairs), 10 two (1 + 2 + 6 * 3), 64 everything causal (36); every pair the loop
  visits is computed."""
  seg = jnp.ones((1, 64), jnp.int32)
  q = jax.random.normal(jax.random.key(1), (1, 64, 2, D))
  kv = jax.random.normal(jax.random.key(2), (1, 64, 1, D))
  count = jax.jit(blocks_computed, static_argnums=4)
  for window, want in [(1, 8), (2, 15), (8, 15), (9, 15), (10, 21), (64, 36)]:
    fwd, bwd = count(q, kv, kv, seg, 8, jnp.int32(window))
    assert fwd.tolist() == bwd.tolist() == [want, want], window


@pytest.mark.parametrize("strategy", ["all_gather", "ring"])
def test_windowed_attention_over_context_meets_the_float64_oracle(strategy):
  """Balanced order over (context 4) x (tensor 2): the window follows the batch's order, not the
  array index, so it holds across shards."""
  c, window = 4, 11
  q, k, v, seg, r = _case(3)
  want_o, want_g = attention_oracle(q, k, v, seg, np.broadcast_to(np.arange(N), seg.shape), r,
                                    window=window)
  perm = context_batch.balanced_order(N, c)
  mesh = jax.make_mesh((1, 1, 1, 2, 4), ("data", "fsdp", "expert", "tensor", "context"),
                       axis_types=(AxisType.Auto,) * 5)
  sh = NamedSharding(mesh, P(None, "context"))
  put = lambda a: jax.device_put(a[:, perm], sh)
  order = jax.device_put(np.broadcast_to(perm, seg.shape).astype(np.int32), sh)

  def loss(q, k, v, seg, order, r):
    o = attend_over_context(q, k, v, seg, order, strategy=strategy, implementation="blockwise",
                            block=4, window=window)
    return jnp.sum(o * r), o
  with jax.set_mesh(mesh):
    (_, o), grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(
        put(q), put(k), put(v), put(seg), order, put(r))
  undo = np.argsort(perm)
  _assert_oracle(np.asarray(o)[:, undo], [np.asarray(g)[:, undo] for g in grads], want_o, want_g)


LOCAL = ("model.local_layers=[0,2]", "model.attention_window=5", "model.attention=blockwise",
         "model.attention_block=8")


def test_scanned_local_layers_equal_unrolled_ones():
  """Layers 0 (dense, unrolled) and 2 (inside the scan, next to global layer 1) are local."""
  ref_loss, _, ref_grads = _loss_aux_grads(1, "topk", False, *LOCAL)
  loss, _, grads = _loss_aux_grads(1, "topk", True, *LOCAL)
  assert loss == pytest.approx(ref_loss, rel=1e-5)
  assert abs(ref_loss - _loss_aux_grads(1, "topk", False)[0]) > 1e-4   # the window matters
  for path, ref in jax.tree_util.tree_leaves_with_path(ref_grads):
    np.testing.assert_allclose(scanned_leaf(grads, path, 1), ref, rtol=1e-5,
                               atol=1e-5 * np.abs(ref).max(), err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("overrides,message", [
    (["model.attention_window=64"], "model.local_layers is empty"),
    (["model.local_layers=[0]"], "'model.attention_window' must be positive"),
    (["model.local_layers=[9]", "model.attention_window=8"], "must lie in 0..3"),
    (["model.local_layers=[1,1]", "model.attention_window=8"], "has a layer twice")])
def test_bad_window_settings_stop_in_one_line(overrides, message):
  with pytest.raises(ConfigError, match=message) as e:
    config_lib.load(None, overrides)
  assert "\n" not in str(e.value)
