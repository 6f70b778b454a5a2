"""`model.scan_layers`: the MoE blocks stacked on a `layers` axis and run by one lax.scan give the
same loss, aux statistics and gradients as the unrolled blocks (1e-5), from the same parameters.

The tiny model is built as the trainer builds it (make_setup on the 8 simulated devices, a real
batch). The unrolled model is initialised, and its parameters are stacked into the scanned form
here (`to_stacked`: the mapping under test, written independently of model/decoder.py); the
scanned gradients are mapped back leaf by leaf (stacked leaf [M, ...] slice m == unrolled block
num_dense_layers + m). The router state differs per layer, so a slice taken in the wrong order
shows. A checkpoint of one form is refused, in one line, by a run of the other."""
import functools

import jax
import numpy as np
import pytest

from omnimoe.train import config as config_lib
from omnimoe.train.checkpoint import Checkpoints
from omnimoe.train.state import init_state, make_setup
from omnimoe.train.step import loss_fn
from test_memory import RTOL, TINY, _eqns, _mesh_info_batch

LAYERS = 3
ROUTERS = {"topk": (), "dynamic+bias": ("model.moe.router=dynamic",
                                        "model.moe.target_active_fraction=0.5",
                                        "model.moe.bias_update_rate=0.01")}


def _cfg_setup(dense, router, scan, *extra):
  cfg = config_lib.load(None, [*TINY, f"model.num_layers={LAYERS}",
                               f"model.num_dense_layers={dense}", f"model.scan_layers={scan}",
                               *ROUTERS[router], *extra])
  mesh, info, _ = _mesh_info_batch()
  return cfg, make_setup(cfg, mesh, info)


def _router_state(cfg):
  """Per-layer values that differ layer to layer (None: the top-k router without state)."""
  M, E = cfg.model.num_moe_layers, cfg.model.moe.num_experts
  if cfg.model.moe.router != "dynamic":
    return None
  bias = np.random.default_rng(0).normal(0, 0.3, (M, 3, E)).astype(np.float32)
  return {"threshold": np.linspace(0.3, 0.8, M).astype(np.float32), "bias": bias}


def to_stacked(params: dict, dense: int) -> dict:
  """Unrolled params -> scanned form: dense blocks stay, MoE blocks stacked on a leading axis."""
  blocks = params["blocks"]
  moe = [blocks[i] for i in sorted(blocks) if i >= dense]
  out = {k: v for k, v in params.items() if k != "blocks"}
  if dense:                                  # an empty list of blocks leaves no entry
    out["blocks"] = {i: blocks[i] for i in range(dense)}
  out["moe_stack"] = jax.tree.map(lambda *leaves: np.stack(leaves), *moe)
  return out


def scanned_leaf(tree: dict, path, dense: int, take_layer: bool = True):
  """The scanned tree's value for the unrolled leaf at `path` (a slice of a stacked leaf; the
  whole stacked leaf with take_layer=False)."""
  keys = [k.key for k in path]
  if keys[0] == "blocks" and keys[1] >= dense:
    layer, keys = keys[1] - dense, ["moe_stack", *keys[2:]]
  else:
    layer = None
  for k in keys:
    tree = tree[k]
  return tree if layer is None or not take_layer else tree[layer]


@functools.cache
def _unrolled_params(dense, router):
  cfg, setup = _cfg_setup(dense, router, False)
  return jax.tree.map(np.asarray, init_state(cfg, setup)["params"])


@functools.cache
def _loss_aux_grads(dense, router, scan, *extra):
  cfg, setup = _cfg_setup(dense, router, scan, *extra)
  params = _unrolled_params(dense, router)
  if scan:
    params = to_stacked(params, dense)
    want = jax.tree.map(lambda a: a.shape, setup.abstract_state["params"])
    assert jax.tree.map(np.shape, params) == want
  fn = functools.partial(loss_fn, setup=setup, cfg=cfg)
  batch = _mesh_info_batch()[2]
  (loss, aux), grads = jax.jit(jax.value_and_grad(fn, has_aux=True))(params, batch,
                                                                    _router_state(cfg))
  return float(loss), jax.tree.map(np.asarray, aux), jax.tree.map(np.asarray, grads)


