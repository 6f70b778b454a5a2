"""The train step, state creation and checkpoints, in-process on the 8 simulated devices."""
import jax
import numpy as np
import pytest

import data
from train import config as config_lib
from train.checkpoint import Checkpoints
from train.mesh import batch_sharding, global_batch, make_mesh
from train.state import init_state, make_setup
from train.step import make_train_step

SMALL = ["model.num_layers=1", "model.d_model=32", "model.num_heads=2", "model.num_kv_heads=1",
         "model.head_dim=16", "model.rope_sections=[4,2,2]", "model.moe.num_experts=4",
         "model.moe.expert_hidden=32", "data.seq_len=64", "train.batch_size=8"]


def build(*overrides):
  cfg = config_lib.load(None, [*SMALL, *overrides])
  mesh = make_mesh()
  info = data.dataset_info(cfg.data, cfg.train.seed)
  dims = dict(vocab_size=info.vocab.size, feature_dim=info.feature_dim)
  setup = make_setup(cfg, mesh, **dims)
  return cfg, mesh, setup, init_state(cfg, setup, **dims)


def first_batch(cfg):
  return next(data.train_iterator(cfg.data, batch_size=cfg.train.batch_size, seed=cfg.train.seed))


def test_state_is_created_sharded_on_the_mesh():
  cfg, mesh, setup, state = build()
  assert len(mesh.devices.flat) == 8
  for leaf, sharding in zip(jax.tree.leaves(state), jax.tree.leaves(setup.shardings), strict=True):
    assert leaf.sharding == sharding
  assert int(state["step"]) == 0


def test_a_tiny_run_overfits_one_batch():
  cfg, mesh, setup, state = build("train.learning_rate=1e-2", "train.warmup_steps=5", "train.steps=100")
  step = make_train_step(cfg, setup, batch_sharding(mesh))
  batch = global_batch(first_batch(cfg), mesh)
  losses = []
  for _ in range(100):
    state, metrics = step(state, batch)
    losses.append(float(metrics["ce_loss"]))
  assert losses[0] > 3.0, losses[0]        # ~ln(vocab) at init
  assert losses[-1] < 0.15 * losses[0], (losses[0], losses[-1])


def test_checkpoint_round_trip(tmp_path):
  cfg, mesh, setup, state = build()
  step = make_train_step(cfg, setup, batch_sharding(mesh))
  it = data.train_iterator(cfg.data, batch_size=cfg.train.batch_size, seed=cfg.train.seed)
  state, _ = step(state, global_batch(next(it), mesh))
  expected = jax.tree.map(np.asarray, state)
  ckpts = Checkpoints(tmp_path / "ckpt", keep=2, async_save=True)
  ckpts.save(1, state, it.get_state())
  ckpts.wait()
  restored, data_state = ckpts.restore(1, setup)
  ckpts.close()
  for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(restored), strict=True):
    np.testing.assert_array_equal(a, np.asarray(b))
  for leaf, sharding in zip(jax.tree.leaves(restored), jax.tree.leaves(setup.shardings), strict=True):
    assert leaf.sharding == sharding
  fresh = data.train_iterator(cfg.data, batch_size=cfg.train.batch_size, seed=cfg.train.seed)
  fresh.set_state(data_state)
  np.testing.assert_array_equal(next(fresh)["tokens"], next(it)["tokens"])
