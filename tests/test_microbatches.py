"""`train.microbatches`: gradient accumulation over slices of rows of the global batch.

On 8 simulated devices (data 4 x expert 2), batch 16, the tiny model built as the trainer builds
it: with M = 2 and 4 microbatches the cross entropy and every gradient leaf equal the one-shot
step's to 1e-5 when the auxiliary losses are off (their statistics are per microbatch by design);
with them on, the cross entropy still does. A microbatch count that does not divide the batch, or
leaves a microbatch the data-parallel devices cannot share, stops in one line."""
import functools

import jax
import numpy as np
import pytest

from omnimoe import data
from omnimoe.train import config as config_lib
from omnimoe.train.config import ConfigError
from omnimoe.train.mesh import check_batch, global_batch, make_mesh
from omnimoe.train.state import init_state, make_setup
from omnimoe.train.step import accumulated_grads, microbatches
from test_memory import RTOL, TINY

MESH = ["train.batch_size=16", "mesh.within_rack.data=4", "mesh.within_rack.expert=2"]
NO_AUX = ["model.moe.load_balance_coef=0", "model.moe.z_loss_coef=0"]


@functools.cache
def _run(M: int, *extra):
  cfg = config_lib.load(None, [*TINY, *MESH, f"train.microbatches={M}", *extra])
  mesh = make_mesh(cfg.mesh)
  info = data.dataset_info(cfg.data, cfg.train.seed)
  it = data.train_iterator(cfg.data, batch_size=cfg.train.batch_size, seed=cfg.train.seed)
  batch = global_batch(next(it), mesh)
  setup = make_setup(cfg, mesh, info)
  params = init_state(cfg, setup)["params"]
  fn = jax.jit(functools.partial(accumulated_grads, setup=setup, cfg=cfg))
  (loss, aux), grads = fn(params, batch, None)
  return float(loss), jax.tree.map(np.asarray, aux), jax.tree.map(np.asarray, grads)


def test_microbatch_m_holds_rows_m_m_plus_M_and_so_on():
  batch = {"tokens": np.arange(12).reshape(6, 2)}
  got = microbatches(batch, 3)["tokens"]
  assert got.shape == (3, 2, 2)
  np.testing.assert_array_equal(got[1], [[2, 3], [8, 9]])        # rows 1 and 4


@pytest.mark.parametrize("M", [2, 4])
def test_accumulated_gradients_equal_the_one_shot_step(M):
  ref_loss, ref_aux, ref_grads = _run(1, *NO_AUX)
  loss, aux, grads = _run(M, *NO_AUX)
  assert loss == pytest.approx(ref_loss, rel=RTOL)
  assert aux["ce_loss"] == pytest.approx(ref_aux["ce_loss"], rel=RTOL)
  np.testing.assert_array_equal(aux["moe_layers"], ref_aux["moe_layers"])
  for path, ref in jax.tree_util.tree_leaves_with_path(ref_grads):
    got = grads
    for k in path:
      got = got[k.key]
    scale = np.abs(ref).max()
    assert scale > 0, jax.tree_util.keystr(path)
    np.testing.assert_allclose(got, ref, rtol=RTOL, atol=RTOL * scale,
                               err_msg=jax.tree_util.keystr(path))


def test_with_balance_losses_on_the_cross_entropy_is_still_the_one_shot():
  ref_loss, ref_aux, _ = _run(1)
  loss, aux, _ = _run(2)
  assert aux["ce_loss"] == pytest.approx(ref_aux["ce_loss"], rel=RTOL)
  assert aux["expert_load"].shape == ref_aux["expert_load"].shape
  np.testing.assert_allclose(aux["expert_load"].sum(-1), 1.0, rtol=1e-5)   # still fractions
  assert loss != ref_loss           # the balance loss is each microbatch's, averaged


def test_bad_microbatch_counts_stop_in_one_line():
  with pytest.raises(ConfigError, match="'train.microbatches' must divide train.batch_size=16, got 3"):
    config_lib.load(None, [*TINY, *MESH, "train.microbatches=3"])
  cfg = config_lib.load(None, [*TINY, *MESH, "train.microbatches=8"])
  with pytest.raises(ConfigError, match="leaves 2 rows per microbatch, not divisible by the 4"):
    check_batch(make_mesh(cfg.mesh), 16, microbatches=8)
