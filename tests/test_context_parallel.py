"""Context parallelism (model/context_parallel.py, train/context_batch.py) on 8 simulated devices.

Attention over a `context` axis (all_gather and ring, rows balanced or in array order, packed
documents crossing shard boundaries, padding, GQA, heads over `tensor`) against a float64 oracle;
the whole train loss and every gradient leaf on (context 8), (data 2 x context 4) and
(fsdp 2 x expert 2 x context 2) against the one-device run; the balanced layout against a loop;
bad lengths refused in one line."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from oracles import attention_oracle
from omnimoe import data
from omnimoe.model.context_parallel import attend_over_context
from omnimoe.train import config as config_lib
from omnimoe.train import context_batch
from omnimoe.train.config import ConfigError
from omnimoe.train.mesh import global_batch, make_mesh
from omnimoe.train.state import init_state, make_setup
from omnimoe.train.step import loss_fn

AXES = ("data", "fsdp", "expert", "tensor", "context")


def test_balanced_order_gives_device_i_chunks_i_and_its_mirror():
  L, c = 48, 3
  order = context_batch.balanced_order(L, c)
  chunk = L // (2 * c)
  for i in range(c):                       # device i's contiguous slice of L / c positions
    mine = order[i * L // c:(i + 1) * L // c]
    want = list(range(i * chunk, (i + 1) * chunk)) + list(range((2 * c - 1 - i) * chunk,
                                                                (2 * c - i) * chunk))
    assert mine.tolist() == want
  assert sorted(order.tolist()) == list(range(L))


def test_balance_moves_every_array_with_its_positions():
  rng = np.random.default_rng(0)
  batch = {"tokens": rng.integers(0, 9, (2, 16)), "features": rng.normal(size=(2, 16, 3)),
           "positions": rng.integers(0, 9, (2, 16, 3))}
  out = context_batch.balance(batch, 2)
  for b in range(2):
    for j in range(16):
      i = out["order"][b, j]
      assert out["tokens"][b, j] == batch["tokens"][b, i]
      np.testing.assert_array_equal(out["features"][b, j], batch["features"][b, i])
      np.testing.assert_array_equal(out["positions"][b, j], batch["positions"][b, i])


@pytest.mark.parametrize("override, needle", [
    (["mesh.within_rack.data=1", "mesh.within_rack.context=8", "data.seq_len=120"],
     "config key 'data.seq_len' must be divisible by 2 x mesh.within_rack.context = 16 chunks"),
    (["mesh.within_rack.data=1", "mesh.within_rack.context=8", "data.seq_len=100",
      "train.context_balance=false"],
     "config key 'data.seq_len' must be divisible by mesh.within_rack.context = 8 devices"),
    (["mesh.across_racks.context=2"], "the context axis must stay inside one rack"),
])
def test_bad_lengths_and_racks_are_one_line(override, needle):
  with pytest.raises(ConfigError) as e:
    config_lib.load(None, override)
  assert needle in str(e.value) and "\n" not in str(e.value)


def test_a_context_axis_wider_than_a_rack_is_refused():
  cfg = config_lib.load(None, ["mesh.within_rack.data=1", "mesh.within_rack.context=8",
                               "mesh.rack_size=4", "mesh.across_racks.data=-1"])
  with pytest.raises(ConfigError, match="mesh.within_rack.context'=8 would span racks"):
    make_mesh(cfg.mesh)


def _segments(n):
  """Two rows: documents that cross the shard boundaries, padding in the middle and at the end."""
  seg = np.zeros((2, n), np.int32)
  seg[0, :n // 3], seg[0, n // 3:n - 5] = 1, 2
  seg[1, :7], seg[1, 7:n // 2], seg[1, n // 2 + 3:] = 1, 2, 3
  return seg


def _mesh(shape):
  return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * 5)


@pytest.mark.parametrize("strategy", ["all_gather", "ring"])
@pytest.mark.parametrize("balanced", [True, False])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 8), (1, 1, 1, 2, 4)])
def test_attention_over_context_meets_the_float64_oracle(strategy, balanced, shape):
  n, h, kv, d, block = 64, 4, 2, 8, 4
  c = shape[-1]
  keys = jax.random.split(jax.random.key(c + balanced), 4)
  q = np.asarray(jax.random.normal(keys[0], (2, n, h, d)))
  k = np.asarray(jax.random.normal(keys[1], (2, n, kv, d)))
  v = np.asarray(jax.random.normal(keys[2], (2, n, kv, d)))
  r = np.asarray(jax.random.normal(keys[3], (2, n, h, d)))
  seg = _segments(n)
  want_o, want_g = attention_oracle(q, k, v, seg, np.broadcast_to(np.arange(n), (2, n)), r)
  perm = context_batch.balanced_order(n, c) if balanced else np.arange(n)
  order = np.broadcast_to(perm, (2, n)).astype(np.int32) if balanced else None
  mesh = _mesh(shape)
  sh = NamedSharding(mesh, P(None, "context"))
  put = lambda a: jax.device_put(a[:, perm], sh)

  def loss(q, k, v, seg, order, r):
    o = attend_over_context(q, k, v, seg, order, strategy=strategy, implementation="blockwise",
                            block=block)
    return jnp.sum(o * r), o
  with jax.set_mesh(mesh):
    (_, o), grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(
        put(q), put(k), put(v), put(seg), None if order is None else jax.device_put(order, sh),
        put(r))
  undo = np.argsort(perm)
  np.testing.assert_allclose(np.asarray(o)[:, undo], want_o, rtol=1e-5, atol=1e-5)
  for got, want, name in zip(grads, want_g, "qkv"):
    np.testing.assert_allclose(np.asarray(got)[:, undo], want, rtol=1e-5, atol=1e-5,
                               err_msg=f"d{name}")


TINY = ["model.num_layers=1", "model.d_model=32", "model.num_heads=2",
        "model.num_kv_heads=1", "model.head_dim=16", "model.rope_sections=[4,2,2]",
        "model.moe.num_experts=4", "model.moe.expert_hidden=32",
        "data.seq_len=64", "train.batch_size=4", "model.attention=blockwise",
        "model.attention_block=8"]

MESHES = {
    "context8": ["mesh.within_rack.data=1", "mesh.within_rack.context=8"],
    "data2_context4": ["mesh.within_rack.data=2", "mesh.within_rack.context=4"],
    "fsdp2_expert2_context2": ["mesh.within_rack.data=1", "mesh.within_rack.fsdp=2",
                               "mesh.within_rack.expert=2", "mesh.within_rack.context=2"],
}


def _loss_and_grads(overrides, devices=None):
  cfg = config_lib.load(None, [*TINY, *overrides])
  mesh = make_mesh(cfg.mesh, devices)
  info = data.dataset_info(cfg.data, cfg.train.seed)
  it = data.train_iterator(cfg.data, batch_size=cfg.train.batch_size, seed=cfg.train.seed)
  host = next(it)
  it.close()
  # Packed rows of the default dataset: documents cross the shard (and chunk) boundaries.
  seg, cut = host["segment_ids"], np.arange(8, cfg.data.seq_len, 8)   # boundaries of 8 shards
  assert ((seg[:, cut - 1] == seg[:, cut]) & (seg[:, cut] > 0)).sum() > cfg.train.batch_size
  host = context_batch.prepare(host, mesh.shape["context"], cfg.train.context_balance)
  setup = make_setup(cfg, mesh, info)
  params = init_state(cfg, setup)["params"]
  fn = functools.partial(loss_fn, setup=setup, cfg=cfg)
  (loss, _), grads = jax.jit(jax.value_and_grad(fn, has_aux=True))(params,
                                                                   global_batch(host, mesh))
  return float(loss), jax.tree.map(np.asarray, grads)


@functools.cache
def _one_device():
  return _loss_and_grads([], jax.devices()[:1])


@pytest.mark.parametrize("balance", ["true", "false"])
@pytest.mark.parametrize("strategy", ["all_gather", "ring"])
@pytest.mark.parametrize("mesh", list(MESHES))
def test_loss_and_every_gradient_leaf_equal_one_device(mesh, strategy, balance):
  ref_loss, ref = _one_device()
  loss, grads = _loss_and_grads([*MESHES[mesh], f"model.context_parallel={strategy}",
                                 f"train.context_balance={balance}"])
  assert loss == pytest.approx(ref_loss, rel=1e-5)
  paths = jax.tree_util.tree_leaves_with_path(ref)
  assert len(paths) == len(jax.tree.leaves(grads)) and len(paths) > 10
  for (path, want), got in zip(paths, jax.tree.leaves(grads), strict=True):
    scale = np.abs(want).max()
    assert scale > 0, jax.tree_util.keystr(path)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale,
                               err_msg=jax.tree_util.keystr(path))