@pytest.mark.parametrize("router", list(ROUTERS))
@pytest.mark.parametrize("dense", [0, 1])
@pytest.mark.parametrize("remat", ["none", "dots"])
def test_scan_gives_the_same_loss_aux_and_every_gradient(dense, router, remat):
  ref_loss, ref_aux, ref_grads = _loss_aux_grads(dense, router, False)
  loss, aux, grads = _loss_aux_grads(dense, router, True, f"model.remat={remat}")
  assert loss == pytest.approx(ref_loss, rel=RTOL)
  assert set(aux) == set(ref_aux) and ref_aux["expert_load"].shape[0] == LAYERS - dense
  for key in ref_aux:
    assert aux[key].shape == ref_aux[key].shape, key
    np.testing.assert_allclose(aux[key], ref_aux[key], rtol=RTOL, atol=1e-7, err_msg=key)
  paths = jax.tree_util.tree_leaves_with_path(ref_grads)
  stacked = jax.tree.leaves(grads["moe_stack"])
  assert len(paths) == len(jax.tree.leaves(grads)) + (LAYERS - dense - 1) * len(stacked)
  for path, ref in paths:
    scale = np.abs(ref).max()
    assert scale > 0, jax.tree_util.keystr(path)      # every leaf is really reached
    np.testing.assert_allclose(scanned_leaf(grads, path, dense), ref, rtol=RTOL,
                               atol=RTOL * scale, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("dense", [0, 1])
def test_one_scan_over_the_moe_layers_with_remat_inside(dense):
  cfg, setup = _cfg_setup(dense, "topk", True, "model.remat=full")
  params = to_stacked(_unrolled_params(dense, "topk"), dense)
  fn = functools.partial(loss_fn, setup=setup, cfg=cfg)
  batch = _mesh_info_batch()[2]
  jaxpr = jax.make_jaxpr(fn)(params, batch).jaxpr
  x_shape = (*batch["tokens"].shape, cfg.model.d_model)
  scans = [e for e in _eqns(jaxpr) if e.primitive.name == "scan"
           and e.params["length"] == LAYERS - dense and e.outvars[0].aval.shape == x_shape]
  assert len(scans) == 1                            # one scan carries x through the MoE layers
  in_scan = [e for e in _eqns(scans[0].params["jaxpr"].jaxpr)
             if e.primitive.name in ("checkpoint", "remat2")]
  outside = [e for e in _eqns(jaxpr) if e.primitive.name in ("checkpoint", "remat2")]
  assert len(in_scan) == 1 and len(outside) == dense + 1   # each dense block + the scanned body


def test_stacked_parameters_are_on_the_layers_axis_and_replicated_over_it():
  _, unrolled = _cfg_setup(1, "topk", False)
  _, scanned = _cfg_setup(1, "topk", True)
  flat = jax.tree_util.tree_leaves_with_path(unrolled.shardings["params"])
  checked = 0
  for path, sharding in flat:
    if path[0].key == "blocks" and path[1].key >= 1:
      got = tuple(scanned_leaf(scanned.shardings["params"], path, 1, take_layer=False).spec)
      want = tuple(sharding.spec)
      assert got[0] is None and got[1:] + (None,) * (len(want) + 1 - len(got)) == want, path
      checked += 1
  assert checked > 10


def _saved(tmp_path, scan):
  cfg, setup = _cfg_setup(1, "topk", scan)
  state = init_state(cfg, setup)
  ckpts = Checkpoints(tmp_path / "ckpt", keep=1, async_save=False)
  ckpts.save(1, state, {"position": 0})
  ckpts.wait()
  return ckpts, state


@pytest.mark.parametrize("saved_scan", [True, False])
def test_a_checkpoint_of_the_other_form_is_refused_in_one_line(tmp_path, saved_scan):
  ckpts, _ = _saved(tmp_path, saved_scan)
  _, other = _cfg_setup(1, "topk", not saved_scan)
  with pytest.raises(config_lib.ConfigError, match=f"model.scan_layers={str(saved_scan).lower()}"
                                                   f" but this run has model.scan_layers="
                                                   f"{str(not saved_scan).lower()}") as e:
    ckpts.restore(1, other)
  assert "\n" not in str(e.value)
  ckpts.close()


def test_a_scanned_checkpoint_restores_into_a_scanned_run(tmp_path):
  ckpts, state = _saved(tmp_path, True)
  _, setup = _cfg_setup(1, "topk", True)
  restored, data_state = ckpts.restore(1, setup)
  ckpts.close()
  assert data_state == {"position": 0}
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
