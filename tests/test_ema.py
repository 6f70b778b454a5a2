"""`train.ema_decay`: the state's moving average of the parameters, against a float64 loop.

Three train steps of the tiny model on the 8 simulated devices (data 4 x expert 2): the average
after each step equals, leaf by leaf, d_t * previous + (1 - d_t) * the step's parameters with
d_t = min(d, (1 + t) / (10 + t)), starting from the initial parameters, computed in numpy float64
from the parameters the steps produced. Checkpoints keep it; a checkpoint without one starts it
at the parameters; a run that no longer keeps one still restores; evaluation reads it; a placement
moves it like the parameters."""
import jax
import numpy as np
import pytest

from omnimoe import data
from omnimoe.train import config as config_lib
from omnimoe.train.checkpoint import Checkpoints
from omnimoe.train.config import ConfigError
from omnimoe.train.mesh import batch_sharding, global_batch, make_mesh
from omnimoe.train.state import eval_params, init_state, make_setup
from omnimoe.train.step import make_train_step
from test_memory import TINY

MESH = ["train.batch_size=16", "mesh.within_rack.data=4", "mesh.within_rack.expert=2",
        "train.warmup_steps=0", "train.learning_rate=1e-2"]
DECAY = 0.2        # small, so that (1 + t) / (10 + t) and d both take turns at t = 0, 1, 2


def _setup(decay: float):
  cfg = config_lib.load(None, [*TINY, *MESH, f"train.ema_decay={decay}"])
  mesh = make_mesh(cfg.mesh)
  info = data.dataset_info(cfg.data, cfg.train.seed)
  return cfg, mesh, make_setup(cfg, mesh, info)


def _leaves(tree) -> dict:
  return {jax.tree_util.keystr(p): np.asarray(v, np.float64)
          for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_moving_average_equals_a_float64_loop_and_checkpoints_keep_it(tmp_path):
  cfg, mesh, setup = _setup(DECAY)
  state = init_state(cfg, setup)
  want = _leaves(state["params"])
  np.testing.assert_array_equal(np.concatenate([v.ravel() for v in _leaves(state["ema"]).values()]),
                                np.concatenate([v.ravel() for v in want.values()]))
  step = make_train_step(cfg, setup, batch_sharding(mesh, cfg.data.seq_len))
  batches = data.train_iterator(cfg.data, batch_size=cfg.train.batch_size, seed=0)
  for t in range(3):
    state, _ = step(state, global_batch(next(batches), mesh))
    d = min(DECAY, (1 + t) / (10 + t))
    params = _leaves(state["params"])
    want = {k: d * want[k] + (1 - d) * params[k] for k in want}
    got = _leaves(state["ema"])
    for k in want:
      moved = np.abs(params[k] - want[k]).max()
      assert moved > 1e-6 or k.endswith("['bias_MxD']"), k      # the average lags the parameters
      np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-7, err_msg=k)
  assert eval_params(state) is state["ema"]

  ckpts = Checkpoints(tmp_path / "checkpoints", keep=2, async_save=False)
  ckpts.save(3, state, None)
  back, _ = ckpts.restore(3, setup)
  for k, v in _leaves(back["ema"]).items():
    np.testing.assert_array_equal(v, got[k], err_msg=k)
  # the same checkpoint into a run without a moving average: it restores, without one
  _, _, plain = _setup(0.0)
  back, _ = ckpts.restore(3, plain)
  assert "ema" not in back and eval_params(back) is back["params"]
  # a checkpoint without one into a run that keeps one: it starts at the parameters
  ckpts.save(4, back, None)
  again, _ = ckpts.restore(4, setup)
  for k, v in _leaves(again["ema"]).items():
    np.testing.assert_array_equal(v, _leaves(state["params"])[k], err_msg=k)
  ckpts.close()

  # a placement (train/permute.py) moves the average like the parameters
  from omnimoe.train import permute
  perms = np.asarray([[2, 0, 3, 1]])
  placed = permute.permute_state(state, perms, num_dense_layers=1, optimizer=setup.optimizer)
  moved = permute.permute_state({**state, "params": state["ema"]}, perms, num_dense_layers=1,
                                optimizer=setup.optimizer)["params"]
  placed, moved = _leaves(placed["ema"]), _leaves(moved)
  assert any(not np.array_equal(placed[k], got[k]) for k in got)      # the experts moved
  for k in moved:
    np.testing.assert_array_equal(placed[k], moved[k], err_msg=k)


def test_a_decay_outside_zero_to_one_is_refused():
  with pytest.raises(ConfigError, match="train.ema_decay"):
    config_lib.load(None, ["train.ema_decay=1.0"])

