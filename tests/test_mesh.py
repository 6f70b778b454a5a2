"""Meshes that mirror the rack: layouts, refusals, and every layout computing what one device does.

"What one device does" is checked leaf by leaf: the gradient of the training loss (cross entropy
plus the balance and z losses, as train/step.py builds it) at the initial parameters on the first
batch, every leaf against the single-device gradient. AdamW normalises each element, so parameters
after a few steps, or the global gradient norm, would barely move if one small leaf (the router, a
norm scale, a tensor-split attention weight) had a wrong scale."""
import functools

import jax
import numpy as np
import pytest

from omnimoe import data
from omnimoe.train import config as config_lib
from omnimoe.train.config import ConfigError
from omnimoe.train.mesh import batch_sharding, global_batch, make_mesh
from omnimoe.train.state import init_state, make_setup
from omnimoe.train.step import accumulated_grads, make_train_step

SMALL = ["model.num_layers=1", "model.d_model=32", "model.num_heads=2", "model.num_kv_heads=2",
         "model.head_dim=16", "model.rope_sections=[4,2,2]", "model.moe.num_experts=4",
         "model.moe.expert_hidden=32", "data.seq_len=64", "train.batch_size=8"]

MESHES = {
    "data8": [],
    "fsdp8": ["mesh.within_rack.data=1", "mesh.within_rack.fsdp=8"],
    "data2_expert4": ["mesh.within_rack.data=2", "mesh.within_rack.expert=4"],
    "fsdp2_expert2_tensor2": ["mesh.within_rack.data=1", "mesh.within_rack.fsdp=2",
                              "mesh.within_rack.expert=2", "mesh.within_rack.tensor=2"],
    "racks2_expert4": ["mesh.across_racks.data=2", "mesh.within_rack.data=1",
                       "mesh.within_rack.expert=4", "mesh.rack_size=4"],
    # all_to_all with room for every assignment is dropless too
    "data2_expert4_all_to_all": ["mesh.within_rack.data=2", "mesh.within_rack.expert=4",
                                 "model.moe.dispatch=all_to_all", "model.moe.capacity_factor=8"],
}


def losses_and_grads(overrides, devices=None, steps=3, gradients=False):
  """(mesh, setup, state after `steps` train steps, [loss, load_balance_loss] per step, grad_norm
  per step, and with `gradients` the gradient tree at the initial parameters on the first batch as
  numpy arrays, else None)."""
  cfg = config_lib.load(None, [*SMALL, *overrides])
  mesh = make_mesh(cfg.mesh, devices)
  info = data.dataset_info(cfg.data, cfg.train.seed)
  setup = make_setup(cfg, mesh, info)
  state = init_state(cfg, setup)
  step = make_train_step(cfg, setup, batch_sharding(mesh))
  it = data.train_iterator(cfg.data, batch_size=cfg.train.batch_size, seed=cfg.train.seed)
  batches = [global_batch(next(it), mesh) for _ in range(steps)]
  it.close()
  grads = None
  if gradients:   # before the steps: the train step donates the state
    grad_fn = jax.jit(functools.partial(accumulated_grads, setup=setup, cfg=cfg))
    grads = jax.tree.map(np.asarray, grad_fn(state["params"], batches[0], None)[1])
  losses, grad_norms = [], []
  for batch in batches:
    state, metrics = step(state, batch)
    losses.append([float(metrics[k]) for k in ("loss", "load_balance_loss")])
    grad_norms.append(float(metrics["grad_norm"]))
  return mesh, setup, state, np.array(losses), np.array(grad_norms), grads


@pytest.fixture(scope="module")
def single_device():
  return losses_and_grads([], devices=jax.devices()[:1], gradients=True)


# Gradient leaves: float32 sums in another order (per-device partial sums, psums) differ by
# rounding only; measured at most 8e-7 of the leaf's largest entry on every mesh below.
GRAD_RTOL = 1e-5


