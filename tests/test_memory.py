"""Memory savers that must not change the numbers: `model.remat` (jax checkpoint around each
block) and `train.loss_chunk` (cross entropy over chunks of positions, no [B, L, V] array).

The model is built as the trainer builds it (make_setup on the 8 simulated devices, a real batch
of the default dataset); the reference is today's path (remat=none, loss_chunk=0), and the chunked
cross entropy also meets a float64 numpy oracle."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omnimoe import data
from omnimoe.train import config as config_lib
from omnimoe.train.mesh import global_batch, make_mesh
from omnimoe.train.state import init_state, make_setup
from omnimoe.train.step import chunked_cross_entropy_BxL, loss_fn, make_eval_step

L = 64
TINY = ["model.num_layers=2", "model.num_dense_layers=1", "model.d_model=32", "model.num_heads=2",
        "model.num_kv_heads=1", "model.head_dim=16", "model.rope_sections=[4,2,2]",
        "model.dense_hidden=32", "model.moe.num_experts=4", "model.moe.expert_hidden=32",
        f"data.seq_len={L}", "train.batch_size=8"]
RTOL = 1e-5


@functools.cache
def _mesh_info_batch():
  cfg = config_lib.load(None, TINY)
  mesh = make_mesh()
  info = data.dataset_info(cfg.data, cfg.train.seed)
  it = data.train_iterator(cfg.data, batch_size=cfg.train.batch_size, seed=cfg.train.seed)
  return mesh, info, global_batch(next(it), mesh)


def _setup(*overrides):
  cfg = config_lib.load(None, [*TINY, *overrides])
  mesh, info, batch = _mesh_info_batch()
  setup = make_setup(cfg, mesh, info)
  return cfg, setup, init_state(cfg, setup)["params"], batch


def _build(*overrides):
  """(loss fn of params -> (loss, aux), params, batch) for the tiny model with `overrides`."""
  cfg, setup, params, batch = _setup(*overrides)
  return functools.partial(loss_fn, setup=setup, cfg=cfg), params, batch


@functools.cache
def _loss_and_grads(*overrides):
  fn, params, batch = _build(*overrides)
  (loss, aux), grads = jax.jit(jax.value_and_grad(fn, has_aux=True))(params, batch)
  return float(loss), float(aux["ce_loss"]), jax.tree.map(np.asarray, grads)


def _assert_same(overrides):
  loss, ce, grads = _loss_and_grads(*overrides)
  ref_loss, ref_ce, ref_grads = _loss_and_grads()
  assert loss == pytest.approx(ref_loss, rel=RTOL) and ce == pytest.approx(ref_ce, rel=RTOL)
  paths = jax.tree_util.tree_leaves_with_path(ref_grads)
  assert len(paths) == len(jax.tree.leaves(grads)) and len(paths) > 10
  for (path, ref), got in zip(paths, jax.tree.leaves(grads), strict=True):
    scale = np.abs(ref).max()
    assert scale > 0, jax.tree_util.keystr(path)       # every leaf is really reached
    np.testing.assert_allclose(got, ref, rtol=RTOL, atol=RTOL * scale,
                               err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_leaves_loss_and_every_gradient_unchanged(remat):
  _assert_same((f"model.remat={remat}",))


@pytest.mark.parametrize("chunk", [16, 40, L])   # 40 does not divide L: the last chunk is padded
def test_chunked_loss_leaves_loss_and_every_gradient_unchanged(chunk):
  _assert_same((f"train.loss_chunk={chunk}",))


def _eval_sums(*overrides):
  cfg, setup, params, batch = _setup(*overrides)
  vocab = _mesh_info_batch()[1].vocab
  step = make_eval_step(cfg, setup, lambda ids: vocab.modality_of(ids, xp=jnp, specials_as_text=True))
  return {k: float(v) for k, v in step(params, batch).items()}


def test_eval_step_with_a_chunked_loss_gives_the_same_sums():
  want, got = _eval_sums(), _eval_sums("train.loss_chunk=40")
  assert set(got) == set(want) and want["ce_sum"] > 0
  for key in want:
    assert got[key] == pytest.approx(want[key], rel=RTOL), key


def test_remat_and_chunked_loss_together():
  _assert_same(("model.remat=dots", "train.loss_chunk=24"))


@pytest.mark.parametrize("chunk", [7, 16, 50])
def test_chunked_cross_entropy_meets_a_float64_oracle(chunk):
  r = np.random.default_rng(chunk)
  B, Ls, D, V = 3, 37, 8, 11
  h, head = r.normal(size=(B, Ls, D)), r.normal(size=(D, V))
  targets = r.integers(0, V, (B, Ls))
  logits = np.einsum("bld,dv->blv", h, head)
  log_z = logits.max(-1) + np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1))
  want = log_z - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
  got = chunked_cross_entropy_BxL(h.astype(np.float32), head.astype(np.float32), targets, chunk)
  assert got.shape == (B, Ls)
  np.testing.assert_allclose(np.asarray(got), want, rtol=RTOL, atol=RTOL)


def _eqns(jaxpr):
  """Every equation of a jaxpr and of the jaxprs inside it (jit, scan, checkpoint, shard_map...)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from _eqns(inner)


@pytest.mark.parametrize("remat, policy", [
    ("none", None), ("full", jax.checkpoint_policies.nothing_saveable),
    ("dots", jax.checkpoint_policies.dots_with_no_batch_dims_saveable)])
def test_remat_checkpoints_each_block_with_its_policy(remat, policy):
  fn, params, batch = _build(f"model.remat={remat}")
  found = [e.params["policy"] for e in _eqns(jax.make_jaxpr(fn)(params, batch).jaxpr)
           if e.primitive.name in ("checkpoint", "remat2")]
  assert found == ([] if policy is None else [policy] * 2)   # TINY has 2 blocks


def _largest_arrays(*overrides):
  """(shapes of the arrays in the loss's value_and_grad, (B, L, V))."""
  fn, params, batch = _build(*overrides)
  jaxpr = jax.make_jaxpr(jax.value_and_grad(fn, has_aux=True))(params, batch).jaxpr
  B, V = batch["tokens"].shape[0], params["head_DxV"].shape[1]
  shapes = [tuple(v.aval.shape) for e in _eqns(jaxpr) for v in e.outvars
            if hasattr(v.aval, "shape")]
  return shapes, (B, L, V)


def test_whole_loss_builds_the_logits_array():
  shapes, blv = _largest_arrays()
  assert blv in shapes


@pytest.mark.parametrize("chunk", [16, 40])
def test_chunked_loss_never_builds_B_by_L_by_V(chunk):
  """No value of the forward or backward pass (at any nesting) has B*L*V elements or more."""
  shapes, blv = _largest_arrays(f"train.loss_chunk={chunk}")
  big = [s for s in shapes if np.prod(s) >= np.prod(blv)]
  assert not big, big


def test_bad_values_are_refused_in_one_line():
  with pytest.raises(config_lib.ConfigError, match="'model.remat' must be one of none, full, dots"):
    config_lib.load(None, ["model.remat=some"])
  with pytest.raises(config_lib.ConfigError, match="'train.loss_chunk' must be >= 0"):
    config_lib.load(None, ["train.loss_chunk=-1"])