def assert_same_gradients(grads, ref_grads):
  """Every leaf of `grads` equals the same leaf of `ref_grads` to GRAD_RTOL, relative to each
  element and (atol) to the leaf's largest entry, so a small leaf is held to its own scale."""
  assert jax.tree.structure(grads) == jax.tree.structure(ref_grads)
  for (path, ref), got in zip(jax.tree_util.tree_leaves_with_path(ref_grads),
                              jax.tree.leaves(grads), strict=True):
    scale = np.abs(ref).max()
    assert scale > 0, jax.tree_util.keystr(path)      # every leaf gets a gradient
    np.testing.assert_allclose(got, ref, rtol=GRAD_RTOL, atol=GRAD_RTOL * scale,
                               err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("name", list(MESHES))
def test_every_mesh_matches_one_device(name, single_device):
  _, _, ref_state, ref_losses, ref_norms, ref_grads = single_device
  mesh, setup, state, losses, norms, grads = losses_and_grads(MESHES[name], gradients=True)
  assert mesh.devices.size == 8
  # Total loss and, on its own, the load-balancing loss (global-batch statistics, not per shard).
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(norms, ref_norms, rtol=1e-5, atol=1e-6)
  # The gradient of the training loss, leaf by leaf.
  assert_same_gradients(grads, ref_grads)
  # Parameters after 3 steps agree too (a composite of the gradients: 1e-4).
  for a, b in zip(jax.tree.leaves(ref_state["params"]), jax.tree.leaves(state["params"]), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
  # Shards are what the rules say: expert weights split over `expert`, matrices over fsdp/tensor.
  w_gate = state["params"]["blocks"][0]["moe"]["w_gate_ExDxH"]
  e, d, h = w_gate.shape
  shard = w_gate.sharding.shard_shape(w_gate.shape)
  assert shard == (e // mesh.shape["expert"], d // mesh.shape["fsdp"], h // mesh.shape["tensor"])


def test_racks_group_consecutive_devices():
  cfg = config_lib.load(None, MESHES["racks2_expert4"])
  mesh = make_mesh(cfg.mesh)
  ids = np.vectorize(lambda d: d.id)(mesh.devices)
  # data row 0 is rack 0 (devices 0-3) and its experts live there; row 1 is rack 1.
  np.testing.assert_array_equal(ids.reshape(2, 4), [[0, 1, 2, 3], [4, 5, 6, 7]])


@pytest.mark.parametrize("overrides, needle", [
    (["mesh.within_rack.expert=8", "mesh.rack_size=4"], "would span racks"),
    (["mesh.across_racks.expert=2"], "the expert axis must stay inside one rack"),
    (["mesh.within_rack.expert=3"], "do not fit 8 devices of a rack"),
    (["mesh.within_rack.data=-1", "mesh.within_rack.fsdp=-1"], "both -1"),
    (["mesh.rack_size=3"], "does not divide the 8 devices"),
    (["mesh.within_rack.tensor=0"], "must be positive or -1"),
])
def test_bad_meshes_are_refused_in_one_line(overrides, needle):
  with pytest.raises(ConfigError, match=needle) as e:
    make_mesh(config_lib.load(None, overrides).mesh)
  assert "\n" not in str(e.value)


def test_checkpoint_from_8_devices_restores_onto_4_and_1(tmp_path):
  from omnimoe.train.checkpoint import Checkpoints
  cfg = config_lib.load(None, [*SMALL, *MESHES["data2_expert4"]])
  mesh8, setup8, state8, *_ = losses_and_grads(MESHES["data2_expert4"], steps=2)
  ckpts = Checkpoints(tmp_path / "ckpt", keep=1, async_save=False)
  ckpts.save(2, state8, {})
  ckpts.wait()
  info = data.dataset_info(cfg.data, cfg.train.seed)
  it = data.train_iterator(cfg.data, batch_size=cfg.train.batch_size, seed=cfg.train.seed)
  for _ in range(2):
    next(it)
  batch = next(it)
  it.close()

  def next_loss(mesh, setup, state):
    step = make_train_step(cfg, setup, batch_sharding(mesh))
    return float(step(state, global_batch(batch, mesh))[1]["loss"])

  expected = next_loss(mesh8, setup8, state8)
  for overrides, devices in [(["mesh.within_rack.data=1", "mesh.within_rack.expert=4"], jax.devices()[:4]),
                             ([], jax.devices()[:1])]:
    small = config_lib.load(None, [*SMALL, *overrides])
    mesh = make_mesh(small.mesh, devices)
    setup = make_setup(small, mesh, info)
    state, _ = ckpts.restore(2, setup)
    assert int(state["step"]) == 2
    assert all(len(leaf.sharding.device_set) == len(devices) for leaf in jax.tree.leaves(state))
    assert next_loss(mesh, setup, state) == pytest.approx(expected, rel=1e-5)
  ckpts.close()
